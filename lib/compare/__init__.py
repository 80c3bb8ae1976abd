"""The side-by-side comparison of the methods against exact truth: counterfactual effects (toy world), causal fidelity."""
