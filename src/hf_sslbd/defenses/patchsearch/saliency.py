"""Grad-CAM of the similarity to a cluster centre, and the window of the image it points at.

PatchSearch's first step: for an image of cluster ``c``, the backbone's features are compared to
the centre of ``c`` (cosine similarity, the logit of a "k-means classifier"); Grad-CAM of that
score on a feature map (the paper: the last stage of a ResNet, the last block of a ViT) shows which
pixels make the image belong to its cluster. In a poisoned cluster that is the trigger. The
``window`` x ``window`` square with the largest saliency sum is the candidate trigger.

Written here with plain autograd (no forked grad-cam package): one forward pass with
``output_hidden_states=True``, the gradient of the summed scores with respect to the chosen hidden
state (the images of a batch are independent in eval mode), channel weights = spatial mean of the
gradient, map = ReLU(sum of weighted channels), resized to the input and min-max scaled per image.

What it shows: on a map that is average-pooled into the features, the map of a cosine score sums
to zero before the ReLU (the gradient of a cosine is orthogonal to the features), so the positive
part marks the regions that pull the image towards the centre more than the image as a whole
does: the trigger, which all members of a poisoned cluster share, rather than each image's own
content. The map must also be fine enough to place the window (see :func:`auto_layer`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, ViTConfig

from ...backbones import pool_output
from ...preprocessing import Preprocessing, normalize


class WindowSizeError(ValueError):
    """A window that does not fit in the image."""


def check_window(window: int, image_size: int) -> None:
    """Raise unless ``1 <= window <= image_size``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise WindowSizeError(f"window size must be a positive number of pixels, got {window!r}")
    if window > image_size:
        raise WindowSizeError(
            f"window of {window} px is larger than the {image_size} px images the model takes; "
            f"use a window of at most {image_size} px (about the trigger's size)"
        )


def _as_map(hidden: Tensor) -> Tensor:
    """A hidden state as a (B, C, h, w) map: CNN maps as they are; ViT tokens without the [CLS]
    (and any register) tokens, laid out on their square grid."""
    if hidden.dim() == 4:
        return hidden
    if hidden.dim() != 3:
        raise ValueError(f"cannot take Grad-CAM of a hidden state of shape {tuple(hidden.shape)}")
    tokens = hidden.shape[1]
    for extra in range(0, min(tokens, 9)):
        side = math.isqrt(tokens - extra)
        if side * side == tokens - extra and side > 0:
            grid = hidden[:, extra:]
            return grid.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)
    raise ValueError(f"{tokens} tokens do not form a square grid of patches")


def auto_layer(
    model: PreTrainedModel, hidden_states: tuple[Tensor, ...], image_size: int, max_cell: float | None
) -> int:
    """The hidden state Grad-CAM uses by default (see :func:`similarity_cam`).

    Why a cell limit: a map of cells larger than the window cannot say where the window is (a 2x2
    last stage, as a ResNet with a stride-2 stem has at 32 px, puts every window in a corner). The
    caller passes half the window (:func:`find_candidate_windows`); at 224 px with the paper's 60 px
    window that is the 14x14 stage of a ResNet, one finer than the paper's 7x7 last stage."""
    if isinstance(model.config, ViTConfig):
        return -2
    if max_cell is None:
        return -1
    for index in range(len(hidden_states) - 1, -1, -1):
        hidden = hidden_states[index]
        if hidden.dim() == 4 and image_size / hidden.shape[-1] <= max_cell:
            return index - len(hidden_states)
    return -len(hidden_states)


def similarity_cam(
    model: PreTrainedModel,
    pixels: Tensor,
    preprocessing: Preprocessing,
    centroids: Tensor,
    clusters: Tensor,
    layer: int | None = None,
    max_cell: float | None = None,
) -> Tensor:
    """(B, H, W) Grad-CAM maps in [0, 1] of the cosine similarity between each image's pooled
    features and the centroid of its cluster.

    ``pixels``: uint8 or [0, 1] float (B, 3, H, W) at the model's input size (not normalised);
    ``centroids`` (k, D); ``clusters`` (B,) the cluster of each image; ``layer`` indexes the
    model's ``hidden_states``. None chooses: for a ViT the input of its last block (-2: the [CLS]
    token of the last output depends on no other token of that output, so the gradient reaches
    the patch tokens only through the last block's attention; the paper takes the last block's
    first norm); for a CNN the deepest map whose cells are at most ``max_cell`` px (default: the
    last stage). See :func:`auto_layer`."""
    device = next(model.parameters()).device
    x = normalize(pixels.to(device), preprocessing.mean, preprocessing.std)
    target = F.normalize(centroids.to(device, torch.float32)[clusters.to(device)], dim=1)
    with torch.enable_grad():
        output = model(pixel_values=x, output_hidden_states=True)
        if layer is None:
            layer = auto_layer(model, output.hidden_states, pixels.shape[-1], max_cell)
        hidden = output.hidden_states[layer]
        features = F.normalize(pool_output(model, output).float(), dim=1)
        score = (features * target).sum()
        (grad,) = torch.autograd.grad(score, hidden)
    activation, grad = _as_map(hidden.detach()).float(), _as_map(grad).float()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(1).values.view(-1, 1, 1)
    high = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return ((cam - low) / (high - low).clamp_min(1e-7)).cpu()


def best_window(cam: Tensor, window: int) -> Tensor:
    """(B, 2) top-left corners (y, x) of the ``window`` x ``window`` squares with the largest sum
    of ``cam`` (B, H, W); the first one in row-major order on ties."""
    check_window(window, min(cam.shape[-2:]))
    sums = F.avg_pool2d(cam.unsqueeze(1).double(), window, stride=1)[:, 0]
    flat = sums.flatten(1).argmax(1)
    width = sums.shape[-1]
    return torch.stack([flat // width, flat % width], dim=1)


def crop_windows(images: Tensor, corners: Tensor, window: int) -> Tensor:
    """(B, C, window, window) crops of ``images`` (B, C, H, W) at the ``corners`` (y, x)."""
    return torch.stack(
        [
            image[:, y : y + window, x : x + window]
            for image, (y, x) in zip(images, corners.tolist(), strict=True)
        ]
    )


def find_candidate_windows(
    model: PreTrainedModel,
    images: Tensor,
    preprocessing: Preprocessing,
    centroids: Tensor,
    clusters: Tensor,
    window: int,
    layer: int | None = None,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """The candidate trigger of each image: its ``window`` crop where the similarity-to-centre
    Grad-CAM is largest (on ``layer``; None: :func:`auto_layer` with cells up to half the window). Returns (windows (B, 3, w, w) of the same dtype as ``images``, corners
    (B, 2) as (y, x))."""
    check_window(window, min(images.shape[-2:]))
    corners = []
    for start in range(0, images.shape[0], batch_size):
        cam = similarity_cam(
            model,
            images[start : start + batch_size],
            preprocessing,
            centroids,
            clusters[start : start + batch_size],
            layer,
            max_cell=window / 2,
        )
        corners.append(best_window(cam, window))
    corners = torch.cat(corners) if corners else torch.zeros(0, 2, dtype=torch.long)
    return crop_windows(images, corners, window) if len(corners) else images[:, :, :window, :window], corners
