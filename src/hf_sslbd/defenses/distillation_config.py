"""The settings of a CompRess distillation run (:mod:`hf_sslbd.defenses.distillation`), as one
dataclass for ``HfArgumentParser`` (flags or YAML), validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..backbones import BACKBONES
from ..views import VIEW_PRESETS
from .clean_subset import BALANCES, check_fraction

VARIANTS = ("1q", "2q")
STUDENT_HEADS = ("auto", "none", "linear", "mlp")
OPTIMIZERS = ("sgd", "adamw")
#: CIFAR-scale default (CompRess: 128,000 on ImageNet); never more than the clean subset
DEFAULT_BANK_SIZE = 4096


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DistillationArguments:
    """Every setting of a CompRess distillation run (flags or YAML via ``HfArgumentParser``)."""

    teacher: str = _help("The backdoored encoder: SSL checkpoint, backbone folder or Hub id.")
    dataset: str = _help("Clean data (Hub id or folder), e.g. ../shared/datasets/cifar10.")
    output_dir: str = _help("Where the student, its card, clean_subset.json, logs and checkpoints go.")
    teacher_revision: str | None = _help("Hub revision of the teacher.", default=None)
    dataset_config: str | None = _help("Dataset config name.", default=None)
    dataset_revision: str | None = _help("Dataset revision.", default=None)
    train_split: str = _help("Split the clean subset is drawn from.", default="train")
    image_column: str | None = _help("Image column (default: found automatically).", default=None)
    label_column: str | None = _help("Label column, for stratified / equal subsets.", default=None)
    clean_fraction: float = _help(
        "Fraction in (0, 1] of the split's clean rows (paper: 0.25, 0.1, 0.05).", default=0.1
    )
    clean_balance: str = _help(
        f"Subset rule: {', '.join(BALANCES)} (uniform needs no labels).", default="uniform"
    )
    clean_rows: str | None = _help(
        "A clean_subset.json manifest whose rows to use instead of drawing (refused if any is poisoned).",
        default=None,
    )
    student: str | None = _help(
        f"Student: a preset ({', '.join(BACKBONES)}), a folder or Hub id (fresh weights from its config), "
        "or unset for the teacher's architecture.",
        default=None,
    )
    student_pretrained: bool = _help("Start from the weights of --student (folder or Hub id).", default=False)
    backbone_width: int | None = _help("ResNet presets: width of the first stage.", default=None)
    stem_stride: int | None = _help("-cifar presets: stem stride 1 or 2.", default=None)
    compress_variant: str = _help(
        "1q: one teacher bank (default); 2q: + a momentum-student bank.", default="1q"
    )
    student_head: str = _help(
        "auto (a linear head only if 1q widths differ), none, linear (CompRess 1q), mlp.", default="auto"
    )
    bank_size: int | None = _help(
        f"Memory bank rows (CompRess: 128000); default min({DEFAULT_BANK_SIZE}, clean rows).", default=None
    )
    temperature: float = _help("Softmax temperature of the similarities (CompRess: 0.04).", default=0.04)
    key_momentum: float = _help("2q: EMA of the momentum student (CompRess: 0.999).", default=0.999)
    views: str = _help(
        "View preset (its first pipeline): rotnet = random resized crop + flip, CompRess's augmentation.",
        default="rotnet",
    )
    crop_scale: list[float] | None = _help("Override the crop scale [low, high].", default=None)
    load_size: int | None = _help(
        "Side images are loaded at before the views (default: image size).", default=None
    )
    per_device_train_batch_size: int = _help("Images per device per micro-batch.", default=256)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    num_train_epochs: int = _help("Epochs over the clean subset (CompRess: 130).", default=130)
    max_train_steps: int | None = _help("Total optimizer steps; overrides num_train_epochs.", default=None)
    stop_after_step: int | None = _help(
        "Checkpoint and stop here (resume later with 'latest').", default=None
    )
    learning_rate: float = _help(
        "Base lr at batch 256, scaled to the effective batch (CompRess on ImageNet: 0.01; 0.2 measured "
        "best on CIFAR-10 at 10%%, see hf_sslbd.defenses.distillation).",
        default=0.2,
    )
    weight_decay: float = _help("Weight decay, not on norms and biases (CompRess: 1e-4).", default=1e-4)
    optimizer: str = _help("sgd or adamw.", default="sgd")
    momentum: float = _help("SGD momentum.", default=0.9)
    warmup_epochs: float = _help("Linear warm-up epochs, then cosine decay to 0.", default=0.0)
    max_grad_norm: float | None = _help("Clip the gradient norm (off when unset).", default=None)
    mixed_precision: str = _help("no, bf16 or fp16.", default="no")
    seed: int = _help("Seed of everything: subset, student init, order, views.", default=0)
    checkpointing_steps: int | None = _help("Also checkpoint every N optimizer steps.", default=None)
    checkpoint_every_epoch: bool = _help("Checkpoint at the end of every epoch.", default=True)
    checkpoints_total_limit: int | None = _help(
        "Keep only the newest N checkpoints (a distillation checkpoints every short epoch).", default=2
    )
    resume_from_checkpoint: str | None = _help(
        "'latest', a checkpoints/step_N folder, or 'auto' (latest when there is one, else a fresh start).",
        default=None,
    )
    overwrite_output_dir: bool = _help("Allow writing into an output_dir that holds a run.", default=False)
    logging_steps: int = _help("Log every N optimizer steps (train_log.jsonl).", default=10)
    channels_last: bool | None = _help("channels_last (default: on for CNNs on CPU).", default=None)
    dataloader_num_workers: int = _help("DataLoader workers decoding images.", default=0)
    images_in_memory: bool | None = _help(
        "Decode the clean subset once and keep it in memory (default: when it takes at most 2 GiB).",
        default=None,
    )
    disable_tqdm: bool = _help("No progress bar.", default=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        check_fraction(self.clean_fraction)
        choices = (
            ("clean_balance", BALANCES),
            ("compress_variant", VARIANTS),
            ("student_head", STUDENT_HEADS),
            ("views", VIEW_PRESETS),
            ("optimizer", OPTIMIZERS),
            ("mixed_precision", ("no", "bf16", "fp16")),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bank_size", "max_train_steps", "stop_after_step", "checkpointing_steps", "load_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {getattr(self, name)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(
                f"checkpoints_total_limit must be >= 1 when set, got {self.checkpoints_total_limit}"
            )
        for name in ("temperature", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.key_momentum <= 1:
            raise ValueError(f"key_momentum must be in [0, 1], got {self.key_momentum}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.dataloader_num_workers < 0:
            raise ValueError("weight_decay, warmup_epochs and dataloader_num_workers must be >= 0")
        if self.crop_scale is not None and (
            len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ValueError(
                f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if self.student_pretrained and (self.student is None or self.student in BACKBONES):
            raise ValueError("student_pretrained needs --student set to a folder or Hub id with weights")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["DEFAULT_BANK_SIZE", "OPTIMIZERS", "STUDENT_HEADS", "VARIANTS", "DistillationArguments"]
