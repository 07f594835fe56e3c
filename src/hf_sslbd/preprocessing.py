"""Images from dataset rows to tensors: decode to uint8 (B, 3, H, W), resize for evaluation, and
normalise. Shared by training, evaluation and the defenses so that all of them see the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """How pixels reach an encoder: optional resize of the short side to ``resize_size`` then a
    centre crop to ``image_size`` (the paper's Resize(256) + CenterCrop(224) at 224 px; nothing at
    32 px), then normalisation with ``mean`` / ``std``."""

    image_size: int = 32
    resize_size: int | None = None
    mean: Sequence[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Sequence[float] = field(default_factory=lambda: list(IMAGENET_STD))

    @classmethod
    def for_image_size(cls, image_size: int) -> Preprocessing:
        """The paper's protocol: images of 224 px and above are resized to 256/224 of the crop."""
        resize = int(round(image_size * 256 / 224)) if image_size >= 128 else None
        return cls(image_size=image_size, resize_size=resize)


class CorruptImageError(ValueError):
    """An image that cannot be decoded; the message names the row."""


def decode_image(value: object, row: int | None = None) -> Image.Image:
    """A dataset cell (PIL image, ``{"bytes", "path"}`` dict, or path) as an RGB PIL image."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            image = (
                Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
            )
        elif isinstance(value, str):
            image = Image.open(value)
        else:
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
        image.load()
    except Exception as error:  # PIL raises many kinds; name the row whatever it was
        where = f"row {row}" if row is not None else "an image"
        raise CorruptImageError(f"cannot decode {where}: {error}") from error
    return image.convert("RGB") if image.mode != "RGB" else image


def to_uint8_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_short_side_center_crop(images: Tensor, resize_size: int | None, crop_size: int) -> Tensor:
    """Resize so the short side is ``resize_size`` (antialiased bilinear), then centre-crop.

    Works on a (B, C, H, W) batch of one size or a (C, H, W) image; float in, float out."""
    single = images.dim() == 3
    batch = images[None] if single else images
    height, width = batch.shape[-2:]
    if resize_size is not None and min(height, width) != resize_size:
        scale = resize_size / min(height, width)
        size = (max(crop_size, round(height * scale)), max(crop_size, round(width * scale)))
        batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
        height, width = size
    if height < crop_size or width < crop_size:
        batch = F.interpolate(batch, size=(crop_size, crop_size), mode="bilinear", antialias=True)
        height, width = crop_size, crop_size
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    batch = batch[..., top : top + crop_size, left : left + crop_size]
    return batch[0] if single else batch


def images_to_batch(
    values: Sequence[object], preprocessing: Preprocessing, rows: Sequence[int] | None = None
) -> Tensor:
    """Decode dataset cells and bring them to one size: uint8 (B, 3, S, S), not yet normalised."""
    tensors = []
    for index, value in enumerate(values):
        image = to_uint8_tensor(decode_image(value, None if rows is None else rows[index]))
        if image.shape[-2:] != (preprocessing.image_size, preprocessing.image_size):
            image = (
                resize_short_side_center_crop(
                    image.float(), preprocessing.resize_size, preprocessing.image_size
                )
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        tensors.append(image)
    return torch.stack(tensors)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or [0, 1] float (B, 3, H, W) -> normalised float."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
