"""The frozen body: raw pixels in, one pooled feature vector per image out.

A ``FrozenBody`` maps raw pixels (NCHW, 0..255, already resized; float32 or uint8) to globally
pooled activations from each requested tap of a family's trunk, concatenated. Normalisation is
inside the module so that the exported ONNX model takes raw pixels too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from headswap.backbones.spec import Preprocessing

if TYPE_CHECKING:
    from headswap.config import Tap


class GlobalPool(nn.Module):
    """Spatial pooling of an NCHW map to NC; already-pooled [N, C] features pass through."""

    def __init__(self, mode: str, gem_p: float = 3.0):
        super().__init__()
        self.mode = mode
        self.gem_p = gem_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x
        if self.mode == "mean":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        if self.mode == "meanmax":
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        # GeM (Radenovic et al.): a parameter-free middle ground between mean and max pooling.
        return x.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)


class FrozenBody(nn.Module):
    """Raw pixels -> concatenated pooled features from the requested taps. Always in eval mode."""

    def __init__(self, trunk: nn.Module, taps: list[Tap], pool: str, prep: Preprocessing):
        super().__init__()
        self.trunk = trunk
        self.taps = [str(tap) for tap in taps]
        self.pool = GlobalPool(pool)
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBody:
        # Frozen means frozen: BatchNorm statistics must never update, whatever a caller asks.
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # uint8 input is cast here (inside the ONNX graph too): 4x less to decode, queue and copy.
        x = (pixels.to(self.mean.dtype) - self.mean) / self.std
        maps = self.trunk(x, self.taps)
        return torch.cat([self.pool(maps[tap]).float() for tap in self.taps], dim=1)


class EnsembleBody(nn.Module):
    """Several frozen bodies side by side: one pixel batch in, their features concatenated.

    Pixels arrive at the main body's input size. Each other body gets them resized inside the
    module (bilinear), so feature extraction and the exported ONNX model run the same ops and a
    consumer still sends one image.
    """

    def __init__(self, bodies: list[FrozenBody], sizes: list[int]):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.sizes = sizes
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EnsembleBody:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = [self.bodies[0](pixels)]
        for body, size in zip(self.bodies[1:], self.sizes[1:], strict=True):
            resized = nn.functional.interpolate(
                pixels.float(), size=(size, size), mode="bilinear", align_corners=False
            )
            # Whole grey levels, as the member's own uint8 decoder would give it. Measured on
            # ELPV (5 splits, the default ensemble): fractional pixels 0.9388 ROC-AUC, rounded
            # 0.9416, PIL-resized uint8 files 0.9421.
            features.append(body(resized.round().clamp(0, 255)))
        return torch.cat(features, dim=1)


Body = FrozenBody | EnsembleBody  # what load_body returns: pixels in, one feature vector out


def fix_same_padding(body: nn.Module, size: int) -> int:
    """Replace every TF-style dynamic 'SAME' convolution in ``body`` by a constant pad + conv
    for inputs of ``size`` x ``size`` (the only size a body is ever fed); returns how many.

    timm's ``Conv2dSame`` (the tf_efficientnet_lite bodies) computes its padding from the input
    shape on every call, which exports to ONNX as Shape/Gather/Ceil arithmetic feeding a Pad.
    With constant pads ONNX Runtime folds each Pad into its Conv: the same numbers, and ~1.4x the
    throughput of the Lite bodies on CPU (benchmarks/README.md). Members of an ensemble see their
    own resized inputs; the sizes are read off one forward pass, so each gets its own pads.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    input_sizes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:  # None: leaves the input as it is
            input_sizes.setdefault(name, list(args[0].shape[-2:]))

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in body.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    try:
        with torch.no_grad():
            body(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, input_size in input_sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = body.get_submodule(parent_name)
        same = getattr(parent, child)
        conv = nn.Conv2d(
            same.in_channels,
            same.out_channels,
            same.kernel_size,
            same.stride,
            0,
            same.dilation,
            same.groups,
            same.bias is not None,
        )
        conv.load_state_dict(same.state_dict())
        conv.requires_grad_(False)
        kernel, stride, dilation = (list(v) for v in (same.kernel_size, same.stride, same.dilation))
        pads = pad_same_arg(input_size, kernel, stride, dilation)  # left, right, top, bottom
        setattr(parent, child, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return len(input_sizes)
