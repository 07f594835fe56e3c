"""Backbones from ``transformers``: build one from a named preset or load one (Hub id or folder),
and get pooled features from any family with one function.

Presets (``BACKBONES``) are configs, never weights: nothing is downloaded. ``-cifar`` presets use
the small-image stem of :mod:`hf_sslbd.models.resnet_cifar`; the others are stock architectures
that ``AutoModel.from_pretrained`` loads without hf_sslbd.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    ConvNextConfig,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ViTConfig,
)

from .models import ResNetCifarConfig


def _resnet(depths: list[int], layer_type: str, widths: list[int]) -> Callable[..., PretrainedConfig]:
    def make(
        width: int | None = None, stem_stride: int | None = None, cifar: bool = False
    ) -> PretrainedConfig:
        scale = 1.0 if width is None else width / widths[0]
        hidden = [int(round(w * scale)) for w in widths]
        if layer_type == "bottleneck":  # bottleneck outputs are 4x the block width
            hidden = [4 * h for h in hidden]
        common = dict(
            depths=depths,
            layer_type=layer_type,
            hidden_sizes=hidden,
            embedding_size=int(round(widths[0] * scale)),
        )
        if cifar:
            return ResNetCifarConfig(
                stem_kernel_size=3, stem_stride=stem_stride or 1, stem_max_pool=False, **common
            )
        if stem_stride is not None:
            raise ValueError("stem_stride applies to the -cifar presets only; the stock stem is 7x7 stride 2")
        return ResNetConfig(**common)

    return make


_RESNET18 = _resnet([2, 2, 2, 2], "basic", [64, 128, 256, 512])
_RESNET10 = _resnet([1, 1, 1, 1], "basic", [64, 128, 256, 512])
_RESNET50 = _resnet([3, 4, 6, 3], "bottleneck", [64, 128, 256, 512])


def _vit(hidden: int, layers: int, heads: int) -> Callable[..., PretrainedConfig]:
    def make(image_size: int = 224, patch_size: int | None = None) -> PretrainedConfig:
        patch = patch_size or (16 if image_size >= 128 else 4)
        return ViTConfig(
            image_size=image_size,
            patch_size=patch,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
        )

    return make


def _convnext(depths: list[int], widths: list[int]) -> Callable[..., PretrainedConfig]:
    def make() -> PretrainedConfig:
        return ConvNextConfig(depths=depths, hidden_sizes=widths)

    return make


#: preset name -> (factory, description). Factories take the keyword overrides documented in
#: :func:`backbone_config`.
BACKBONES: dict[str, tuple[Callable[..., PretrainedConfig], str]] = {
    "resnet18": (_RESNET18, "stock ResNet-18 (7x7 stem, max-pool): 224 px images"),
    "resnet50": (_RESNET50, "stock ResNet-50 (7x7 stem, max-pool): 224 px images"),
    "resnet18-cifar": (lambda **kw: _RESNET18(cifar=True, **kw), "ResNet-18, 3x3 stride-1 stem, no max-pool"),
    "resnet10-cifar": (lambda **kw: _RESNET10(cifar=True, **kw), "ResNet-10 ([1,1,1,1] blocks), CIFAR stem"),
    "resnet50-cifar": (lambda **kw: _RESNET50(cifar=True, **kw), "ResNet-50, CIFAR stem"),
    "vit-small": (_vit(384, 12, 6), "ViT-S (patch 16 at >= 128 px, 4 below)"),
    "vit-tiny": (_vit(192, 12, 3), "ViT-Ti (patch 16 at >= 128 px, 4 below)"),
    "convnext-tiny": (_convnext([3, 3, 9, 3], [96, 192, 384, 768]), "ConvNeXt-T"),
}


def backbone_config(
    name: str,
    image_size: int = 224,
    width: int | None = None,
    stem_stride: int | None = None,
) -> PretrainedConfig:
    """The config of a named preset. ``width`` scales a ResNet's channels (64 = standard);
    ``stem_stride`` (1 or 2) sets a -cifar stem's stride; ``image_size`` sizes a ViT."""
    if name not in BACKBONES:
        known = ", ".join(f"{k} ({d})" for k, (_, d) in BACKBONES.items())
        raise ValueError(f"unknown backbone {name!r}; known presets: {known}; or pass a Hub id or folder")
    factory = BACKBONES[name][0]
    if name.startswith("vit"):
        if width is not None or stem_stride is not None:
            raise ValueError(f"width / stem_stride do not apply to {name!r}")
        return factory(image_size=image_size)
    if name.startswith("convnext"):
        if width is not None or stem_stride is not None:
            raise ValueError(f"width / stem_stride do not apply to {name!r}")
        return factory()
    if stem_stride is not None and stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    if width is not None and width < 1:
        raise ValueError(f"width must be a positive number of channels, got {width}")
    return factory(width=width, stem_stride=stem_stride)


def build_backbone(
    name_or_path: str,
    image_size: int = 224,
    width: int | None = None,
    stem_stride: int | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """A backbone from a preset name (random init) or from pretrained weights (Hub id or folder)."""
    if name_or_path in BACKBONES:
        config = backbone_config(name_or_path, image_size=image_size, width=width, stem_stride=stem_stride)
        return model_from_config(config)
    if width is not None or stem_stride is not None:
        raise ValueError("width / stem_stride only apply to presets, not to pretrained weights")
    if not os.path.isdir(name_or_path) and "/" not in name_or_path:
        backbone_config(name_or_path)  # raises with the list of presets
    return AutoModel.from_pretrained(name_or_path, revision=revision)


def model_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialised backbone for ``config`` (ViT without its tanh pooler)."""
    if isinstance(config, ViTConfig):
        from transformers import ViTModel

        return ViTModel(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def backbone_config_from_dict(config_dict: dict) -> PretrainedConfig:
    """Rebuild a backbone config saved with ``config.to_dict()``."""
    config_dict = dict(config_dict)
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


def feature_dim(config: PretrainedConfig) -> int:
    """Width of the pooled features of a backbone with this config."""
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    raise ValueError(f"cannot tell the feature width of a {type(config).__name__}")


def pooled_features(model: PreTrainedModel, pixel_values: Tensor) -> Tensor:
    """(B, D) features: global average pool for CNNs, the [CLS] token for ViTs."""
    return pool_output(model, model(pixel_values=pixel_values))


def pool_output(model: PreTrainedModel, output: Any) -> Tensor:
    """The (B, D) features of a forward pass's ``output`` (as :func:`pooled_features`)."""
    if isinstance(model.config, ViTConfig):
        return output.last_hidden_state[:, 0]
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = output.last_hidden_state
    return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


def check_image_size(config: PretrainedConfig, image_size: int) -> None:
    """Raise if the backbone cannot take images of this size."""
    vit_size = getattr(config, "image_size", None)
    if isinstance(config, ViTConfig) and vit_size != image_size:
        raise ValueError(
            f"this ViT takes {vit_size} px images (patch {config.patch_size}), got {image_size} px; "
            "build it with image_size set, or resize the data"
        )
    if image_size < 8:
        raise ValueError(f"image size {image_size} px is too small for any backbone here")


@torch.no_grad()
def describe(model: PreTrainedModel) -> str:
    """One line: family, parameters, feature width."""
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({params / 1e6:.2f}M parameters, {feature_dim(model.config)}-d features)"
