"""The Accelerate training loop shared by pretraining (:func:`hf_sslbd.training.train`) and the
distillation defense (:func:`hf_sslbd.defenses.distillation_training.distill`), shaped like
transformers' ``run_mim_no_trainer.py``. A run supplies its model, optimizer and rows, the forward
of one micro-batch, and what follows a real optimizer step (momentum updates); this module owns
the rest: the Accelerator, the seeded loader, the lr schedule, accumulation and clipping, the
JSONL log, the progress bar, ``step_N`` checkpoints and resume.

Reproducibility and resume. The sampler's order in epoch ``e`` is a function of ``(seed, e)``,
and the torch RNG is re-seeded from ``(seed, epoch, batch, rank)`` before every micro-batch, so
the views do not depend on what ran before. Checkpoints are ``output_dir/checkpoints/step_N``
(``accelerator.save_state`` + ``trainer_state.json`` holding the run's identity); resuming
restores one, refuses one of a different run, and skips the batches already seen
(``skip_first_batches``): the resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"


class CheckpointError(ValueError):
    """A missing checkpoint, or one that belongs to a different run."""


class LoopArguments(Protocol):
    """The settings the loop reads (``PretrainArguments`` and ``DistillationArguments`` have them)."""

    output_dir: str
    seed: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    mixed_precision: str
    num_train_epochs: int
    max_train_steps: int | None
    stop_after_step: int | None
    warmup_epochs: float
    max_grad_norm: float | None
    checkpointing_steps: int | None
    checkpoint_every_epoch: bool
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    overwrite_output_dir: bool
    logging_steps: int
    dataloader_num_workers: int
    disable_tqdm: bool


# --------------------------------------------------------------------------------------------------
# Set-up: output folder, Accelerator, data loader, optimizer, schedule


def prepare_output_dir(args: LoopArguments, run_marker: str) -> None:
    """Turn ``resume_from_checkpoint='auto'`` into a setting, and refuse to overwrite a run by
    accident (``run_marker``: a file that only a run's output folder holds)."""
    output_dir = Path(args.output_dir)
    args.resume_from_checkpoint = resume_setting(output_dir, args.resume_from_checkpoint)
    holds_run = (output_dir / run_marker).exists() or (output_dir / CHECKPOINTS_DIR).exists()
    if holds_run and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run ({run_marker} or {CHECKPOINTS_DIR}/); pass "
            "--resume_from_checkpoint latest to continue it or --overwrite_output_dir to replace it"
        )


def make_accelerator(
    args: LoopArguments,
    log_with: str | None = None,
    logging_dir: str | None = None,
    kwargs_handlers: Iterable[Any] = (),
) -> Accelerator:
    """A fresh Accelerator for one run (accumulation, mixed precision, trackers)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # each run owns its Accelerator: forget an earlier run's settings in this process (mixed
    # precision, accumulation); the process group (PartialState), if any, is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # our sampler is seeded per epoch already; accelerate must not swap it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        rng_types=[],
        kwargs_handlers=list(kwargs_handlers),
    )


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


def make_loader(
    rows: torch.utils.data.Dataset, args: LoopArguments
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """The DataLoader over ``rows`` (whose ``__getitems__`` returns a batch tensor) and its sampler."""
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
    return loader, sampler


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


def scaled_learning_rate(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule (Goyal et al.): ``base_lr`` is the rate for a batch of 256."""
    return base_lr * effective_batch / 256


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


@dataclass(frozen=True)
class Schedule:
    """The optimizer steps of a run and of this job, and the learning rate of each step."""

    peak_learning_rate: float
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    warmup_steps: int
    stop_step: int  # where this job stops (stop_after_step), at most max_train_steps

    @classmethod
    def resolve(cls, args: LoopArguments, batches_per_epoch: int, peak_learning_rate: float) -> Schedule:
        """``batches_per_epoch``: micro-batches of one process per epoch (the prepared loader's length)."""
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            max_train_steps = args.num_train_epochs * steps_per_epoch
        else:
            max_train_steps = args.max_train_steps
        return cls(
            peak_learning_rate=peak_learning_rate,
            steps_per_epoch=steps_per_epoch,
            max_train_steps=max_train_steps,
            num_epochs=math.ceil(max_train_steps / steps_per_epoch),
            warmup_steps=min(int(round(args.warmup_epochs * steps_per_epoch)), max_train_steps),
            stop_step=min(args.stop_after_step or max_train_steps, max_train_steps),
        )

    def learning_rate(self, step: int) -> float:
        return learning_rate_at(step, self.max_train_steps, self.warmup_steps, self.peak_learning_rate)

    def step_counts(self) -> dict[str, int]:
        """The resolved step counts, as recorded in a run's outputs."""
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "max_train_steps": self.max_train_steps,
            "num_epochs": self.num_epochs,
            "warmup_steps": self.warmup_steps,
        }


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


def run_identity(
    args: LoopArguments,
    world: int,
    schedule: Schedule,
    *,
    method: str,
    method_config: dict[str, Any],
    backbone_config: dict[str, Any],
    image_size: int,
    num_train_rows: int,
    data_fingerprint: str | None,
) -> dict[str, Any]:
    """A run's identity, stored in its checkpoints (the keys of ``_RUN_IDENTITY``, in order): what
    the run names, plus the batch, accumulation, processes, seed and steps the loop uses."""
    return {
        "method": method,
        "method_config": method_config,
        "backbone_config": backbone_config,
        "image_size": image_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": world,
        "seed": args.seed,
        "num_train_rows": num_train_rows,
        "data_fingerprint": data_fingerprint,
        "max_train_steps": schedule.max_train_steps,
    }


def check_checkpoint_matches(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise ``CheckpointError`` naming every identity field (and sub-field) that differs."""
    current = json.loads(json.dumps(current, default=str))  # compare as stored (JSON keys, lists)
    differing = [key for key in _RUN_IDENTITY if saved.get(key) != current.get(key)]
    if differing:
        details = "; ".join(_difference(k, saved.get(k), current.get(k)) for k in differing)
        hint = ""
        if differing == ["data_fingerprint"]:
            # checkpoints written before content_fingerprint hashed values (not Arrow bytes) carry
            # another hash of the same rows: say so rather than let the user hunt for a data change
            hint = (
                "; only the training rows' fingerprint differs: either the data changed, or the "
                "checkpoint was written by an older hf_sslbd whose fingerprint of the same rows "
                "differed; if the data is unchanged, delete the checkpoints folder to retrain"
            )
        raise CheckpointError(f"checkpoint {path} belongs to a different run ({details}){hint}")


def _difference(key: str, saved: Any, current: Any) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        saved = {k: saved.get(k) for k in keys}
        current = {k: current.get(k) for k in keys}
    return f"{key}: checkpoint {_short(saved)} vs now {_short(current)}"


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class LoopState:
    """Where a run is, i.e. where a checkpoint taken now resumes: optimizer steps taken, the
    epoch, and the micro-batches of that epoch already done."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0


def _same_identity(saved: dict[str, Any]) -> dict[str, Any]:
    return saved


def resume(
    accelerator: Accelerator,
    args: LoopArguments,
    identity: dict[str, Any],
    upgrade_identity: Callable[[dict[str, Any]], dict[str, Any]] = _same_identity,
) -> tuple[LoopState, Path | None]:
    """Restore the checkpoint ``args.resume_from_checkpoint`` names (after ``accelerator.prepare``)
    once its identity (read through ``upgrade_identity``, which may fill in fields added since it
    was written) matches ``identity``; a fresh state when there is nothing to resume."""
    if args.resume_from_checkpoint is None:
        return LoopState(), None
    path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    trainer_state = json.loads((path / TRAINER_STATE_NAME).read_text())
    check_checkpoint_matches(upgrade_identity(trainer_state.get("identity", {})), identity, path)
    accelerator.load_state(str(path))
    state = LoopState(trainer_state["global_step"], trainer_state["epoch"], trainer_state["batches_done"])
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        path,
        state.global_step,
        state.epoch,
        state.batches_done,
    )
    return state, path


@dataclass
class Checkpointer:
    """Saves ``step_N`` checkpoints (accelerate state + trainer state) and prunes old ones."""

    accelerator: Accelerator
    output_dir: Path
    identity: dict[str, Any]
    total_limit: int | None = None

    def save(self, state: LoopState) -> Path:
        path = checkpoint_dir(self.output_dir, state.global_step)
        self.accelerator.save_state(str(path))
        if self.accelerator.is_main_process:
            trainer_state = {
                "global_step": state.global_step,
                "epoch": state.epoch,
                "batches_done": state.batches_done,
                "identity": self.identity,
            }
            (path / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
            if self.total_limit is not None:
                for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return path


# --------------------------------------------------------------------------------------------------
# Logging


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


def open_log(accelerator: Accelerator, output_dir: Path, resumed_step: int | None) -> JsonlLog:
    """Create ``output_dir`` and its ``train_log.jsonl`` (continued from ``resumed_step`` if set)."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return JsonlLog(output_dir / LOG_NAME, accelerator.is_main_process, resumed_step)


class LogWindow:
    """What happened since the last log line: scalar outputs, images, time spent waiting for data."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.images, self.data_time, self.start = 0, 0.0, time.perf_counter()

    def add(self, outputs: Mapping[str, Any], images: int) -> None:
        for key, value in outputs.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                self.values.setdefault(key, []).append(float(value.detach()))
        self.images += images

    def means(self) -> dict[str, float]:
        return {key: float(np.mean(values)) for key, values in self.values.items()}


# --------------------------------------------------------------------------------------------------
# The loop


def _nothing(state: LoopState) -> None:
    return None


@dataclass
class RunSteps:
    """What a run does in the loop. ``forward(images)``: the outputs of one micro-batch (a mapping
    with ``loss``; its other scalars are logged too), called inside ``accelerator.accumulate``
    after the RNG is re-seeded. ``after_optimizer_step(global_step)``: after each real optimizer
    step (momentum encoders). ``after_epoch(state)``: after each complete epoch and its checkpoint,
    on every process."""

    forward: Callable[[Tensor], Mapping[str, Any]]
    after_optimizer_step: Callable[[int], None]
    after_epoch: Callable[[LoopState], None] = _nothing


@dataclass
class LoopResult:
    """Where the job stopped and what it measured."""

    state: LoopState
    finished: bool  # the run reached max_train_steps (not only this job's stop step)
    last_loss: float | None
    images_per_second: float | None  # mean over the logging windows
    checkpoint: Path | None  # the last checkpoint this job saved


@dataclass
class TrainingLoop:
    """The epoch / micro-batch loop: accumulation; clipping and the lr schedule on real optimizer
    steps; a log line every ``logging_steps``; checkpoints every ``checkpointing_steps``, every
    epoch, and where a job stops before the run ends. ``model``, ``optimizer`` and ``loader`` are
    the prepared ones; ``sampler`` is the loader's :class:`EpochSampler`; ``identity`` (see
    :func:`run_identity`) goes into every checkpoint."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    sampler: EpochSampler
    schedule: Schedule
    args: LoopArguments
    identity: dict[str, Any]
    log: JsonlLog
    steps: RunSteps
    description: str
    lr: float = field(init=False, default=0.0)
    last_loss: float | None = field(init=False, default=None)
    last_checkpoint: Path | None = field(init=False, default=None)
    speeds: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.checkpointer = Checkpointer(
            self.accelerator, Path(self.args.output_dir), self.identity, self.args.checkpoints_total_limit
        )

    def run(self, state: LoopState) -> LoopResult:
        """Train from ``state`` (updated in place) to the schedule's stop step."""
        from tqdm.auto import tqdm

        self.progress = tqdm(
            total=self.schedule.stop_step, initial=state.global_step, desc=self.description,
            disable=not self.accelerator.is_local_main_process or self.args.disable_tqdm,
        )  # fmt: skip
        self.model.train()
        self.window = LogWindow()
        while state.global_step < self.schedule.stop_step and state.epoch < self.schedule.num_epochs:
            if not self._run_epoch(state):
                break
        self.progress.close()
        return LoopResult(
            state=state,
            finished=state.global_step >= self.schedule.max_train_steps,
            last_loss=self.last_loss,
            images_per_second=float(np.mean(self.speeds)) if self.speeds else None,
            checkpoint=self.last_checkpoint,
        )

    def _run_epoch(self, state: LoopState) -> bool:
        """The rest of epoch ``state.epoch``; False when the job stops."""
        from accelerate import skip_first_batches

        self.loader.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch)  # the object accelerate's shard iterates, whatever the wrapping
        skip = state.batches_done  # non-zero only in the epoch a resumed run starts in
        batches = skip_first_batches(self.loader, skip) if skip else self.loader
        fetch_start = time.perf_counter()
        for images in batches:
            self.window.data_time += time.perf_counter() - fetch_start
            self._micro_batch(images, state)
            if self.accelerator.sync_gradients and self._after_optimizer_step(state):
                break
            fetch_start = time.perf_counter()
        return self._end_epoch(state)

    def _micro_batch(self, images: Tensor, state: LoopState) -> None:
        rank = self.accelerator.process_index
        torch.manual_seed(micro_batch_seed(self.args.seed, state.epoch, state.batches_done, rank))
        with self.accelerator.accumulate(self.model):
            outputs = self.steps.forward(images)
            self.accelerator.backward(outputs["loss"])
            if self.accelerator.sync_gradients:
                self._prepare_optimizer_step(state.global_step)
            self.optimizer.step()  # accelerate skips it on accumulation-only micro-batches
            self.optimizer.zero_grad(set_to_none=True)
        state.batches_done += 1
        self.window.add(outputs, images.shape[0] * self.accelerator.num_processes)

    def _prepare_optimizer_step(self, step: int) -> None:
        if self.args.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.lr = self.schedule.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def _after_optimizer_step(self, state: LoopState) -> bool:
        """Count a real optimizer step, log and checkpoint; True when the job stops here."""
        state.global_step += 1
        self.steps.after_optimizer_step(state.global_step)
        self.progress.update(1)
        if state.global_step % self.args.logging_steps == 0 or state.global_step == self.schedule.stop_step:
            self._write_log(state)
        every = self.args.checkpointing_steps
        end_of_epoch = state.batches_done == len(self.loader)  # _end_epoch checkpoints there
        if every and state.global_step % every == 0 and not end_of_epoch:
            self.last_checkpoint = self.checkpointer.save(state)
        return state.global_step >= self.schedule.stop_step

    def _end_epoch(self, state: LoopState) -> bool:
        """After an epoch's batches (or a stop within it): checkpoint; False when the job stops."""
        # this job stops before the run ends: leave a checkpoint to resume from
        stops_early = self.schedule.stop_step <= state.global_step < self.schedule.max_train_steps
        if state.batches_done == len(self.loader):
            state.epoch, state.batches_done = state.epoch + 1, 0
            if self.args.checkpoint_every_epoch or stops_early:
                self.last_checkpoint = self.checkpointer.save(state)
            self.steps.after_epoch(state)
            return True
        saved_here = self.last_checkpoint == checkpoint_dir(self.checkpointer.output_dir, state.global_step)
        if stops_early and not saved_here:  # (checkpointing_steps may have just saved this step)
            self.last_checkpoint = self.checkpointer.save(state)
        return False

    def _write_log(self, state: LoopState) -> None:
        elapsed = time.perf_counter() - self.window.start
        means = self._mean_over_processes(self.window.means())
        record = {
            "step": state.global_step,
            "epoch": state.epoch + state.batches_done / len(self.loader),
            "lr": self.lr,
            **means,
            "images_per_second": self.window.images / elapsed,
            "data_time_fraction": self.window.data_time / elapsed,
        }
        self.log.write(record)
        # the Accelerator's trackers (TensorBoard), if the run set any up
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.global_step)
        self.progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{self.lr:.3g}")
        self.last_loss = means.get("loss")
        self.speeds.append(record["images_per_second"])
        self.window.restart()

    def _mean_over_processes(self, means: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return means
        values = torch.tensor(list(means.values()), device=self.accelerator.device)
        reduced = self.accelerator.reduce(values, "mean")
        return dict(zip(means, reduced.tolist(), strict=True))


def finish(accelerator: Accelerator, finished: bool, save_final: Callable[[], None]) -> None:
    """Once the run is complete, ``save_final()`` on the main process (all processes wait for
    it); then end the trackers."""
    if finished:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_final()
        accelerator.wait_for_everyone()
    accelerator.end_training()


__all__ = [
    "CHECKPOINTS_DIR",
    "LOG_NAME",
    "TRAINER_STATE_NAME",
    "CheckpointError",
    "Checkpointer",
    "JsonlLog",
    "LoopArguments",
    "LoopResult",
    "LoopState",
    "RunSteps",
    "Schedule",
    "TrainingLoop",
    "finish",
    "learning_rate_at",
    "list_checkpoints",
    "make_accelerator",
    "make_loader",
    "make_optimizer",
    "open_log",
    "parameter_groups",
    "prepare_output_dir",
    "resume",
    "run_identity",
    "scaled_learning_rate",
]
