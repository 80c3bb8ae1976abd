"""FaCT (Parchami-Araghi et al., NeurIPS 2025): a bias-free TopK sparse autoencoder spliced into a
layer of a (B-cos, dynamic-linear) backbone gives concepts shared across classes whose contributions
to a logit are exact; the C²-Score measures how consistent a concept's input attributions are.

Core (torch only): `sae` (the autoencoder), `train` (resumable training loop, fraction of variance
explained), `sampling` (which feature-map positions to train on), `contributions` (presence and
logit contributions per concept), `completeness` (their reference without autograd), `c2` (the
C²-Score, for any method's maps), `matching` (latent <-> ground-truth concept). Stages: `vectors`
(sae_data), `sae_stage` (sae), `contributions_stage` (contributions, with `consistency`: the
C²-Score of FaCT's maps, and `featurizers`: its dense features), `explain` (fact_explain); shared by
them: `backbone` (the backbone cut at the SAE's layer, input-level maps), `streams` (vector
streams), `artifacts` (sae.pt).
"""
