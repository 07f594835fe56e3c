"""Run an experiment's stages in order: poison -> pretrain (clean twins and backdoored models, side by
side when ``parallel`` > 1) -> evaluate (each pair as soon as both its models are trained) -> report.
Finished stages are skipped on a rerun; an unfinished pretraining resumes from its last
checkpoint; a failed stage is named in the report and what finished is kept."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from .cache import StageError, StageRecord
from .config import ExperimentConfig, check_overrides
from .plan import Evaluation, Plan, Run, Variant, build_plan, poison_inputs

logger = logging.getLogger(__name__)


def check_config(config: ExperimentConfig) -> None:
    """Refuse unknown keys in the poison / pretrain / evaluation sections, and pretraining
    settings or method-config overrides that a method rejects, before any work."""
    from ..evaluation.report import EvaluationConfig
    from ..poisoning import PoisonConfig
    from ..training import PretrainArguments, resolve_method_config

    check_overrides(config.poison, PoisonConfig, "poison")
    for key in ("trigger", "target", "seed"):
        if key in config.poison:
            raise ValueError(f"poison.{key} is set per pair / seed: use `pairs` and `seeds` instead")
    check_overrides(config.pretrain, PretrainArguments, "pretrain")
    for key in ("dataset", "dataset_config", "output_dir", "method", "seed", "resume_from_checkpoint"):
        if key in config.pretrain:
            raise ValueError(f"pretrain.{key} is set by the experiment itself; remove it from the config")
    for method in config.methods:  # a typo in method_config fails now, not after hours of poisoning
        try:
            resolve_method_config(
                PretrainArguments(dataset="", output_dir="", method=method, **config.pretrain)
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"pretrain (method {method!r}): {error}") from None
    check_overrides(config.evaluation, EvaluationConfig, "evaluation")


def check_targets(config: ExperimentConfig, features: Any) -> None:
    """Every pair's target must be a class of the dataset."""
    from ..data import find_label_column, resolve_class

    label_column = find_label_column(features, config.poison.get("label_column"))
    for index, pair in enumerate(config.pairs):
        try:
            resolve_class(features, label_column, pair.target)
        except ValueError as error:
            raise ValueError(f"pairs[{index}]: {error}") from None


# ------------------------------------------------------------------------------------------ stages
def run_poison(config: ExperimentConfig, variant: Variant) -> None:
    from ..data import load_image_dataset
    from ..poisoning import make_poisoned_variant
    from ..variants import save_variant

    source = load_image_dataset(config.dataset, config.dataset_config)
    poisoned = make_poisoned_variant(source, variant.config)
    save_variant(
        poisoned, variant.config, Path(config.output_dir) / "data", overwrite=True, source=config.dataset
    )


def pretrain_arguments(config: ExperimentConfig, run: Run) -> dict[str, Any]:
    if run.variant is None:
        data = {"dataset": config.dataset, "dataset_config": config.dataset_config}
    else:
        data = {"dataset": str(Path(config.output_dir) / "data"), "dataset_config": run.variant.name}
    return {
        **config.pretrain,
        **data,
        "method": run.method,
        "seed": run.seed,
        "output_dir": str(run.folder),
    }


def _exit_with_parent(parent: int) -> None:
    """Stop this worker when the experiment process that started it dies (killed, Ctrl-C): an
    orphan would go on writing checkpoints into the folder a rerun is resuming from."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _train_job(arguments: dict[str, Any], threads: int, parent: int | None = None) -> dict[str, Any]:
    """One pretraining run, in a worker process (spawned: no state shared with the parent)."""
    import torch

    if parent is not None:
        _exit_with_parent(parent)

    torch.set_num_threads(threads)
    from ..training import PretrainArguments, list_checkpoints, train

    if list_checkpoints(arguments["output_dir"]):
        arguments = {**arguments, "resume_from_checkpoint": "latest"}
    elif (Path(arguments["output_dir"]) / "config.json").exists():
        arguments = {**arguments, "overwrite_output_dir": True}
    result = train(PretrainArguments(**arguments))
    if not result.finished:
        raise RuntimeError(f"pretraining stopped at step {result.global_step} before the end")
    return {"global_step": result.global_step, "images_per_second": result.images_per_second}


def evaluation_config(config: ExperimentConfig, seed: int):
    """The evaluation settings: the experiment's seed drives the label subsets unless set."""
    from ..evaluation.report import EvaluationConfig

    return EvaluationConfig(**{"seeds": [seed], **config.evaluation})


def run_evaluation(config: ExperimentConfig, evaluation: Evaluation) -> dict[str, Any]:
    from ..evaluation.inputs import load_evaluation_data
    from ..evaluation.report import evaluate_encoder
    from ..modeling import load_encoder
    from .checkpoints import encoder_at_epoch

    settings = evaluation_config(config, evaluation.run.seed)
    paths = {"model": evaluation.run.folder, "reference": evaluation.reference.folder}
    if evaluation.epoch is not None:
        paths = {
            tag: encoder_at_epoch(
                folder, evaluation.epoch, evaluation.folder / f"{tag}_epoch-{evaluation.epoch}"
            )
            for tag, folder in paths.items()
        }
    data = load_evaluation_data(
        str(Path(config.output_dir) / "data"),
        evaluation.variant.name,
        # the probes' labeled subset comes from the clean source: the victim's labeled data is clean
        labeled_dataset=config.dataset,
        labeled_config=config.dataset_config,
        control_triggers=settings.control_triggers,
        trigger_sizes=settings.trigger_sizes,
    )
    return evaluate_encoder(
        *load_encoder(str(paths["model"])),
        data,
        settings,
        reference=load_encoder(str(paths["reference"])),
        output_dir=evaluation.folder,
        model_source={"name_or_path": str(paths["model"])},
        reference_source={"name_or_path": str(paths["reference"])},
        progress=False,
    )


# ------------------------------------------------------------------------------------------ driver
def _record(config: ExperimentConfig, name: str, inputs: dict[str, Any]) -> StageRecord:
    return StageRecord(name, Path(config.output_dir), inputs)


def _describe_failure(stage: str, error: BaseException) -> str:
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    return f"stage {stage} failed: {detail}"


def run_experiment(
    config: ExperimentConfig, stages: tuple[str, ...] = ("poison", "pretrain", "evaluate", "report")
) -> dict[str, Any]:
    """Run (or continue) ``config``; returns the report dict. Raises :class:`StageError` at the end
    when any stage failed, after writing a report of what finished."""
    from ..data import load_image_dataset

    check_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    source = load_image_dataset(config.dataset, config.dataset_config)
    features = source[next(iter(source))].features
    check_targets(config, features)
    plan = build_plan(config, features)
    failures: dict[str, str] = {}

    if "poison" in stages:
        for variant in plan.variants:
            record = _record(config, variant.key, poison_inputs(config, variant))
            if record.check():
                continue
            logger.info("poisoning %s", variant.name)
            _run_stage(record, variant.key, lambda v=variant: run_poison(config, v), failures)

    results: dict[str, dict[str, Any]] = {}

    def evaluate_ready(final: bool = False) -> None:
        """Evaluate every pair whose two models are trained: a long experiment shows its first
        results while later models still train (the parent process is idle meanwhile)."""
        for evaluation in plan.evaluations:
            if evaluation.key not in results and evaluation.key not in failures:
                _evaluate(config, evaluation, failures, results, final)

    if "pretrain" in stages:
        _run_pretraining(config, plan, failures, on_run_done=evaluate_ready if "evaluate" in stages else None)
    if "evaluate" in stages:
        evaluate_ready(final=True)
    elif "report" in stages:  # `--stages report` alone: report what earlier runs evaluated
        for evaluation in plan.evaluations:
            if _record(config, evaluation.key, _evaluation_inputs(config, evaluation)).check():
                results[evaluation.key] = _result_row(evaluation)
    rows = [results[e.key] for e in plan.evaluations if e.key in results]

    report: dict[str, Any] = {"config": config.to_dict(), "failures": failures}
    if "report" in stages:
        from .report import write_report

        pending = [e.key for e in plan.evaluations if e.key not in results and e.key not in failures]
        report = write_report(config, plan, rows, failures, pending)
    if failures:
        raise StageError(
            f"{len(failures)} stage(s) failed (what finished is kept; rerun to continue):\n"
            + "\n".join(f"- {message}" for message in failures.values())
        )
    return report


def _evaluate(
    config: ExperimentConfig,
    evaluation: Evaluation,
    failures: dict[str, str],
    results: dict[str, dict[str, Any]],
    final: bool = True,
) -> None:
    """Evaluate one backdoored model beside its clean twin once both are trained; before that,
    wait (``final`` False) or report the stage as skipped (``final`` True)."""
    upstream = (evaluation.run.key, evaluation.reference.key, evaluation.variant.key)
    if any(k in failures for k in upstream):
        failures[evaluation.key] = f"stage {evaluation.key} skipped: an earlier stage failed"
        return
    untrained = [k for k in upstream[:2] if _record(config, k, {}).info().get("status") != "done"]
    if untrained:
        if final:
            failures[evaluation.key] = (
                f"stage {evaluation.key} skipped: {', '.join(untrained)} not finished (run the pretrain stage)"
            )
        return
    record = _record(config, evaluation.key, _evaluation_inputs(config, evaluation))
    if not record.check():
        logger.info("evaluating %s", evaluation.key)

        def job() -> None:  # the metrics go to the evaluation's folder, not into the record
            run_evaluation(config, evaluation)

        if not _run_stage(record, evaluation.key, job, failures):
            return
    results[evaluation.key] = _result_row(evaluation)


def _run_pretraining(
    config: ExperimentConfig,
    plan: Plan,
    failures: dict[str, str],
    on_run_done: Callable[[], None] | None = None,
) -> None:
    """Train every model not trained yet; ``on_run_done()`` is called after each finishes."""
    pending: list[tuple[Run, StageRecord, dict[str, Any]]] = []
    for run in plan.runs:
        if run.variant is not None and run.variant.key in failures:
            failures[run.key] = f"stage {run.key} skipped: its poisoning failed"
            continue
        arguments = pretrain_arguments(config, run)
        record = _record(config, run.key, arguments)
        if not record.check():
            pending.append((run, record, arguments))
    if not pending:
        return
    workers = min(config.parallel, len(pending))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        # in-process: one run at a time, so a user's `accelerate launch` (GPUs, several nodes) applies
        for run, record, arguments in pending:
            _run_stage(record, run.key, lambda a=arguments: _train_job(a, threads), failures)
            if on_run_done is not None:
                on_run_done()
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {}
        for index, (run, record, arguments) in enumerate(pending):
            record.start()
            if index % workers:  # one progress bar on the terminal: the others log to train_log.jsonl
                arguments = {**arguments, "disable_tqdm": True}
            futures[pool.submit(_train_job, arguments, threads, os.getpid())] = (run, record)
        for future in concurrent.futures.as_completed(futures):
            run, record = futures[future]
            _run_stage(record, run.key, future.result, failures, started=True)
            if on_run_done is not None:
                on_run_done()


def _run_stage(
    record: StageRecord,
    key: str,
    job: Callable[[], dict[str, Any] | None],
    failures: dict[str, str],
    started: bool = False,
) -> bool:
    """Run one stage under its record: the job's returned dict is stored with the record; a
    failure is recorded and named in ``failures`` while the other stages go on. True on success."""
    if not started:
        record.start()
    try:
        record.finish(**(job() or {}))
    except Exception as error:  # noqa: BLE001  (a stage's failure is reported, others go on)
        record.fail(error)
        failures[key] = _describe_failure(key, error)
        return False
    return True


def _evaluation_inputs(config: ExperimentConfig, evaluation: Evaluation) -> dict[str, Any]:
    return {
        "model": str(evaluation.run.folder),
        "reference": str(evaluation.reference.folder),
        "variant": evaluation.variant.name,
        "epoch": evaluation.epoch,
        "evaluation": config.evaluation,
    }


def _result_row(evaluation: Evaluation) -> dict[str, Any]:
    metrics = json.loads((evaluation.folder / "metrics.json").read_text())
    variant = evaluation.variant
    return {
        "method": evaluation.run.method,
        "seed": evaluation.run.seed,
        "variant": variant.name,
        "pair": variant.pair,
        "ablation": list(variant.ablation) if variant.ablation else None,
        "poison": asdict(variant.config),
        "epoch": evaluation.epoch,
        "eval_dir": str(evaluation.folder),
        "metrics": metrics,
    }
