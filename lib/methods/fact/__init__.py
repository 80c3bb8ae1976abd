"""FaCT (Parchami-Araghi et al., NeurIPS 2025): a bias-free TopK sparse autoencoder spliced into a
layer of a (B-cos, dynamic-linear) backbone gives concepts shared across classes whose contributions
to a logit are exact; the C²-Score measures how consistent a concept's input attributions are.

Modules: `sae` (the autoencoder), `train` (resumable training loop, fraction of variance
explained), `sampling` (which feature-map positions to train on), `contributions` (presence and
logit contributions per concept), `c2` (C²-Score pieces). This package imports nothing from the
rest of the project.
"""
