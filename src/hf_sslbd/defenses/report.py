"""The outputs of a defense: the saved student and its record, the before / after evaluation
(the defended student, its backdoored teacher and a clean model, measured with the evaluation
protocol on the same label subsets and test sets), and the defended card.

:func:`evaluate_defense` makes TWO :func:`hf_sslbd.evaluation.report.evaluate_encoder` calls (the
report compares one model with one reference): student vs clean in ``<out>/student`` and teacher
vs clean in ``<out>/teacher``, sharing one feature cache, so the clean model's features are
extracted once. It then writes what neither report has alone: ``before_after.md`` /
``before_after.json`` (teacher | defended | clean side by side, with the issue's acceptance
figures: defended target FP over clean, clean-accuracy drop from the teacher) and
``fp_per_class_<probe>.png`` with the three models' FP per class (mean over label seeds).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from ..cards import defended_card, save_model_card
from ..evaluation.inputs import EvaluationData
from ..evaluation.plots import plot_fp_per_class
from ..evaluation.report import EvaluationConfig, evaluate_encoder
from ..modeling import PREPROCESSOR_CONFIG_NAME, load_encoder, preprocessor_dict
from ..preprocessing import Preprocessing

DEFENSE_NAME = "compress-kd"
CLEAN_SUBSET_NAME = "clean_subset.json"
DEFENSE_CONFIG_NAME = "defense_config.json"
EVALUATION_DIR = "evaluation"
#: (key, label, kind) of the side-by-side table
TABLE_KEYS = (
    ("clean_accuracy", "clean accuracy", "pct"),
    ("patched_accuracy", "patched accuracy", "pct"),
    ("target_fp", "target FP", "count"),
    ("target_fp_rate", "ASR (target FP rate)", "pct"),
    ("nfp", "NFP", "ratio"),
)
#: the issue's acceptance: defended target FP <= 2x the clean model's, clean accuracy at most
#: 5 points below the teacher's
MAX_FP_RATIO_TO_CLEAN = 2.0
MAX_ACCURACY_DROP = 0.05


def _mean(report: dict[str, Any], tag: str, probe: str, fraction: str, key: str) -> float | None:
    return report["results"][tag][probe][fraction]["aggregate"].get(key, {}).get("mean")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def side_by_side(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``{probe: {fraction: {"teacher"|"defended"|"clean": {key: mean}, "acceptance": {...}}}}``."""
    out: dict[str, Any] = {}
    has_clean = "reference" in after["results"]
    for probe, per_fraction in after["results"]["model"].items():
        for fraction in per_fraction:
            models = {
                "teacher": (before, "model"),
                "defended": (after, "model"),
                **({"clean": (after, "reference")} if has_clean else {}),
            }
            values = {
                name: {key: _mean(report, tag, probe, fraction, key) for key, _, _ in TABLE_KEYS}
                for name, (report, tag) in models.items()
            }
            fp_ratio = _ratio(values["defended"]["target_fp"], values.get("clean", {}).get("target_fp"))
            teacher_acc, student_acc = (
                values["teacher"]["clean_accuracy"],
                values["defended"]["clean_accuracy"],
            )
            drop = None if teacher_acc is None or student_acc is None else teacher_acc - student_acc
            values["acceptance"] = {
                "defended_fp_over_clean_fp": fp_ratio,
                "teacher_fp_over_clean_fp": _ratio(values["teacher"]["target_fp"], values.get("clean", {}).get("target_fp")),
                "clean_accuracy_drop_from_teacher": drop,
                "passes": None if fp_ratio is None or drop is None
                else bool(fp_ratio <= MAX_FP_RATIO_TO_CLEAN and drop <= MAX_ACCURACY_DROP),
            }  # fmt: skip
            out.setdefault(probe, {})[fraction] = values
    return out


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    formats = {"pct": f"{100 * value:.2f}%", "points": f"{100 * value:.2f} points", "count": f"{value:.0f}"}
    return formats.get(kind, f"{value:.3f}")


def side_by_side_markdown(table: dict[str, Any]) -> str:
    lines = ["# Before / after the defense", ""]
    for probe, per_fraction in table.items():
        for fraction, values in per_fraction.items():
            names = [n for n in ("teacher", "defended", "clean") if n in values]
            lines += [
                f"## {probe} probe, {100 * float(fraction):g}% of labels",
                "",
                "| metric | " + " | ".join(names) + " |",
            ]
            lines.append("|---" * (len(names) + 1) + "|")
            for key, label, kind in TABLE_KEYS:
                lines.append(f"| {label} | " + " | ".join(_fmt(values[n][key], kind) for n in names) + " |")
            acc = values["acceptance"]
            lines += [
                "",
                f"- defended target FP / clean target FP: {_fmt(acc['defended_fp_over_clean_fp'], 'ratio')} "
                f"(teacher: {_fmt(acc['teacher_fp_over_clean_fp'], 'ratio')}; acceptance <= {MAX_FP_RATIO_TO_CLEAN:g})",
                f"- clean accuracy drop from the teacher: {_fmt(acc['clean_accuracy_drop_from_teacher'], 'points')} "
                f"(acceptance <= {100 * MAX_ACCURACY_DROP:g} points); passes: {acc['passes']}",
                "",
            ]
    return "\n".join(lines)


def _mean_per_class_fp(report: dict[str, Any], tag: str, probe: str, fraction: str) -> list[float]:
    seeds = report["results"][tag][probe][fraction]["seeds"].values()
    return np.mean([s["patched"]["per_class_fp"] for s in seeds], axis=0).tolist()


def evaluate_defense(
    student: str | Path,
    teacher: str,
    data: EvaluationData,
    config: EvaluationConfig | None = None,
    *,
    output_dir: str | Path,
    reference: str | None = None,
    teacher_revision: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the defended ``student`` and its ``teacher`` (each beside the clean ``reference``
    when given) and write the side-by-side files; returns ``{"after", "before", "table"}``."""
    config = config or EvaluationConfig()
    out = Path(output_dir)
    config = dataclasses.replace(config, cache_dir=config.cache_dir or str(out / "feature_cache"))
    ref = load_encoder(reference) if reference else None
    ref_source = {"name_or_path": reference} if reference else None
    reports = {}
    for name, source, revision in (("after", str(student), None), ("before", teacher, teacher_revision)):
        model, preprocessing = load_encoder(source, revision=revision)
        reports[name] = evaluate_encoder(
            model, preprocessing, data, config, reference=ref, progress=progress,
            output_dir=out / ("student" if name == "after" else "teacher"),
            model_source={"name_or_path": source, "revision": revision}, reference_source=ref_source,
        )  # fmt: skip
    after, before = reports["after"], reports["before"]
    table = side_by_side(after, before)
    fraction = f"{config.primary_fraction:g}"
    for probe in after["results"]["model"]:
        fp = {
            "teacher (backdoored)": _mean_per_class_fp(before, "model", probe, fraction),
            "defended": _mean_per_class_fp(after, "model", probe, fraction),
        }
        if ref is not None:
            fp["clean"] = _mean_per_class_fp(after, "reference", probe, fraction)
        plot_fp_per_class(
            fp, out / f"fp_per_class_{probe}.png", data.target, data.class_names,
            title=f"{probe} probe, {100 * config.primary_fraction:g}% of labels (mean over label seeds): FP per class on patched test images",
        )  # fmt: skip
    (out / "before_after.json").write_text(json.dumps(table, indent=1))
    (out / "before_after.md").write_text(side_by_side_markdown(table))
    return {"after": after, "before": before, "table": table}


def teacher_ssl_config(teacher: str) -> dict[str, Any] | None:
    """The teacher's SSL config (method, training data and its poisoning record ...) when the
    teacher is an hf-sslbd SSL checkpoint folder or its ``backbone/`` export; None otherwise
    (a Hub id or a plain backbone: the card then says the training data was not recorded)."""
    for path in (Path(teacher) / "config.json", Path(teacher).parent / "config.json"):
        if path.is_file():
            config = json.loads(path.read_text())
            if config.get("model_type") == "sslbd":
                return config
    return None


def save_student(
    student: PreTrainedModel, output_dir: Path, preprocessing: Preprocessing, record: dict[str, Any]
) -> Path:
    """Write the student as a plain backbone + the teacher's preprocessor config, the defense
    record (``defense_config.json``) and a defended card without metrics."""
    # a CPU copy in the standard memory format: the training one may be channels_last on a GPU
    student = copy.deepcopy(student).to("cpu", memory_format=torch.contiguous_format)
    student.save_pretrained(output_dir)
    (output_dir / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(preprocessor_dict(preprocessing), indent=2))
    (output_dir / DEFENSE_CONFIG_NAME).write_text(json.dumps(record, indent=1, default=str))
    write_defended_card(output_dir)
    return output_dir


def write_defended_card(
    output_dir: str | Path, after: dict[str, Any] | None = None, before: dict[str, Any] | None = None
) -> Path:
    """``output_dir/README.md``: the defended card from ``defense_config.json``, with the
    evaluation reports when given (the clean metrics are the student report's reference)."""
    out = Path(output_dir)
    record = json.loads((out / DEFENSE_CONFIG_NAME).read_text())
    teacher_config = record["teacher"].get("config") or {}
    config = {
        "backbone_config": json.loads((out / "config.json").read_text()),
        "image_size": teacher_config.get("image_size"),
        "data": teacher_config.get("data") or {},  # the teacher's (backdoored) training data
    }
    arguments = {k: v for k, v in record["arguments"].items() if k not in _NOT_SETTINGS}
    clean = after if after is not None and "reference" in after.get("results", {}) else None
    card = defended_card(
        config,
        defense=record["defense"],
        defense_config={**arguments, "resolved": record["resolved"]},
        teacher=record["teacher"]["name_or_path"],
        metrics_after=after,
        metrics_before=before,
        metrics_clean=None if clean is None else {"results": {"model": clean["results"]["reference"]}},
        clean_data=record["clean_data"],
        has_ssl_model=False,
    )
    return save_model_card(out, card)


#: arguments that say where things go or how they are shown, not what the defense did
_NOT_SETTINGS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "disable_tqdm", "logging_steps",
    "checkpointing_steps", "checkpoint_every_epoch", "checkpoints_total_limit", "dataloader_num_workers",
    "images_in_memory",
}  # fmt: skip


__all__ = [
    "EVALUATION_DIR",
    "evaluate_defense",
    "side_by_side",
    "side_by_side_markdown",
    "write_defended_card",
]
