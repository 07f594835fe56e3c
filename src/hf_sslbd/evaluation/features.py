"""Frozen features of a dataset split from any backbone: batched, no autograd, mixed precision
where it helps, ``channels_last`` for CNNs, a progress bar, and a cache on disk.

The cache file is ``<cache_dir>/features-<key>.safetensors`` (``features`` float32 (N, D) and
``labels`` int64 (N,)); the key hashes the model's weights and config, the dataset's fingerprint
and size, the image / label columns, the preprocessing and the precision, so a changed model, split
or preprocessing never hits a stale file, and a rerun with the same inputs is a file read.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ViTConfig

from ..backbones import check_image_size, pooled_features
from ..data import content_fingerprint, find_image_column, find_label_column
from ..preprocessing import Preprocessing, images_to_batch, normalize

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CACHE_VERSION = 1


class FeatureSet(NamedTuple):
    """Features (N, D) float32 and labels (N,) int64 (``None`` when the split has no labels)."""

    features: Tensor
    labels: Tensor | None


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values) and the config."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset: datasets.Dataset, columns: list[str] | None = None) -> str:
    """A hash of the rows' content in ``columns`` (all by default), in row order.

    Not ``datasets``' own ``_fingerprint``: for data loaded from files it follows the cache folder,
    so the same rows read from a folder that gained a file would miss the cache."""
    return content_fingerprint(dataset.select_columns(columns) if columns else dataset)


def _preprocessing_dict(preprocessing: Preprocessing) -> dict[str, Any]:
    raw = asdict(preprocessing) if is_dataclass(preprocessing) else dict(vars(preprocessing))
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in raw.items()}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (``None`` = fp32). ``auto``: bf16 on GPUs that support it, else fp16 on
    GPU; fp32 on CPU (bf16 autocast on a CPU without bf16 matmul units is slower, and changes the
    features; ask for ``bf16`` explicitly if your CPU has them)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {list(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def uses_channels_last(model: torch.nn.Module) -> bool:
    """True for convolutional backbones (ResNet, ConvNeXt); ViTs gain nothing from it."""
    if isinstance(getattr(model, "config", None), ViTConfig):
        return False
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


class _Batches(torch.utils.data.Dataset):
    """One item = one decoded uint8 batch, so a DataLoader's workers can decode ahead."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        preprocessing: Preprocessing,
        batch_size: int,
    ) -> None:
        columns = [image_column] + ([label_column] if label_column else [])
        # undecoded bytes: images_to_batch decodes once, in the worker
        self.dataset = dataset.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column = image_column, label_column
        self.preprocessing, self.batch_size = preprocessing, batch_size

    def __len__(self) -> int:
        return (self.dataset.num_rows + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | None]:
        start = index * self.batch_size
        rows = range(start, min(start + self.batch_size, self.dataset.num_rows))
        batch = self.dataset[start : rows.stop]
        images = images_to_batch(batch[self.image_column], self.preprocessing, rows=list(rows))
        labels = torch.as_tensor(batch[self.label_column], dtype=torch.long) if self.label_column else None
        return images, labels


def _collate(item: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
    return item


def cache_key(
    model_fp: str,
    dataset_fp: str,
    image_column: str,
    label_column: str | None,
    preprocessing: Preprocessing,
    precision: torch.dtype | None,
) -> str:
    payload = json.dumps(
        {
            "version": CACHE_VERSION,
            "model": model_fp,
            "dataset": dataset_fp,
            "image_column": image_column,
            "label_column": label_column,
            "preprocessing": _preprocessing_dict(preprocessing),
            "precision": str(precision),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _read_cache(path: Path) -> FeatureSet | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        features = handle.get_tensor("features")
        labels = handle.get_tensor("labels") if "labels" in handle.keys() else None
    return FeatureSet(features, labels)


@torch.inference_mode()
def extract_features(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    dataset: datasets.Dataset,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "auto",
    channels_last: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "features",
) -> FeatureSet:
    """Pooled features of every row of ``dataset`` (in row order) and its labels.

    ``image_column`` / ``label_column`` are detected when not given (a split without a label
    column gives ``labels=None``). The model is moved to ``device`` (and to ``channels_last`` for
    CNNs unless ``channels_last=False``; both stay, neither changes its outputs) and run in eval
    mode; its train/eval mode is restored afterwards. With ``cache_dir`` the result is read from /
    written to the cache.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"extract_features takes a datasets.Dataset (one split), got {type(dataset).__name__}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    image_column = find_image_column(dataset.features, image_column)
    if label_column is None:
        try:
            label_column = find_label_column(dataset.features)
        except ValueError:
            label_column = None  # unlabeled split: features only
    else:
        label_column = find_label_column(dataset.features, label_column)
    if getattr(model, "config", None) is not None:
        check_image_size(model.config, preprocessing.image_size)
    device = resolve_device(device)
    autocast_dtype = resolve_precision(precision, device)

    path = None
    if cache_dir is not None:
        key = cache_key(
            model_fingerprint(model),
            # the columns the features are computed from: other columns do not change them
            dataset_fingerprint(dataset, [image_column] + ([label_column] if label_column else [])),
            image_column,
            label_column,
            preprocessing,
            autocast_dtype,
        )
        path = Path(cache_dir) / f"features-{key}.safetensors"
        cached = _read_cache(path)
        if cached is not None:
            return cached

    memory_format = (
        torch.channels_last
        if (channels_last if channels_last is not None else uses_channels_last(model))
        else torch.contiguous_format
    )
    was_training = model.training
    model.eval().to(device=device, memory_format=memory_format)
    loader = torch.utils.data.DataLoader(
        _Batches(dataset, image_column, label_column, preprocessing, batch_size),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    chunks, label_chunks = [], []
    try:
        for images, labels in tqdm(loader, desc=description, unit="batch", disable=not progress):
            pixels = normalize(images.to(device, non_blocking=True), preprocessing.mean, preprocessing.std)
            pixels = pixels.contiguous(memory_format=memory_format)
            with autocast:
                chunks.append(pooled_features(model, pixels).float().cpu())
            if labels is not None:
                label_chunks.append(labels)
    finally:
        model.train(was_training)
    width = chunks[0].shape[1] if chunks else 0
    result = FeatureSet(
        torch.cat(chunks) if chunks else torch.zeros(0, width),
        (torch.cat(label_chunks) if label_chunks else torch.zeros(0, dtype=torch.long))
        if label_column
        else None,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": result.features.contiguous()}
        if result.labels is not None:
            tensors["labels"] = result.labels.contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(
            tensors,
            str(tmp),
            metadata={
                "image_column": image_column,
                "label_column": str(label_column),
                "num_rows": str(dataset.num_rows),
            },
        )
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry
    return result
