"""Plain networks: torchvision ResNets with a choice of stem. No Lightning, no environment."""

from __future__ import annotations

import urllib.error

import torchvision
from torch import nn

from cifar_job import CifarJobError


def build_network(
    arch: str = "resnet34", stem: str = "cifar", num_classes: int = 10, pretrained: bool = False
) -> nn.Module:
    """A torchvision ResNet with a `num_classes` head.

    stem="cifar" swaps the 7x7/stride-2 conv and max-pool for a 3x3/stride-1 conv: on 32x32
    images the ImageNet stem shrinks the input to 8x8 before the first block, which costs
    accuracy (and is about 20x cheaper). stem="imagenet" is torchvision's model unchanged.
    With pretrained=True the body starts from ImageNet weights; the head (and a cifar stem)
    are new.
    """
    if arch not in ("resnet18", "resnet34", "resnet50"):
        raise ValueError(f"unknown architecture {arch!r}: use resnet18, resnet34 or resnet50")
    weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
    try:
        net = torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, OSError) as e:
        raise CifarJobError(
            f"could not fetch ImageNet weights for {arch} ({getattr(e, 'reason', e)}). "
            "--pretrained needs internet, or the weights already in torch's cache "
            "(TORCH_HOME): run once where there is internet, or drop --pretrained."
        ) from None
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}: use cifar or imagenet")
    return net
