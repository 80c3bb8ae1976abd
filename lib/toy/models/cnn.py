"""Small backbones for the 64 px toy world: a ResNet-style CNN and its B-cos twin.

Both share one layout and the torchvision ResNet module names, so layer names read the same
everywhere: `conv1` (full resolution) -> `layer1` (1/2) -> `layer2` (1/4) -> `layer3` (1/8, the
last feature map) -> pooled classifier `fc`. Blocks come from the libraries (torchvision's
BasicBlock; the `bcos` package's BasicBlock, BcosConv2d and norms) rather than being rewritten.
"""

import math
from collections.abc import Callable, Sequence
from functools import partial

import bcos.models.resnet as bcos_resnet
import torch
import torchvision.models.resnet as tv_resnet
from bcos.common import BcosUtilMixin
from bcos.data.transforms import AddInverse
from bcos.modules import BcosConv2d, LogitLayer, norms
from torch import nn

from lib.kernels.preprocess import Preprocess

TOY_ARCHS = ("cnn", "bcos")
DEFAULT_WIDTHS = (16, 32, 64, 128)  # conv1, layer1, layer2, layer3 channels


def _stage(
    block: Callable[..., nn.Module],
    in_channels: int,
    out_channels: int,
    depth: int,
    shortcut: Callable[[int, int], nn.Module],
) -> nn.Sequential:
    """`depth` residual blocks; the first halves the resolution and changes the width."""
    blocks = [block(in_channels, out_channels, stride=2, downsample=shortcut(in_channels, out_channels))]
    blocks += [block(out_channels, out_channels) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def _check_widths(widths: Sequence[int], depth: int) -> tuple[int, ...]:
    if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be 4 positive ints (conv1, layer1, layer2, layer3), got {widths!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    return tuple(widths)


class ToyCNN(nn.Module):
    """ResNet-style CNN (BatchNorm + ReLU): 3x64x64 normalised RGB -> logits (B, num_classes)."""

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS, depth: int = 1):
        super().__init__()
        w = _check_widths(widths, depth)

        def shortcut(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(tv_resnet.conv1x1(cin, cout, stride=2), nn.BatchNorm2d(cout))

        self.conv1 = nn.Conv2d(3, w[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(tv_resnet.BasicBlock, w[0], w[1], depth, shortcut)
        self.layer2 = _stage(tv_resnet.BasicBlock, w[1], w[2], depth, shortcut)
        self.layer3 = _stage(tv_resnet.BasicBlock, w[2], w[3], depth, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        for module in self.modules():  # torchvision ResNet's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ToyBcosCNN(BcosUtilMixin, nn.Module):
    """B-cos twin of ToyCNN: 3x64x64 RGB in [0, 1] -> logits (B, num_classes).

    Dynamic-linear: B-cos convolutions (b=2, MaxOut 2), bias-free uncentred BatchNorm, linear
    residual sums and average pooling, so in explanation mode (`model.explanation_mode()`)
    logits = W(x) [x, 1 - x] + logit_bias exactly. The constant logit bias -log(C - 1) (the
    B-cos recipe for BCE training) is the network's only bias. Like the package's models, the
    classifier is a 1x1 B-cos conv applied before pooling.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS, depth: int = 1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for the B-cos logit bias, got {num_classes}")
        w = _check_widths(widths, depth)
        conv = partial(BcosConv2d, b=2, max_out=2)
        norm = norms.NoBias(norms.BatchNormUncentered2d)
        block = partial(bcos_resnet.BasicBlock, norm_layer=norm, conv_layer=conv)

        def shortcut(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(conv(cin, cout, kernel_size=1, stride=2), norm(cout))

        self.add_inverse = AddInverse()  # [x, 1 - x]: B-cos needs 6 channels so dark pixels have a norm
        self.conv1 = conv(6, w[0], kernel_size=3, padding=1)
        self.bn1 = norm(w[0])
        self.layer1 = _stage(block, w[0], w[1], depth, shortcut)
        self.layer2 = _stage(block, w[1], w[2], depth, shortcut)
        self.layer3 = _stage(block, w[2], w[3], depth, shortcut)
        self.fc = conv(w[3], num_classes, kernel_size=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.logit_layer = LogitLayer(logit_bias=-math.log(num_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(self.add_inverse(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.logit_layer(torch.flatten(self.avgpool(self.fc(x)), 1))


def _toy_name(arch: str) -> str:
    name = arch.removeprefix("toy:")
    if name not in TOY_ARCHS:
        raise ValueError(f"toy arch must be one of {TOY_ARCHS} (optionally prefixed 'toy:'), got {arch!r}")
    return name


def build_toy(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised toy backbone: arch "cnn" -> ToyCNN, "bcos" -> ToyBcosCNN."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return {"cnn": ToyCNN, "bcos": ToyBcosCNN}[_toy_name(arch)](num_classes)


def toy_preprocess(arch: str, image_size: int = 64) -> Preprocess:
    """Input convention of a toy backbone: the CNN takes standardised RGB, B-cos raw [0, 1] RGB."""
    if _toy_name(arch) == "bcos":  # B-cos encodes colour through [x, 1 - x]; no normalisation
        return Preprocess(size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    return Preprocess(size=image_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
