"""The Accelerate loop of the distillation defense, built from the pretraining loop's pieces
(:mod:`hf_sslbd.training`: data rows and sampler, lr schedule, parameter groups, checkpoints,
JSONL log), so it resumes exactly like pretraining: ``output_dir/checkpoints/step_N``, and
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
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ..backbones import feature_dim, pooled_features
from ..data import find_image_column, load_image_dataset
from ..evaluation.features import model_fingerprint, uses_channels_last
from ..modeling import _architecture, load_encoder
from ..preprocessing import Preprocessing
from ..training import (
    CHECKPOINTS_DIR,
    LOG_NAME,
    TRAINER_STATE_NAME,
    EpochSampler,
    ImageRows,
    JsonlLog,
    check_checkpoint_matches,
    checkpoint_dir,
    identity_collate,
    learning_rate_at,
    list_checkpoints,
    make_optimizer,
    micro_batch_seed,
    parameter_groups,
    resolve_checkpoint,
    resume_setting,
)
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
        "fingerprint": getattr(split, "_fingerprint", None),
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


def _check_output_dir(args: DistillationArguments) -> None:
    output_dir = Path(args.output_dir)
    args.resume_from_checkpoint = resume_setting(output_dir, args.resume_from_checkpoint)
    holds_run = (output_dir / CLEAN_SUBSET_NAME).exists() or (output_dir / CHECKPOINTS_DIR).exists()
    if holds_run and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run; pass --resume_from_checkpoint latest to continue it "
            "or --overwrite_output_dir to replace it"
        )


def _data_fingerprint(subset: CleanSubset) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(subset.source.get("fingerprint")).encode())
    digest.update(np.ascontiguousarray(subset.indices, dtype=np.int64).tobytes())
    return digest.hexdigest()


def distill(args: DistillationArguments) -> DistillationResult:
    """Run (or resume) a CompRess distillation; see the module docstring."""
    from accelerate import Accelerator, skip_first_batches
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    from tqdm.auto import tqdm

    args.validate()
    _check_output_dir(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),  # our sampler is seeded
        rng_types=[],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
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
        split.select(subset.indices), image_column, Preprocessing(image_size=load_size, resize_size=load_size)
    )
    sampler = EpochSampler(len(rows), args.seed)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=identity_collate,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )

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
    peak_lr = args.learning_rate * effective_batch / 256
    optimizer = make_optimizer(
        args.optimizer, parameter_groups(model, args.weight_decay), peak_lr, args.momentum
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped: CompRessDistiller = accelerator.unwrap_model(model)
    teacher = teacher.to(accelerator.device)
    views = distillation_views(args, preprocessing).to(accelerator.device)

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup_steps = min(int(round(args.warmup_epochs * steps_per_epoch)), max_train_steps)
    stop_step = min(args.stop_after_step or max_train_steps, max_train_steps)
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
    identity = {
        "method": DEFENSE_NAME,
        "method_config": settings,
        "backbone_config": _architecture(student.config),
        "image_size": preprocessing.image_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": world,
        "seed": args.seed,
        "num_train_rows": len(subset),
        "data_fingerprint": _data_fingerprint(subset),
        "max_train_steps": max_train_steps,
    }
    schedule = {
        "peak_learning_rate": peak_lr,
        "effective_batch_size": effective_batch,
        "steps_per_epoch": steps_per_epoch,
        "max_train_steps": max_train_steps,
        "num_epochs": num_epochs,
        "warmup_steps": warmup_steps,
        "channels_last": channels_last,
        "load_size": load_size,
    }

    # ---- resume
    global_step, start_epoch, batches_done, resumed_from = 0, 0, 0, None
    if args.resume_from_checkpoint is not None:
        resumed_from = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        state = json.loads((resumed_from / TRAINER_STATE_NAME).read_text())
        check_checkpoint_matches(state.get("identity", {}), identity, resumed_from)
        accelerator.load_state(str(resumed_from))
        global_step, start_epoch, batches_done = state["global_step"], state["epoch"], state["batches_done"]
        logger.info("resumed from %s at step %d", resumed_from, global_step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        subset.save(output_dir / CLEAN_SUBSET_NAME)
    log = JsonlLog(output_dir / LOG_NAME, accelerator.is_main_process, global_step if resumed_from else None)

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

    progress = tqdm(
        total=stop_step, initial=global_step, desc="CompRess distillation",
        disable=not accelerator.is_local_main_process or args.disable_tqdm,
    )  # fmt: skip
    model.train()
    window: dict[str, list[float]] = {}
    window_images, window_start, last_loss, last_checkpoint, lr = 0, time.perf_counter(), None, None, peak_lr
    epoch = start_epoch
    while global_step < stop_step and epoch < num_epochs:
        loader.set_epoch(epoch)  # accelerate's loader re-sets its sampler's epoch from its own count
        sampler.set_epoch(epoch)
        skip = batches_done if epoch == start_epoch else 0
        batch_index = skip
        for images in skip_first_batches(loader, skip) if skip else loader:
            torch.manual_seed(micro_batch_seed(args.seed, epoch, batch_index, rank))
            (view,) = views(images)
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), accelerator.autocast():
                teacher_embeddings = pooled_features(teacher, view).float()
            with accelerator.accumulate(model):
                outputs = model(view, teacher_embeddings)
                accelerator.backward(outputs["loss"])
                if accelerator.sync_gradients:
                    if args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    lr = learning_rate_at(global_step, max_train_steps, warmup_steps, peak_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_index += 1
            window_images += images.shape[0] * world
            for key, value in outputs.items():
                window.setdefault(key, []).append(float(value.detach()))
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            unwrapped.on_optimizer_step()
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == stop_step:
                means = {k: float(np.mean(v)) for k, v in window.items()}
                if world > 1:
                    reduced = accelerator.reduce(
                        torch.tensor(list(means.values()), device=accelerator.device), "mean"
                    )
                    means = dict(zip(means, reduced.tolist(), strict=True))
                elapsed = time.perf_counter() - window_start
                record = {"step": global_step, "epoch": epoch + batch_index / len(loader), "lr": lr, **means}
                log.write({**record, "images_per_second": window_images / elapsed})
                progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.3g}")
                last_loss = means["loss"]
                window, window_images, window_start = {}, 0, time.perf_counter()
            if (
                args.checkpointing_steps
                and global_step % args.checkpointing_steps == 0
                and batch_index != len(loader)
            ):
                last_checkpoint = save_checkpoint(epoch, batch_index)
            if global_step >= stop_step:
                break
        if batch_index == len(loader):
            epoch += 1
            batches_done = 0
            if args.checkpoint_every_epoch or global_step == stop_step < max_train_steps:
                last_checkpoint = save_checkpoint(epoch, 0)
        elif global_step == stop_step < max_train_steps:
            if last_checkpoint != checkpoint_dir(output_dir, global_step):
                last_checkpoint = save_checkpoint(epoch, batch_index)
            break
        else:
            break
    progress.close()

    finished = global_step >= max_train_steps
    if finished and accelerator.is_main_process:
        teacher_record = {
            "name_or_path": args.teacher,
            "revision": args.teacher_revision,
            "config": teacher_ssl_config(args.teacher),
        }
        record = {
            "defense": DEFENSE_NAME,
            "arguments": args.to_dict(),
            "resolved": {**settings, **schedule, "resumed_from": str(resumed_from or "")},
            "teacher": teacher_record,
            "clean_data": subset.summary(),
        }
        save_student(unwrapped.student, output_dir, preprocessing, record)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return DistillationResult(
        output_dir, global_step, finished, last_loss, subset, output_dir / LOG_NAME, last_checkpoint
    )


__all__ = [
    "DistillationResult",
    "distill",
    "load_clean_subset",
]
