"""SSL pretraining with Accelerate: one loop for every method (the method says *what* to compute,
:mod:`hf_sslbd.loop` *how* to train, the loop the distillation defense runs too), shaped like
transformers' ``run_mim_no_trainer.py``; this module supplies the data, model and outputs.

Data. The image column of ``--dataset`` (a Hub id or a folder) is decoded to uint8 tensors in the
DataLoader (workers configurable), brought to one load size (``load_size``, default
``image_size``: short side resized then centre-cropped, so high-resolution data gives same-size
batches; CIFAR at 32 px is left as is) and moved to the device as uint8; the METHOD builds its
augmented views there (kornia, batched).

Optimisation. ``learning_rate`` is the base rate for a batch of 256: the rate used is
``learning_rate * effective_batch / 256`` with ``effective_batch = per_device_train_batch_size *
num_processes * gradient_accumulation_steps`` (the linear scaling rule of Goyal et al., used by
SimCLR, MoCo, BYOL). Linear warm-up over ``warmup_epochs``, then cosine decay to 0, per optimizer
step. Norm weights and biases (every parameter with fewer than 2 dimensions) get no weight decay.
Unset learning rate / weight decay / optimizer come from :data:`OPTIMIZATION_DEFAULTS`.

Reproducibility and resume. The sampler's order in epoch ``e`` is a function of ``(seed, e)``,
and the torch RNG is re-seeded from ``(seed, epoch, batch, rank)`` before every micro-batch, so
the views do not depend on what ran before. Checkpoints are ``output_dir/checkpoints/step_N``
(``accelerator.save_state`` + ``trainer_state.json``); ``--resume_from_checkpoint latest``
restores one and skips the batches already seen (``skip_first_batches``): the resumed run ends
with the same parameters as an uninterrupted one.

Outputs. ``output_dir``: the full SSL model (``save_pretrained``; its config records these
arguments, the resolved schedule and the data's provenance, including the poisoning config of a
poisoned variant), ``output_dir/backbone`` (a stock ``transformers`` backbone + preprocessor
config), ``train_log.jsonl`` (loss, lr, images/s, data-loading share per logging step; k-NN
accuracy if monitored) and TensorBoard logs when tensorboard is installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ViTConfig

from .backbones import BACKBONES, backbone_config, check_image_size
from .data import content_fingerprint, find_image_column, find_label_column, load_image_dataset
from .loop import (
    LOG_NAME,
    OPTIMIZERS,
    TRAINER_STATE_NAME,
    CheckpointError,
    JsonlLog,
    LoopState,
    RunSteps,
    Schedule,
    TrainingLoop,
    finish,
    identity_collate,
    learning_rate_at,
    list_checkpoints,
    make_accelerator,
    make_loader,
    make_optimizer,
    open_log,
    parameter_groups,
    prepare_output_dir,
    resume,
    run_identity,
    scaled_learning_rate,
)
from .modeling import SSLConfig, SSLModel, _architecture, export_backbone, load_encoder
from .preprocessing import Preprocessing, images_to_batch

logger = logging.getLogger(__name__)

REPORT_TO = ("auto", "tensorboard", "none")
MIXED_PRECISION = ("no", "bf16", "fp16")

#: Starting points at batch 256 (scaled linearly to the effective batch), per method:
#: (optimizer, base learning rate, weight decay). SimCLR's is the recipe run on CIFAR-10 here
#: (see the research note); the others are the CIFAR settings of the methods' own papers or
#: code (MoCo v2 CIFAR demo, SimSiam CIFAR, MSF and BYOL as measured here), to be tuned.
#: ViT backbones default to AdamW (lr 5e-4 at 256, wd 0.05) whatever the method.
OPTIMIZATION_DEFAULTS: dict[str, tuple[str, float, float]] = {
    "simclr": ("sgd", 0.3, 5e-4),
    "mocov2": ("sgd", 0.06, 5e-4),
    "byol": ("sgd", 0.5, 1e-4),
    "msf": ("sgd", 0.05, 1e-4),
    "simsiam": ("sgd", 0.03, 5e-4),
    "rotnet": ("sgd", 0.1, 5e-4),
    "jigsaw": ("sgd", 0.1, 5e-4),
}
FALLBACK_OPTIMIZATION = ("sgd", 0.05, 5e-4)
VIT_OPTIMIZATION = ("adamw", 5e-4, 0.05)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PretrainArguments:
    """Every setting of a pretraining run (command line and YAML via ``HfArgumentParser``)."""

    dataset: str = _help("Hub dataset id or local folder (Hub layout or save_to_disk output).")
    output_dir: str = _help("Where the model, backbone/, checkpoints/ and logs go.")
    dataset_config: str | None = _help("Dataset config, e.g. a poisoned variant name.", default=None)
    dataset_revision: str | None = _help("Dataset revision (Hub branch, tag or commit).", default=None)
    train_split: str = _help("Split to pretrain on.", default="train")
    image_column: str | None = _help("Image column (default: found automatically).", default=None)
    max_train_samples: int | None = _help(
        "Train on this many rows (a seeded random subset); all rows if unset.", default=None
    )
    load_size: int | None = _help(
        "Side of the square images fed to the views: short side resized to it, centre-cropped "
        "(default image_size; 32 px data at 32 is left untouched). Use e.g. 256 for 224 px training.",
        default=None,
    )
    method: str = _help(
        "SSL method: simclr, mocov2, byol, msf, simsiam, rotnet, jigsaw (hf_sslbd.methods.METHODS).",
        default="simclr",
    )
    method_config: dict | str | None = _help(
        "Overrides of the method config dataclass, as JSON (e.g. '{\"temperature\": 0.5}') or a "
        "YAML mapping; unset fields keep the method's defaults.",
        default=None,
    )
    backbone: str = _help(f"Backbone preset: {', '.join(BACKBONES)}.", default="resnet18-cifar")
    model_name_or_path: str | None = _help(
        "Start from these pretrained weights (Hub id or folder) instead of a random preset.", default=None
    )
    backbone_width: int | None = _help(
        "ResNet presets: channels of the first stage (64 standard).", default=None
    )
    stem_stride: int | None = _help(
        "-cifar presets: stem stride 1 (standard) or 2 (4x cheaper).", default=None
    )
    image_size: int = _help("Side of the training views in px.", default=32)
    per_device_train_batch_size: int = _help("Images per device per micro-batch.", default=256)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    num_train_epochs: int = _help("Epochs (ignored when max_train_steps is set).", default=10)
    max_train_steps: int | None = _help("Total optimizer steps; overrides num_train_epochs.", default=None)
    stop_after_step: int | None = _help(
        "Checkpoint and stop at this optimizer step without changing the schedule (split a long run "
        "into jobs; continue with --resume_from_checkpoint latest).",
        default=None,
    )
    learning_rate: float | None = _help(
        "Base learning rate for a batch of 256, scaled by effective_batch/256 (default: per method).",
        default=None,
    )
    weight_decay: float | None = _help(
        "Weight decay, not applied to norms and biases (default: per method).", default=None
    )
    optimizer: str | None = _help("sgd (momentum) or adamw (default: sgd; adamw for ViT).", default=None)
    momentum: float = _help("SGD momentum.", default=0.9)
    warmup_epochs: float = _help("Linear warm-up length in epochs, then cosine decay to 0.", default=1.0)
    max_grad_norm: float | None = _help("Clip the gradient norm to this (off when unset).", default=None)
    mixed_precision: str = _help("no, bf16 or fp16.", default="no")
    seed: int = _help("Seed of everything: init, sampling order, views.", default=0)
    checkpointing_steps: int | None = _help("Also checkpoint every N optimizer steps.", default=None)
    checkpoint_every_epoch: bool = _help("Checkpoint at the end of every epoch.", default=True)
    checkpoints_total_limit: int | None = _help("Keep only the newest N checkpoints.", default=None)
    resume_from_checkpoint: str | None = _help(
        "'latest' (newest in output_dir/checkpoints), a checkpoint folder, or 'auto' (latest when "
        "there is one, else a fresh start: one command that starts and continues a run).",
        default=None,
    )
    overwrite_output_dir: bool = _help(
        "Allow writing into an output_dir that already holds a run.", default=False
    )
    report_to: str = _help(
        "auto (TensorBoard when installed), tensorboard or none; JSONL always.", default="auto"
    )
    logging_steps: int = _help("Log every N optimizer steps.", default=10)
    knn_monitor: bool = _help("Monitor k-NN accuracy on a held-out labelled split.", default=False)
    knn_split: str = _help("Held-out split for the k-NN monitor (bank and queries).", default="test")
    knn_label_column: str | None = _help("Label column of the k-NN split (default: found).", default=None)
    knn_bank_samples: int = _help("k-NN bank rows (a seeded subset of knn_split).", default=2000)
    knn_eval_samples: int = _help("k-NN query rows (other rows of knn_split).", default=1000)
    knn_k: int = _help("Neighbours of the k-NN monitor.", default=20)
    knn_every_epochs: int = _help("Run the k-NN monitor every N epochs (and at the end).", default=1)
    channels_last: bool | None = _help(
        "channels_last memory format (default: on for CNNs on CPU).", default=None
    )
    torch_compile: bool = _help("torch.compile the backbone's forward.", default=False)
    ddp_find_unused_parameters: bool = _help(
        "Several processes: let DDP skip parameters without gradients (slower; for methods that leave some unused).",
        default=False,
    )
    dataloader_num_workers: int = _help("DataLoader worker processes decoding images.", default=0)
    images_in_memory: bool | None = _help(
        "Decode every training image once and keep the uint8 tensor in memory (same pixels, no "
        "per-step decoding). Default: on when the decoded images take at most 2 GiB (CIFAR-10: 150 MB).",
        default=None,
    )
    disable_tqdm: bool = _help("No progress bar.", default=False)

    def __post_init__(self) -> None:
        if isinstance(self.method_config, str):
            try:
                self.method_config = json.loads(self.method_config) if self.method_config.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"method_config is not valid JSON ({error}): {self.method_config!r}"
                ) from error
        if self.method_config is not None and not isinstance(self.method_config, dict):
            raise TypeError(f"method_config must be a mapping, got {type(self.method_config).__name__}")
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        positive = (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "image_size",
        )
        positive += ("logging_steps", "knn_k", "knn_every_epochs", "knn_bank_samples", "knn_eval_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "stop_after_step", "checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {getattr(self, name)}")
        for name in ("max_train_samples", "load_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {getattr(self, name)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision {self.mixed_precision!r} is not one of {list(MIXED_PRECISION)}"
            )
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to {self.report_to!r} is not one of {list(REPORT_TO)}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 when set, got {self.max_grad_norm}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if self.load_size is not None and self.load_size < self.image_size:
            raise ValueError(f"load_size ({self.load_size}) must be >= image_size ({self.image_size})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Parsing (command line + YAML)


def yaml_to_argv(path: str | os.PathLike) -> list[str]:
    """A YAML file of ``PretrainArguments`` fields as ``--key value`` arguments (mappings as JSON),
    so that flags given after it on the command line override it."""
    import yaml

    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: expected a mapping of argument names to values, got {type(values).__name__}"
        )
    known = {f.name for f in dataclasses.fields(PretrainArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown arguments {unknown}; known: {sorted(known)}")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv += [f"--{key}", json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return argv


def parse_pretrain_args(
    argv: Sequence[str] | None = None, description: str | None = None
) -> PretrainArguments:
    """``PretrainArguments`` from the command line; a first argument ending in .yaml / .yml is a
    config file whose values the remaining flags override. ``description`` heads ``--help``."""
    import argparse

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_to_argv(argv[0]) + argv[1:]
    parser = HfArgumentParser(
        PretrainArguments, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


# --------------------------------------------------------------------------------------------------
# Data


#: decoded images up to this size are kept in memory when ``images_in_memory`` is unset (auto)
IMAGES_IN_MEMORY_AUTO_BYTES = 2 * 1024**3


class ImageRows(torch.utils.data.Dataset):
    """Rows of an image column, fetched a batch at a time (``__getitems__``) and decoded to a uint8
    ``(B, 3, S, S)`` tensor at ``preprocessing.image_size``.

    ``in_memory``: decode every row once up front and serve batches from that tensor (the same
    pixels, so the same run). Decoding 256 small PNG / JPEG images per step cost about 11% of a
    32 px SimCLR step on one CPU core; CIFAR-10 decoded is 150 MB. ``None`` (auto) does it when
    the decoded images take at most :data:`IMAGES_IN_MEMORY_AUTO_BYTES`."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        preprocessing: Preprocessing,
        in_memory: bool | None = False,
        progress: bool = False,
    ) -> None:
        # undecoded bytes: PIL decodes them in images_to_batch, without a round trip through datasets
        self.dataset = dataset.select_columns([image_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.column = image_column
        self.preprocessing = preprocessing
        size = preprocessing.image_size
        if in_memory is None:
            in_memory = len(self.dataset) * 3 * size * size <= IMAGES_IN_MEMORY_AUTO_BYTES
        self.images: Tensor | None = self._decode_all(progress) if in_memory else None

    def _decode_all(self, progress: bool, chunk: int = 1024) -> Tensor:
        size = self.preprocessing.image_size
        images = torch.empty((len(self.dataset), 3, size, size), dtype=torch.uint8)
        for start in tqdm(
            range(0, len(self.dataset), chunk), desc="Decoding images into memory", disable=not progress
        ):
            indices = list(range(start, min(start + chunk, len(self.dataset))))
            images[start : start + len(indices)] = self._decode(indices)
        return images

    def _decode(self, indices: list[int]) -> Tensor:
        values = self.dataset[indices][self.column]
        return images_to_batch(values, self.preprocessing, rows=indices)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> Tensor:
        if self.images is not None:
            return self.images[torch.as_tensor(indices, dtype=torch.long)]
        return self._decode(list(indices))

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]


def load_train_data(args: PretrainArguments) -> tuple[datasets.Dataset, str, dict[str, Any]]:
    """The training rows, their image column and the data provenance recorded in the model config."""
    dataset = load_image_dataset(
        args.dataset, args.dataset_config, split=args.train_split, revision=args.dataset_revision
    )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{args.dataset!r} split {args.train_split!r} is not a map-style Dataset: {type(dataset).__name__}"
        )
    image_column = find_image_column(dataset.features, args.image_column)
    total_rows = len(dataset)
    if args.max_train_samples is not None and args.max_train_samples < total_rows:
        order = np.random.default_rng(args.seed).permutation(total_rows)[: args.max_train_samples]
        dataset = dataset.select(np.sort(order))
    provenance: dict[str, Any] = {
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "revision": args.dataset_revision,
        "split": args.train_split,
        "image_column": image_column,
        "num_rows": len(dataset),
        "num_rows_in_split": total_rows,
        "fingerprint": content_fingerprint(dataset),
    }
    if "is_poisoned" in dataset.column_names:
        provenance["num_poisoned_rows"] = int(np.asarray(dataset["is_poisoned"]).sum())
    provenance["poisoning"] = _poisoning_info(args)
    return dataset, image_column, provenance


def _poisoning_info(args: PretrainArguments) -> dict | None:
    """The recorded poisoning config of a poisoned variant, or None (clean data / not recorded)."""
    if args.dataset_config is None:
        return None
    try:
        from .variants import load_variant_info
    except ImportError:  # degrade gracefully: provenance without the poisoning record
        return None
    try:
        return load_variant_info(args.dataset, args.dataset_config, revision=args.dataset_revision)
    except (ValueError, OSError) as error:
        logger.info("no poisoning record for %s / %s: %s", args.dataset, args.dataset_config, error)
        return None


# --------------------------------------------------------------------------------------------------
# Model and optimisation


def resolve_method_config(args: PretrainArguments) -> dict[str, Any]:
    """The method's config dataclass with ``args.method_config`` applied, validated, as a dict."""
    from .methods import METHODS, get_method_class

    method_class = get_method_class(args.method)  # raises with the known methods
    overrides = dict(args.method_config or {})
    known = {f.name for f in dataclasses.fields(method_class.config_class)}
    unknown = sorted(set(overrides) - known)
    if any(key.startswith("icutmix_") for key in unknown):
        fields_of = lambda cls: {f.name for f in dataclasses.fields(cls.config_class)}  # noqa: E731
        supported = sorted(name for name, cls in METHODS.items() if "icutmix_alpha" in fields_of(cls))
        raise ValueError(
            f"method {args.method!r} has no i-CutMix (method_config keys "
            f"{[key for key in unknown if key.startswith('icutmix_')]}): it is defined for {supported}"
        )
    if unknown:
        raise ValueError(
            f"method_config keys {unknown} are not fields of {method_class.config_class.__name__}: {sorted(known)}"
        )
    config = method_class.config_class(**overrides)
    config.validate()
    return config.to_dict()


def build_model(args: PretrainArguments, method_config: dict[str, Any], data: dict | None = None) -> SSLModel:
    """A fresh SSL model (backbone from a preset or pretrained weights) for these arguments."""
    pretrained = None
    if args.model_name_or_path is not None:
        if args.backbone_width is not None or args.stem_stride is not None:
            raise ValueError("backbone_width / stem_stride apply to presets, not to --model_name_or_path")
        # any AutoModel / exported backbone / SSL checkpoint; a ViT comes without its tanh pooler,
        # which pooled features never use (DDP would stop on its parameters without gradients)
        pretrained = load_encoder(args.model_name_or_path)[0].train()
        config = pretrained.config
    else:
        config = backbone_config(
            args.backbone, args.image_size, width=args.backbone_width, stem_stride=args.stem_stride
        )
    check_image_size(config, args.image_size)
    mean = method_config.get("mean")
    std = method_config.get("std")
    ssl_config = SSLConfig(
        method=args.method,
        method_config=method_config,
        backbone_config=config.to_dict(),
        image_size=args.image_size,
        resize_size=Preprocessing.for_image_size(args.image_size).resize_size,
        mean=mean,
        std=std,
        training_args=args.to_dict(),
        data=data or {},
        seed=args.seed,
    )
    return SSLModel(ssl_config, backbone=pretrained)


def optimization_defaults(args: PretrainArguments, backbone_config_obj: Any) -> tuple[str, float, float]:
    """(optimizer, base lr at batch 256, weight decay) with unset values from the defaults."""
    if isinstance(backbone_config_obj, ViTConfig):
        default = VIT_OPTIMIZATION
    else:
        default = OPTIMIZATION_DEFAULTS.get(args.method, FALLBACK_OPTIMIZATION)
    optimizer = args.optimizer or default[0]
    lr = args.learning_rate if args.learning_rate is not None else default[1]
    wd = args.weight_decay if args.weight_decay is not None else default[2]
    return optimizer, lr, wd


# --------------------------------------------------------------------------------------------------
# Checkpoints


def with_new_method_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a checkpoint's identity) with the method-config fields added since it was
    written (e.g. ``icutmix_alpha``) set to their defaults, which is what that run trained with."""
    from .methods import METHODS

    config = saved.get("method_config")
    if not isinstance(config, dict) or saved.get("method") not in METHODS:
        return saved
    defaults = json.loads(json.dumps(METHODS[saved["method"]].config_class().to_dict(), default=str))
    return {**saved, "method_config": {**defaults, **config}}


# --------------------------------------------------------------------------------------------------
# The k-NN monitor


class KNNMonitor:
    """k-NN top-1 accuracy of the backbone's pooled features on a held-out labelled split: a
    seeded subset is the bank, other rows the queries. Images are decoded once."""

    def __init__(self, args: PretrainArguments, preprocessing: Preprocessing) -> None:
        split = load_image_dataset(
            args.dataset, args.dataset_config, split=args.knn_split, revision=args.dataset_revision
        )
        image_column = find_image_column(split.features, args.image_column)
        label_column = find_label_column(split.features, args.knn_label_column)
        needed = args.knn_bank_samples + args.knn_eval_samples
        if len(split) < needed:
            raise ValueError(
                f"k-NN monitor: split {args.knn_split!r} has {len(split)} rows, fewer than knn_bank_samples + "
                f"knn_eval_samples = {needed}"
            )
        order = np.random.default_rng(args.seed).permutation(len(split))[:needed].tolist()
        rows = ImageRows(split, image_column, preprocessing)
        labels = torch.as_tensor(np.asarray(split.select(order)[label_column]), dtype=torch.long)
        images = torch.cat([rows.__getitems__(order[i : i + 512]) for i in range(0, needed, 512)])
        self.bank_images, self.query_images = images[: args.knn_bank_samples], images[args.knn_bank_samples :]
        self.bank_labels, self.query_labels = labels[: args.knn_bank_samples], labels[args.knn_bank_samples :]
        self.k = args.knn_k
        self.preprocessing = preprocessing

    @torch.no_grad()
    def features(
        self, backbone: PreTrainedModel, images: Tensor, device: torch.device, channels_last: bool
    ) -> Tensor:
        from .backbones import pooled_features
        from .preprocessing import normalize

        out = []
        for start in range(0, len(images), 256):
            batch = normalize(
                images[start : start + 256].to(device), self.preprocessing.mean, self.preprocessing.std
            )
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(pooled_features(backbone, batch).float().cpu())
        return torch.cat(out)

    def accuracy(self, backbone: PreTrainedModel, device: torch.device, channels_last: bool) -> float:
        from .evaluation.probes import KNNClassifier, KNNConfig

        was_training = backbone.training
        backbone.eval()
        try:
            bank = self.features(backbone, self.bank_images, device, channels_last)
            queries = self.features(backbone, self.query_images, device, channels_last)
        finally:
            backbone.train(was_training)
        knn = KNNClassifier(bank, self.bank_labels, config=KNNConfig(k=self.k))
        return float((knn.predict(queries) == self.query_labels).float().mean())


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    global_step: int
    finished: bool
    last_loss: float | None
    images_per_second: float | None
    log_path: Path
    checkpoint: Path | None = None


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _use_tensorboard(args: PretrainArguments) -> bool:
    if args.report_to == "tensorboard" and not _tensorboard_available():
        raise ValueError("report_to='tensorboard' but tensorboard is not installed (pip install tensorboard)")
    return args.report_to == "tensorboard" or (args.report_to == "auto" and _tensorboard_available())


def _check_preset(args: PretrainArguments) -> None:
    """An unknown preset or a bad width fails here, before the data is loaded."""
    if args.model_name_or_path is None:
        check_image_size(
            backbone_config(
                args.backbone, args.image_size, width=args.backbone_width, stem_stride=args.stem_stride
            ),
            args.image_size,
        )


def _channels_last(args: PretrainArguments, backbone_cfg: Any, device: torch.device) -> bool:
    if args.channels_last is not None:
        return args.channels_last
    return not isinstance(backbone_cfg, ViTConfig) and device.type == "cpu"


class _KNNCheck:
    """The k-NN monitor at the end of every ``knn_every_epochs`` epochs and of the run. Every
    process calls it (the barrier); only the main process computes."""

    def __init__(
        self, args: PretrainArguments, accelerator: Any, model: SSLModel, channels_last: bool, log: JsonlLog
    ) -> None:
        self.args, self.accelerator, self.model, self.channels_last, self.log = (
            args, accelerator, model, channels_last, log,
        )  # fmt: skip
        enabled = args.knn_monitor and accelerator.is_main_process
        self.knn = KNNMonitor(args, model.config.preprocessing()) if enabled else None
        self.monitored_step = -1

    def after_epoch(self, state: LoopState, max_train_steps: int) -> None:
        if state.epoch % self.args.knn_every_epochs == 0 or state.global_step >= max_train_steps:
            self(state)

    def __call__(self, state: LoopState) -> None:
        if not self.args.knn_monitor or self.monitored_step == state.global_step:
            return
        self.monitored_step = state.global_step
        if self.knn is not None:
            accuracy = self.knn.accuracy(self.model.backbone, self.accelerator.device, self.channels_last)
            self.log.write({"step": state.global_step, "epoch": state.epoch, "knn_accuracy": accuracy})
            self.accelerator.log({"knn_accuracy": accuracy}, step=state.global_step)  # no-op without trackers
        self.accelerator.wait_for_everyone()


def _save_final(
    model: SSLModel, output_dir: Path, training_args: dict[str, Any], provenance: dict[str, Any]
) -> None:
    model.config.training_args = training_args
    model.config.data = provenance
    model.save_pretrained(output_dir)
    export_backbone(model, output_dir / "backbone")


def train(args: PretrainArguments) -> TrainResult:
    """Run (or resume) a pretraining run; see the module docstring."""
    from accelerate.utils import DistributedDataParallelKwargs

    args.validate()
    prepare_output_dir(args, run_marker="config.json")
    method_config = resolve_method_config(args)  # unknown method / bad overrides fail before any work
    _check_preset(args)
    use_tensorboard = _use_tensorboard(args)
    accelerator = make_accelerator(
        args,
        log_with="tensorboard" if use_tensorboard else None,
        logging_dir=os.path.join(args.output_dir, "runs"),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)
        ],
    )
    world = accelerator.num_processes
    torch.manual_seed(args.seed)  # model init: identical on every rank

    # ---- data
    dataset, image_column, provenance = load_train_data(args)
    load_size = args.load_size or args.image_size
    rows = ImageRows(
        dataset,
        image_column,
        Preprocessing(image_size=load_size, resize_size=load_size),
        in_memory=args.images_in_memory,
        progress=accelerator.is_main_process and not args.disable_tqdm,
    )
    forward_batch = args.per_device_train_batch_size * world
    if len(rows) < forward_batch:
        raise ValueError(
            f"{len(rows)} training rows are fewer than one global batch ({args.per_device_train_batch_size} x "
            f"{world} processes = {forward_batch}); lower the batch size or use more data"
        )
    loader, sampler = make_loader(rows, args)

    # ---- model and optimisation
    model = build_model(args, method_config, provenance)
    model.method.check_batch_size(forward_batch)
    backbone_cfg = model.config.backbone()
    channels_last = _channels_last(args, backbone_cfg, accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torch_compile:
        model.backbone.forward = torch.compile(model.backbone.forward)
    optimizer_name, base_lr, weight_decay = optimization_defaults(args, backbone_cfg)
    effective_batch = forward_batch * args.gradient_accumulation_steps
    peak_lr = scaled_learning_rate(base_lr, effective_batch)
    optimizer = make_optimizer(optimizer_name, parameter_groups(model, weight_decay), peak_lr, args.momentum)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped: SSLModel = accelerator.unwrap_model(model)
    schedule = Schedule.resolve(args, len(loader), peak_lr)
    identity = run_identity(
        args, world, schedule, method=args.method, method_config=method_config,
        backbone_config=_architecture(backbone_cfg), image_size=args.image_size, num_train_rows=len(rows),
        data_fingerprint=provenance.get("fingerprint"),
    )  # fmt: skip
    resolved = {
        "optimizer": optimizer_name,
        "base_learning_rate": base_lr,
        "peak_learning_rate": peak_lr,
        "weight_decay": weight_decay,
        "effective_batch_size": effective_batch,
        "num_processes": world,
        **schedule.step_counts(),
        "channels_last": channels_last,
        "load_size": load_size,
    }

    # ---- resume, outputs, loop
    state, resumed_from = resume(accelerator, args, identity, upgrade_identity=with_new_method_fields)
    output_dir = Path(args.output_dir)
    log = open_log(accelerator, output_dir, state.global_step if resumed_from else None)
    if use_tensorboard:
        flat = {
            k: v for k, v in {**args.to_dict(), **resolved}.items() if isinstance(v, int | float | str | bool)
        }
        accelerator.init_trackers("pretrain", config=flat)
    knn = _KNNCheck(args, accelerator, unwrapped, channels_last, log)
    steps = RunSteps(
        forward=model,
        after_optimizer_step=lambda step: unwrapped.method.on_optimizer_step(
            unwrapped.backbone, step / schedule.max_train_steps
        ),
        after_epoch=lambda state: knn.after_epoch(state, schedule.max_train_steps),
    )
    result = TrainingLoop(
        accelerator, model, optimizer, loader, sampler, schedule, args, identity, log, steps,
        description=f"{args.method} pretraining",
    ).run(state)  # fmt: skip
    if result.finished:
        knn(state)  # stopped mid-epoch by max_train_steps: the final k-NN accuracy (no-op if done)
    training_args = {**args.to_dict(), "resolved": resolved, "resumed_from": str(resumed_from or "")}
    finish(
        accelerator, result.finished, partial(_save_final, unwrapped, output_dir, training_args, provenance)
    )
    return TrainResult(
        output_dir=output_dir,
        global_step=state.global_step,
        finished=result.finished,
        last_loss=result.last_loss,
        images_per_second=result.images_per_second,
        log_path=output_dir / LOG_NAME,
        checkpoint=result.checkpoint,
    )


__all__ = [
    "OPTIMIZATION_DEFAULTS",
    "PretrainArguments",
    "TrainResult",
    "build_model",
    "parse_pretrain_args",
    "train",
    # defined in hf_sslbd.loop since the loop is shared with the defenses; still importable from here
    "TRAINER_STATE_NAME",
    "CheckpointError",
    "identity_collate",
    "learning_rate_at",
    "list_checkpoints",
]
