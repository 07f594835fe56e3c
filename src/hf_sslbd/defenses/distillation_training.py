"""The distillation defense's run: the training loop of pretraining (:mod:`hf_sslbd.loop`) with
the distiller's forward (a view, the frozen teacher's embeddings, the CompRess loss) and its 2q
momentum update, so it resumes exactly like pretraining: ``output_dir/checkpoints/step_N``, and
``--resume_from_checkpoint latest`` ends with the same student as an uninterrupted run.

Outputs in ``output_dir``: the student as a plain ``transformers`` backbone (``config.json``,
``model.safetensors``) with the teacher's ``preprocessor_config.json`` (it was trained on the
teacher's pixels), so ``load_encoder(output_dir)`` and ``AutoModel.from_pretrained`` load it and
``hf_sslbd.hub.push_encoder(output_dir, ...)`` publishes it; ``clean_subset.json`` (the row ids),
``defense_config.json`` (settings, resolved values, teacher and data provenance),
``train_log.jsonl``, and a defended card (``README.md``). The distillation head, banks and
optimizer live in the checkpoints only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from torch import Tensor

from ..backbones import feature_dim, pooled_features
from ..data import content_fingerprint, find_image_column, load_image_dataset
from ..evaluation.features import model_fingerprint, uses_channels_last
from ..loop import (
    LOG_NAME,
    RunSteps,
    Schedule,
    TrainingLoop,
    finish,
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
from ..modeling import _architecture, load_encoder
from ..preprocessing import Preprocessing
from ..training import ImageRows
from ..views import Views
from .clean_subset import CleanSubset, draw_clean_subset, given_clean_subset
from .distillation import (
    CompRessDistiller,
    DistillationArguments,
    build_student,
    distillation_views,
    freeze,
    resolve_bank_size,
)
from .report import CLEAN_SUBSET_NAME, DEFENSE_NAME, save_student, teacher_ssl_config

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


@dataclass
class DistillationResult:
    """What a run produced."""

    output_dir: Path
    global_step: int
    finished: bool
    last_loss: float | None
    clean_subset: CleanSubset
    log_path: Path
    checkpoint: Path | None = None


def load_clean_subset(args: DistillationArguments) -> tuple[datasets.Dataset, str, CleanSubset]:
    """The split, its image column and the clean subset (drawn, or read from ``clean_rows``)."""
    split = load_image_dataset(
        args.dataset, args.dataset_config, split=args.train_split, revision=args.dataset_revision
    )
    if not isinstance(split, datasets.Dataset):
        raise TypeError(f"{args.dataset!r} split {args.train_split!r} is not a map-style Dataset")
    image_column = find_image_column(split.features, args.image_column)
    source = {
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "revision": args.dataset_revision,
        "split": args.train_split,
        "fingerprint": content_fingerprint(split),
    }
    if args.clean_rows is not None:
        rows = CleanSubset.load(args.clean_rows).indices
        return split, image_column, given_clean_subset(split, rows, {**source, "rows_from": args.clean_rows})
    subset = draw_clean_subset(
        split, args.clean_fraction, args.seed, args.clean_balance, args.label_column, source
    )
    if subset.excluded_poisoned_rows:
        logger.warning(
            "%s carries is_poisoned: the clean subset was drawn from its %d clean rows only (%d poisoned rows "
            "left out); the normal use is the clean source dataset",
            args.dataset,
            subset.num_eligible_rows,
            subset.excluded_poisoned_rows,
        )
    return split, image_column, subset


def _data_fingerprint(subset: CleanSubset) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(subset.source.get("fingerprint")).encode())
    digest.update(np.ascontiguousarray(subset.indices, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _distillation_forward(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    views: Views,
    accelerator: Accelerator,
    channels_last: bool,
) -> Callable[[Tensor], Mapping[str, Tensor]]:
    """One micro-batch: a view of the images, the frozen teacher's embeddings of it, and the
    distiller's outputs (its loss pulls the student's similarities towards the teacher's)."""

    def forward(images: Tensor) -> Mapping[str, Tensor]:
        (view,) = views(images)
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), accelerator.autocast():
            teacher_embeddings = pooled_features(teacher, view).float()
        return model(view, teacher_embeddings)

    return forward


def _save_final(
    args: DistillationArguments,
    student: torch.nn.Module,
    output_dir: Path,
    preprocessing: Preprocessing,
    resolved: dict[str, Any],
    subset: CleanSubset,
) -> None:
    teacher_record = {
        "name_or_path": args.teacher,
        "revision": args.teacher_revision,
        "config": teacher_ssl_config(args.teacher),
    }
    record = {
        "defense": DEFENSE_NAME,
        "arguments": args.to_dict(),
        "resolved": resolved,
        "teacher": teacher_record,
        "clean_data": subset.summary(),
    }
    save_student(student, output_dir, preprocessing, record)


def distill(args: DistillationArguments) -> DistillationResult:
    """Run (or resume) a CompRess distillation; see the module docstring."""
    args.validate()
    prepare_output_dir(args, run_marker=CLEAN_SUBSET_NAME)
    accelerator = make_accelerator(args)
    world = accelerator.num_processes
    output_dir = Path(args.output_dir)

    # ---- teacher, student (sizes checked before any data is read)
    teacher, preprocessing = load_encoder(args.teacher, revision=args.teacher_revision)
    freeze(teacher)
    torch.manual_seed(args.seed)  # student init: identical on every rank
    student = build_student(args, teacher.config, preprocessing.image_size)

    # ---- data
    split, image_column, subset = load_clean_subset(args)
    forward_batch = args.per_device_train_batch_size * world
    if len(subset) < forward_batch:
        raise ValueError(
            f"the clean subset has {len(subset)} rows, fewer than one global batch ({forward_batch}); lower the "
            "batch size or raise clean_fraction"
        )
    bank_size = resolve_bank_size(args.bank_size, len(subset), forward_batch)
    load_size = args.load_size or preprocessing.image_size
    if load_size < preprocessing.image_size:
        raise ValueError(
            f"load_size ({load_size}) must be >= the teacher's image size ({preprocessing.image_size})"
        )
    rows = ImageRows(
        split.select(subset.indices),
        image_column,
        Preprocessing(image_size=load_size, resize_size=load_size),
        in_memory=args.images_in_memory,
        progress=accelerator.is_main_process and not args.disable_tqdm,
    )
    loader, sampler = make_loader(rows, args)

    # ---- model and optimisation
    model = CompRessDistiller(
        student, feature_dim(teacher.config), bank_size, args.compress_variant, args.student_head,
        args.temperature, args.key_momentum,
    )  # fmt: skip
    channels_last = args.channels_last
    if channels_last is None:  # as pretraining: 1.3-2x faster for CNNs on CPU
        channels_last = uses_channels_last(student) and accelerator.device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    effective_batch = forward_batch * args.gradient_accumulation_steps
    peak_lr = scaled_learning_rate(args.learning_rate, effective_batch)
    optimizer = make_optimizer(
        args.optimizer, parameter_groups(model, args.weight_decay), peak_lr, args.momentum
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped: CompRessDistiller = accelerator.unwrap_model(model)
    teacher = teacher.to(accelerator.device)
    views = distillation_views(args, preprocessing).to(accelerator.device)
    schedule = Schedule.resolve(args, len(loader), peak_lr)
    settings = {
        "compress_variant": args.compress_variant,
        "student_head": unwrapped.head_kind,
        "bank_size": bank_size,
        "temperature": args.temperature,
        "key_momentum": args.key_momentum if args.compress_variant == "2q" else None,
        "views": args.views,
        "crop_scale": args.crop_scale,
        "teacher_fingerprint": model_fingerprint(teacher),
    }
    identity = run_identity(
        args, world, schedule, method=DEFENSE_NAME, method_config=settings,
        backbone_config=_architecture(student.config), image_size=preprocessing.image_size,
        num_train_rows=len(subset), data_fingerprint=_data_fingerprint(subset),
    )  # fmt: skip
    resolved = {
        **settings,
        "peak_learning_rate": peak_lr,
        "effective_batch_size": effective_batch,
        **schedule.step_counts(),
        "channels_last": channels_last,
        "load_size": load_size,
    }

    # ---- resume, outputs, loop
    state, resumed_from = resume(accelerator, args, identity)
    log = open_log(accelerator, output_dir, state.global_step if resumed_from else None)
    if accelerator.is_main_process:
        subset.save(output_dir / CLEAN_SUBSET_NAME)
    steps = RunSteps(
        forward=_distillation_forward(model, teacher, views, accelerator, channels_last),
        after_optimizer_step=lambda step: unwrapped.on_optimizer_step(),
    )
    result = TrainingLoop(
        accelerator, model, optimizer, loader, sampler, schedule, args, identity, log, steps,
        description="CompRess distillation",
    ).run(state)  # fmt: skip
    resolved["resumed_from"] = str(resumed_from or "")
    save_final = partial(_save_final, args, unwrapped.student, output_dir, preprocessing, resolved, subset)
    finish(accelerator, result.finished, save_final)
    return DistillationResult(
        output_dir, state.global_step, result.finished, result.last_loss, subset, output_dir / LOG_NAME,
        result.checkpoint,
    )  # fmt: skip


__all__ = [
    "DistillationResult",
    "distill",
    "load_clean_subset",
]
