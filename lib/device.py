"""Device selection shared by every stage."""

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Map a params device string ("auto", "cpu", "cuda", "cuda:1", "mps") to a torch device.

    "auto" picks CUDA when available so the same params run on a laptop and a GPU box.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use 'cpu' or 'auto'")
    return device
