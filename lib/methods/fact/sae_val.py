"""The SAE on the val split: what the sae stage chooses its checkpoint by and reports.

Every val image's feature map of fact.layer goes through the SAE and the backbone's tail (the SAE
spliced in, as in `contributions`), in batches: the spliced accuracy (FaCT's selection criterion),
FaCT's training loss without the aux term (sum ||x / s - x_hat / s||^2 over positions / positions),
the fraction of variance explained, and FaCT's reconstruction L2 error, ||x - x_hat|| per position
(fact/analysis/analysis.py: mean and std over every position of every image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from lib.core.streams import read_rows
from lib.methods.fact.backbone import FactBackbone
from lib.methods.fact.contributions import splice
from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["ValScores", "score_on_val"]


@dataclass(frozen=True)
class ValScores:
    """The SAE's figures on val (module doc). `accuracy` compares the spliced prediction with the
    label; with backbone.new_head (no dataset classes) with the backbone's own top output."""

    accuracy: float
    loss: float
    fve: float
    l2_error_mean: float
    l2_error_std: float
    n_images: int


@torch.no_grad()
def score_on_val(backbone: FactBackbone, sae: BiasFreeTopKSAE, feats: zarr.Array, rows: np.ndarray, labels: np.ndarray,
                 batch_images: int) -> ValScores:
    """ValScores of `sae` spliced into `backbone` on the feature maps `feats[rows]` with `labels` (dataset class ids)."""
    if len(rows) == 0:
        raise ValueError("score_on_val needs at least one val image")
    device = sae.atoms.device
    correct, n_vectors = 0, 0
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # over positions: ||e / s||^2, ||e||, ||e||^2, ||x||^2
    sum_x = torch.zeros(feats.shape[1], dtype=torch.float64, device=device)
    for start in range(0, len(rows), batch_images):
        acts = torch.from_numpy(read_rows(feats, rows[start : start + batch_images])).to(device, torch.float32)
        _, x_hat = splice(sae, acts)
        spliced, output = backbone.explained_output(backbone.tail(x_hat))
        if backbone.class_map is None:  # no dataset classes: agreement with the unspliced model's top output
            predicted, truth = output, backbone.explained_output(backbone.tail(acts))[1]
        else:
            predicted, truth = spliced, torch.tensor(labels[start : start + batch_images], device=device)
        correct += int((predicted == truth).sum())
        x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).double()
        err = (x - x_hat.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).double()).norm(dim=1)
        sums += torch.stack([(err / sae.scale.double()).square().sum(), err.sum(), err.square().sum(), x.square().sum()])
        sum_x += x.sum(dim=0)
        n_vectors += x.shape[0]
    scaled_sq, err_sum, err_sq, x_sq = sums.tolist()
    sst = x_sq - float(sum_x.square().sum()) / n_vectors
    mean = err_sum / n_vectors
    variance = max(0.0, err_sq / n_vectors - mean * mean) * n_vectors / max(1, n_vectors - 1)  # unbiased, as torch.std_mean
    return ValScores(
        accuracy=correct / len(rows), loss=scaled_sq / n_vectors, fve=1.0 - err_sq / sst if sst > 0 else math.nan,
        l2_error_mean=mean, l2_error_std=math.sqrt(variance), n_images=len(rows),
    )
