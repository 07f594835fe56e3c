"""SSL pretraining with Accelerate: one loop for every method (the method says *what* to compute,
this module *how* to train), shaped like transformers' ``run_mim_no_trainer.py``.

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
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, ViTConfig

from .backbones import BACKBONES, backbone_config, check_image_size
from .data import find_image_column, find_label_column, load_image_dataset
from .modeling import SSLConfig, SSLModel, _architecture, export_backbone, load_encoder
from .preprocessing import Preprocessing, images_to_batch

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
REPORT_TO = ("auto", "tensorboard", "none")
MIXED_PRECISION = ("no", "bf16", "fp16")
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"

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


class CheckpointError(ValueError):
    """A missing checkpoint, or one that belongs to a different run."""


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


class ImageRows(torch.utils.data.Dataset):
    """Rows of an image column, fetched a batch at a time (``__getitems__``) and decoded to a uint8
    ``(B, 3, S, S)`` tensor at ``preprocessing.image_size``."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, preprocessing: Preprocessing) -> None:
        # undecoded bytes: PIL decodes them in images_to_batch, without a round trip through datasets
        self.dataset = dataset.select_columns([image_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.column = image_column
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> Tensor:
        values = self.dataset[list(indices)][self.column]
        return images_to_batch(values, self.preprocessing, rows=list(indices))

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]


def identity_collate(batch: Tensor) -> Tensor:
    return batch


class EpochSampler(torch.utils.data.Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``: reruns and resumed runs see
    the same order; ``set_epoch`` is called by the loop (through accelerate's DataLoader)."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        )
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())


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
        "fingerprint": getattr(dataset, "_fingerprint", None),
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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights (decayed) and norms / biases (not decayed)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)}")


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps`` then cosine to 0 at ``total_steps``;
    ``step`` is the 0-based index of the optimizer step about to be taken."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step_{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with a trainer state) of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resume_setting(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> str | None:
    """``auto`` becomes ``latest`` when ``output_dir`` holds a checkpoint and None (a fresh start)
    otherwise, so one command both starts a run and continues it after a kill."""
    if resume_from_checkpoint != "auto":
        return resume_from_checkpoint
    return "latest" if list_checkpoints(output_dir) else None


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str) -> Path:
    """The folder ``--resume_from_checkpoint`` names; ``CheckpointError`` if there is none."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR} "
                f"(expected step_N folders holding {TRAINER_STATE_NAME})"
            )
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: not a checkpoint folder (no {TRAINER_STATE_NAME}); "
            "pass 'latest' or an output_dir/checkpoints/step_N folder"
        )
    return path


#: trainer-state keys that must match between a checkpoint and the run resuming it
_RUN_IDENTITY = (
    "method",
    "method_config",
    "backbone_config",
    "image_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_processes",
    "seed",
    "num_train_rows",
    "data_fingerprint",
    "max_train_steps",
)


def with_new_method_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a checkpoint's identity) with the method-config fields added since it was
    written (e.g. ``icutmix_alpha``) set to their defaults, which is what that run trained with."""
    from .methods import METHODS

    config = saved.get("method_config")
    if not isinstance(config, dict) or saved.get("method") not in METHODS:
        return saved
    defaults = json.loads(json.dumps(METHODS[saved["method"]].config_class().to_dict(), default=str))
    return {**saved, "method_config": {**defaults, **config}}


def check_checkpoint_matches(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise ``CheckpointError`` naming every identity field (and sub-field) that differs."""
    current = json.loads(json.dumps(current, default=str))  # compare as stored (JSON keys, lists)
    differing = [key for key in _RUN_IDENTITY if saved.get(key) != current.get(key)]
    if differing:
        details = "; ".join(_difference(k, saved.get(k), current.get(k)) for k in differing)
        raise CheckpointError(f"checkpoint {path} belongs to a different run ({details})")


def _difference(key: str, saved: Any, current: Any) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        saved = {k: saved.get(k) for k in keys}
        current = {k: current.get(k) for k in keys}
    return f"{key}: checkpoint {_short(saved)} vs now {_short(current)}"


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------------
# Logging and the k-NN monitor


class JsonlLog:
    """Append-only JSON lines on the main process; on resume, lines past the resumed step go."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled and resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


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
# The loop


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


def _prepare_output_dir(args: PretrainArguments) -> None:
    output_dir = Path(args.output_dir)
    args.resume_from_checkpoint = resume_setting(output_dir, args.resume_from_checkpoint)
    holds_run = (output_dir / "config.json").exists() or (output_dir / CHECKPOINTS_DIR).exists()
    if holds_run and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run (config.json or checkpoints/); pass "
            "--resume_from_checkpoint latest to continue it or --overwrite_output_dir to replace it"
        )


def train(args: PretrainArguments) -> TrainResult:
    """Run (or resume) a pretraining run; see the module docstring."""
    from accelerate import Accelerator, skip_first_batches
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration
    from tqdm.auto import tqdm

    args.validate()
    _prepare_output_dir(args)
    method_config = resolve_method_config(args)  # unknown method / bad overrides fail before any work
    if args.model_name_or_path is None:  # unknown preset / bad width: before the data is loaded
        check_image_size(
            backbone_config(
                args.backbone, args.image_size, width=args.backbone_width, stem_stride=args.stem_stride
            ),
            args.image_size,
        )
    use_tensorboard = args.report_to == "tensorboard" or (
        args.report_to == "auto" and _tensorboard_available()
    )
    if args.report_to == "tensorboard" and not _tensorboard_available():
        raise ValueError("report_to='tensorboard' but tensorboard is not installed (pip install tensorboard)")
    # each run owns its Accelerator: forget an earlier run's settings in this process (mixed
    # precision, accumulation); the process group (PartialState), if any, is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if use_tensorboard else None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")
        ),
        # our sampler is seeded per epoch already; accelerate must not swap it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        rng_types=[],
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)
        ],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(args.seed)  # model init: identical on every rank

    # ---- data
    dataset, image_column, provenance = load_train_data(args)
    load_size = args.load_size or args.image_size
    preprocessing = Preprocessing(image_size=load_size, resize_size=load_size)
    rows = ImageRows(dataset, image_column, preprocessing)
    forward_batch = args.per_device_train_batch_size * world
    if len(rows) < forward_batch:
        raise ValueError(
            f"{len(rows)} training rows are fewer than one global batch ({args.per_device_train_batch_size} x "
            f"{world} processes = {forward_batch}); lower the batch size or use more data"
        )
    sampler = EpochSampler(len(rows), args.seed)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        drop_last=True,  # same-size batches: BN statistics, queue sizes and view shapes stay fixed
        collate_fn=identity_collate,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # never draws from the global RNG
    )

    # ---- model
    model = build_model(args, method_config, provenance)
    method = model.method
    method.check_batch_size(forward_batch)
    backbone_cfg = model.config.backbone()
    is_cnn = not isinstance(backbone_cfg, ViTConfig)
    channels_last = (
        args.channels_last
        if args.channels_last is not None
        else (is_cnn and accelerator.device.type == "cpu")
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torch_compile:
        model.backbone.forward = torch.compile(model.backbone.forward)
    optimizer_name, base_lr, weight_decay = optimization_defaults(args, backbone_cfg)
    effective_batch = forward_batch * args.gradient_accumulation_steps
    peak_lr = base_lr * effective_batch / 256
    optimizer = make_optimizer(optimizer_name, parameter_groups(model, weight_decay), peak_lr, args.momentum)

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped: SSLModel = accelerator.unwrap_model(model)

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        max_train_steps = args.num_train_epochs * steps_per_epoch
    else:
        max_train_steps = args.max_train_steps
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup_steps = min(int(round(args.warmup_epochs * steps_per_epoch)), max_train_steps)
    stop_step = min(args.stop_after_step or max_train_steps, max_train_steps)

    identity = {
        "method": args.method,
        "method_config": method_config,
        "backbone_config": _architecture(backbone_cfg),
        "image_size": args.image_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": world,
        "seed": args.seed,
        "num_train_rows": len(rows),
        "data_fingerprint": provenance.get("fingerprint"),
        "max_train_steps": max_train_steps,
    }
    schedule = {
        "optimizer": optimizer_name,
        "base_learning_rate": base_lr,
        "peak_learning_rate": peak_lr,
        "weight_decay": weight_decay,
        "effective_batch_size": effective_batch,
        "num_processes": world,
        "steps_per_epoch": steps_per_epoch,
        "max_train_steps": max_train_steps,
        "num_epochs": num_epochs,
        "warmup_steps": warmup_steps,
        "channels_last": channels_last,
        "load_size": load_size,
    }

    # ---- resume
    global_step, start_epoch, batches_done = 0, 0, 0
    resumed_from = None
    if args.resume_from_checkpoint is not None:
        resumed_from = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = json.loads((resumed_from / TRAINER_STATE_NAME).read_text())
        saved_identity = with_new_method_fields(state.get("identity", {}))
        check_checkpoint_matches(saved_identity, identity, resumed_from)
        accelerator.load_state(str(resumed_from))
        global_step, start_epoch, batches_done = state["global_step"], state["epoch"], state["batches_done"]
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resumed_from,
            global_step,
            start_epoch,
            batches_done,
        )

    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(output_dir / LOG_NAME, accelerator.is_main_process, global_step if resumed_from else None)
    if use_tensorboard:
        flat = {
            k: v for k, v in {**args.to_dict(), **schedule}.items() if isinstance(v, int | float | str | bool)
        }
        accelerator.init_trackers("pretrain", config=flat)
    knn = (
        KNNMonitor(args, unwrapped.config.preprocessing())
        if args.knn_monitor and accelerator.is_main_process
        else None
    )

    def save_checkpoint(epoch: int, batches: int) -> Path:
        path = checkpoint_dir(output_dir, global_step)
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            state = {
                "global_step": global_step,
                "epoch": epoch,
                "batches_done": batches,
                "identity": identity,
            }
            (path / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2))
            if args.checkpoints_total_limit is not None:
                for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return path

    monitored_step = -1

    def monitor(epoch: int) -> None:
        # every rank calls this (the barrier below); only the main process computes
        nonlocal monitored_step
        if not args.knn_monitor or monitored_step == global_step:
            return
        monitored_step = global_step
        if knn is not None:
            accuracy = knn.accuracy(unwrapped.backbone, accelerator.device, channels_last)
            log.write({"step": global_step, "epoch": epoch, "knn_accuracy": accuracy})
            if use_tensorboard:
                accelerator.log({"knn_accuracy": accuracy}, step=global_step)
        accelerator.wait_for_everyone()

    progress = tqdm(
        total=stop_step, initial=global_step, disable=not accelerator.is_local_main_process or args.disable_tqdm,
        desc=f"{args.method} pretraining",
    )  # fmt: skip
    model.train()
    window: dict[str, list[float]] = {}
    window_images, window_start, data_time = 0, time.perf_counter(), 0.0
    last_loss, speeds, last_checkpoint = None, [], None
    epoch = start_epoch
    while global_step < stop_step and epoch < num_epochs:
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)  # the same object accelerate's shard iterates; set it whatever the wrapping
        skip = batches_done if epoch == start_epoch else 0
        epoch_loader = skip_first_batches(loader, skip) if skip else loader
        batch_index = skip
        fetch_start = time.perf_counter()
        for images in epoch_loader:
            data_time += time.perf_counter() - fetch_start
            torch.manual_seed(micro_batch_seed(args.seed, epoch, batch_index, rank))
            with accelerator.accumulate(model):
                outputs = model(images)
                loss = outputs["loss"]
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    lr = learning_rate_at(global_step, max_train_steps, warmup_steps, peak_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_index += 1
            for key, value in outputs.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    window.setdefault(key, []).append(float(value.detach()))
            window_images += images.shape[0] * world
            if accelerator.sync_gradients:
                global_step += 1
                unwrapped.method.on_optimizer_step(unwrapped.backbone, global_step / max_train_steps)
                progress.update(1)
                if global_step % args.logging_steps == 0 or global_step == stop_step:
                    elapsed = time.perf_counter() - window_start
                    means = {k: float(np.mean(v)) for k, v in window.items()}
                    if world > 1:
                        reduced = accelerator.reduce(
                            torch.tensor(list(means.values()), device=accelerator.device), "mean"
                        )
                        means = dict(zip(means, reduced.tolist(), strict=True))
                    record = {
                        "step": global_step,
                        "epoch": epoch + batch_index / len(loader),
                        "lr": lr,
                        **means,
                        "images_per_second": window_images / elapsed,
                        "data_time_fraction": data_time / elapsed,
                    }
                    log.write(record)
                    if use_tensorboard:
                        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=global_step)
                    progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{lr:.3g}")
                    last_loss = means.get("loss")
                    speeds.append(record["images_per_second"])
                    window, window_images, data_time = {}, 0, 0.0
                    window_start = time.perf_counter()
                end_of_epoch = batch_index == len(loader)
                if (
                    args.checkpointing_steps
                    and global_step % args.checkpointing_steps == 0
                    and not end_of_epoch
                ):
                    last_checkpoint = save_checkpoint(epoch, batch_index)
                if global_step >= stop_step:
                    break
            fetch_start = time.perf_counter()
        epoch_complete = batch_index == len(loader)
        if epoch_complete:
            epoch += 1
            batches_done = 0
            if args.checkpoint_every_epoch or (global_step >= stop_step and global_step < max_train_steps):
                last_checkpoint = save_checkpoint(epoch, 0)
            if epoch % args.knn_every_epochs == 0 or global_step >= max_train_steps:
                monitor(epoch)
        elif global_step >= stop_step and global_step < max_train_steps:
            if last_checkpoint != checkpoint_dir(output_dir, global_step):
                last_checkpoint = save_checkpoint(epoch, batch_index)
            break
        else:
            break
    progress.close()

    finished = global_step >= max_train_steps
    if finished:
        monitor(epoch)  # stopped mid-epoch by max_train_steps: the final k-NN accuracy (no-op if done)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = accelerator.unwrap_model(model)
            final.config.training_args = {
                **args.to_dict(),
                "resolved": schedule,
                "resumed_from": str(resumed_from or ""),
            }
            final.config.data = provenance
            final.save_pretrained(output_dir)
            export_backbone(final, output_dir / "backbone")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        output_dir=output_dir,
        global_step=global_step,
        finished=finished,
        last_loss=last_loss,
        images_per_second=float(np.mean(speeds)) if speeds else None,
        log_path=output_dir / LOG_NAME,
        checkpoint=last_checkpoint,
    )


__all__ = [
    "OPTIMIZATION_DEFAULTS",
    "CheckpointError",
    "PretrainArguments",
    "TrainResult",
    "build_model",
    "learning_rate_at",
    "parse_pretrain_args",
    "train",
]
