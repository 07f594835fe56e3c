"""i-CutMix (Lee et al., ICLR 2021, "i-Mix"): CutMix for contrastive learning with virtual labels.

Each sample of a batch is its own class. The query views are mixed with a permutation of
themselves: a random box of image ``permutation[i]`` is pasted into image ``i``, so row ``i`` is
a share ``lam`` of its own image and ``1 - lam`` of its partner's. Its contrastive target is mixed
the same way: ``lam`` on its own key and ``1 - lam`` on the partner's key (the loss side is in
:mod:`hf_sslbd.methods.losses`: ``imix_infonce_loss``, ``imix_nt_xent_loss``). PatchSearch
(Tejankar et al., CVPR 2023) retrains on its filtered data with it: a trigger patch that survived
filtering is pasted onto other images and its target shared with them, which keeps the model from
tying the patch to one cluster.

As in the i-Mix and PatchSearch code, one ``lam`` and one box serve the whole batch: ``lam`` is
drawn from ``Beta(alpha, alpha)``, folded to ``max(lam, 1 - lam)`` (each image keeps the larger
share), the box gets side ``sqrt(1 - lam)`` of the image's, a uniformly random centre, and is
clipped to the image; ``lam`` is then recomputed from the clipped area, so it is the exact share
of pixels that stayed. ``alpha = 1`` (uniform ``lam``) is the default of both codes.

Randomness comes from torch's global RNG, like kornia's views, so the trainer's ``seed`` fixes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import MethodConfig

#: i-Mix's and PatchSearch's default Beta concentration (``--alpha 1.0``)
DEFAULT_ICUTMIX_ALPHA = 1.0


@dataclass(frozen=True)
class CutMixed:
    """A CutMixed batch: ``images[i]`` holds the box ``(top, left, height, width)`` of image
    ``permutation[i]``; ``lam`` is the share of each image's pixels that are its own."""

    images: Tensor
    permutation: Tensor
    lam: float
    box: tuple[int, int, int, int]


def check_icutmix(config: MethodConfig) -> None:
    """Validate a config's ``icutmix_alpha`` (None = off, else > 0) and ``icutmix_prob`` (0, 1]."""
    name = type(config).__name__
    alpha, prob = config.icutmix_alpha, config.icutmix_prob
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"{name}.icutmix_alpha must be a number > 0 or None (off), got {alpha!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(
                f"{name}.icutmix_alpha must be > 0 (the Beta(alpha, alpha) concentration; "
                f"{DEFAULT_ICUTMIX_ALPHA} in i-Mix and PatchSearch) or None to turn i-CutMix off, got {alpha}"
            )
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 < prob <= 1:
        raise ValueError(f"{name}.icutmix_prob must be in (0, 1], got {prob!r}")


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A random box ``(top, left, box_height, box_width)`` covering about ``1 - lam`` of an
    ``height x width`` image: sides ``sqrt(1 - lam)`` of the image's around a uniform centre,
    clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y = int(torch.randint(height, ()))
    centre_x = int(torch.randint(width, ()))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y - cut_h // 2 + cut_h, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x - cut_w // 2 + cut_w, width)
    return top, left, max(bottom - top, 0), max(right - left, 0)


def icutmix(images: Tensor, alpha: float, prob: float = 1.0) -> CutMixed:
    """CutMix ``images`` (``(B, C, H, W)``) with a random permutation of the batch.

    With probability ``1 - prob`` the batch is left as it is: identity permutation, ``lam = 1``,
    an empty box (the mixed losses then reduce to their plain form).
    """
    if images.dim() != 4:
        raise ValueError(f"icutmix takes a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if not alpha > 0:
        raise ValueError(f"icutmix alpha must be > 0, got {alpha}")
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    if prob < 1.0 and float(torch.rand(())) >= prob:
        identity = torch.arange(batch, device=images.device)
        return CutMixed(images, identity, 1.0, (0, 0, 0, 0))
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    lam = max(lam, 1.0 - lam)
    permutation = torch.randperm(batch, device=images.device)
    top, left, box_h, box_w = cutmix_box(height, width, lam)
    mixed = images.clone()
    rows, cols = slice(top, top + box_h), slice(left, left + box_w)
    mixed[..., rows, cols] = images[permutation][..., rows, cols]
    # the exact share of pixels each image kept (the box was rounded and clipped)
    lam = 1.0 - box_h * box_w / (height * width)
    return CutMixed(mixed, permutation, lam, (top, left, box_h, box_w))
