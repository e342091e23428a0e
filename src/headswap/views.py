"""Test-time views: the flips and quarter turns every image is embedded under.

The features stage applies them to numpy batches (``apply_view_np``) and the exported model to
torch tensors (``apply_view``); both take their list from ``view_transforms``, so the deployed
model averages over exactly the views the evaluate stage averaged over.
"""

from __future__ import annotations

import numpy as np
import torch

VIEW_SETS = {"none": 1, "flip": 2, "d4": 8}


def view_transforms(views: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) for each view; the exported model applies the same list."""
    if views == "none":
        return [(0, False)]
    if views == "flip":
        return [(0, False), (0, True)]
    return [(k, flip) for flip in (False, True) for k in range(4)]


def apply_view_np(batch: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """NCHW numpy twin of ``apply_view``, for the ONNX Runtime engine."""
    out = np.flip(batch, axis=3) if flip else batch
    out = np.rot90(out, k=turns, axes=(2, 3)) if turns else out
    return np.ascontiguousarray(out)


def apply_view(pixels: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """Torch twin of ``apply_view_np``: optional h-flip, then quarter turns."""
    out = torch.flip(pixels, dims=[3]) if flip else pixels
    return torch.rot90(out, k=turns, dims=(2, 3)) if turns else out
