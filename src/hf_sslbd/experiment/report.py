"""The experiment's report: one row per (method, pair, seed, epoch) evaluation, the mean and spread
over pairs and seeds per method, ablation curves, written as results.json + results.md + plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .cards import write_model_cards
from .config import AcceptanceConfig, ExperimentConfig
from .plan import Plan

#: headline values of the table: (metrics key, column title, format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("clean_accuracy", "clean acc %", "pct"),
    ("patched_accuracy", "patched acc %", "pct"),
    ("target_fp", "target FP", "count"),
    ("target_fp_rate", "FP rate (ASR) %", "pct"),
    ("nfp", "NFP", "ratio"),
)


def _headline(metrics: dict[str, Any], tag: str, probe: str, fraction: str) -> dict[str, float | None]:
    aggregate = metrics["results"][tag][probe][fraction]["aggregate"]
    values = {key: aggregate.get(key, {}).get("mean") for key, _, _ in COLUMNS}
    values["target_fp_unpatched"] = aggregate.get("target_fp_unpatched", {}).get("mean")
    for name, entry in aggregate.items():
        if name.startswith("specificity.") and name.endswith(".rate"):
            values[name] = entry.get("mean")
    return values


def summarise_rows(rows: list[dict[str, Any]], probe: str, fraction: str) -> list[dict[str, Any]]:
    """Flatten each evaluation to backdoored / clean headline values and their ratio."""
    flat = []
    for row in rows:
        metrics = row["metrics"]
        if probe not in metrics["results"]["model"] or fraction not in metrics["results"]["model"][probe]:
            continue
        backdoored = _headline(metrics, "model", probe, fraction)
        clean = _headline(metrics, "reference", probe, fraction)
        ratio = excess = None
        if backdoored["target_fp_rate"] is not None and clean["target_fp_rate"] is not None:
            # the ratio alone misleads when the clean twin already leans to the target (a patch
            # reads as "cat" to a clean CIFAR encoder: RESULTS.md R13); the excess does not
            excess = backdoored["target_fp_rate"] - clean["target_fp_rate"]
            if clean["target_fp_rate"]:
                ratio = backdoored["target_fp_rate"] / clean["target_fp_rate"]
        flat.append({**{k: row[k] for k in ("method", "seed", "variant", "pair", "ablation", "epoch", "eval_dir")},
                     "backdoored": backdoored, "clean": clean, "fp_rate_ratio": ratio,
                     "fp_rate_excess": excess})  # fmt: skip
    return flat


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None, 0
    return (
        float(np.mean(present)),
        (float(np.std(present, ddof=1)) if len(present) > 1 else None),
        len(present),
    )


def aggregate_by_method(flat: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean / std over pairs and seeds of every headline value, per method (main setting, final
    epoch only)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in flat:
        if row["ablation"] is None and row["epoch"] is None:
            groups[row["method"]].append(row)
    out = {}
    for method, items in groups.items():
        entry: dict[str, Any] = {"n": len(items)}
        for model in ("backdoored", "clean"):
            for key, _, _ in COLUMNS:
                entry[f"{model}.{key}"] = _mean_std([i[model][key] for i in items])
        entry["fp_rate_ratio"] = _mean_std([i["fp_rate_ratio"] for i in items])
        entry["fp_rate_excess"] = _mean_std([i["fp_rate_excess"] for i in items])
        out[method] = entry
    return out


def judge(row: dict[str, Any], acceptance: AcceptanceConfig) -> dict[str, Any] | None:
    """Whether one evaluation meets the config's acceptance targets: ``{"met": bool, "missed":
    [reasons]}``, or None when the config sets no target for this kind of method."""
    ratio = row["fp_rate_ratio"]
    if ratio is None and row["backdoored"]["target_fp_rate"]:
        ratio = float("inf")  # the twin has no false positives at all, the backdoored model has
    missed = []
    if row["method"] in acceptance.control_methods:
        bound = acceptance.max_control_fp_rate_ratio
        if bound is None:
            return None
        if ratio is not None and ratio > bound:
            missed.append(f"ratio {ratio:.2f} > {bound:g}")
    else:
        if acceptance.min_fp_rate_ratio is None and acceptance.max_clean_accuracy_gap is None:
            return None
        if acceptance.min_fp_rate_ratio is not None and (ratio or 0.0) < acceptance.min_fp_rate_ratio:
            missed.append(f"ratio {ratio or 0.0:.2f} < {acceptance.min_fp_rate_ratio:g}")
        gap_bound = acceptance.max_clean_accuracy_gap
        backdoored, clean = row["backdoored"]["clean_accuracy"], row["clean"]["clean_accuracy"]
        if gap_bound is not None and backdoored is not None and clean is not None:
            gap = 100 * abs(backdoored - clean)
            if gap > gap_bound:
                missed.append(f"clean acc {gap:.1f} points from the twin > {gap_bound:g}")
    return {"met": not missed, "missed": missed}


def _verdict_text(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "n/a"
    return "met" if verdict["met"] else "**missed**: " + "; ".join(verdict["missed"])


def judge_by_method(flat: list[dict[str, Any]], acceptance: AcceptanceConfig) -> dict[str, str]:
    """Per method, how many of its main-setting final evaluations (pairs x seeds) meet the
    targets: "met (2/2)" only when every one does."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in flat:
        verdict = row.get("acceptance")
        if verdict is None or row["ablation"] is not None or row["epoch"] is not None:
            continue
        counts[row["method"]][0] += verdict["met"]
        counts[row["method"]][1] += 1
    return {
        method: (f"met ({met}/{n})" if met == n else f"**missed** ({met}/{n} met)")
        for method, (met, n) in counts.items()
    }


def describe_acceptance(acceptance: AcceptanceConfig) -> str:
    """The targets in words, for the report's header."""
    parts = []
    if acceptance.min_fp_rate_ratio is not None:
        parts.append(f"target FP rate >= {acceptance.min_fp_rate_ratio:g}x the clean twin's")
    if acceptance.max_clean_accuracy_gap is not None:
        parts.append(f"clean accuracy within {acceptance.max_clean_accuracy_gap:g} points of the twin's")
    text = " and ".join(parts)
    if acceptance.max_control_fp_rate_ratio is not None:
        controls = ", ".join(acceptance.control_methods)
        text += ("; " if text else "") + f"{controls}: ratio <= {acceptance.max_control_fp_rate_ratio:g}x"
    return text


def _fmt(stat: tuple[float | None, float | None, int], kind: str) -> str:
    mean, std, _ = stat
    if mean is None:
        return "n/a"
    scale, digits = (100.0, 1) if kind == "pct" else (1.0, 0 if kind == "count" else 2)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def markdown_table(aggregates: dict[str, dict[str, Any]], verdicts: dict[str, str] | None = None) -> str:
    """The per-method table; ``verdicts`` (from :func:`judge_by_method`) adds an acceptance column."""
    header = ["method", "n"]
    for _, title, _ in COLUMNS:
        header += [f"{title} backdoored", f"{title} clean"]
    header += ["FP rate ratio (backdoored / clean)", "FP rate excess (backdoored - clean), points"]
    if verdicts is not None:
        header.append("acceptance")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in aggregates.items():
        cells = [method, str(entry["n"])]
        for key, _, kind in COLUMNS:
            cells += [_fmt(entry[f"backdoored.{key}"], kind), _fmt(entry[f"clean.{key}"], kind)]
        cells += [_fmt(entry["fp_rate_ratio"], "ratio"), _fmt(entry["fp_rate_excess"], "pct")]
        if verdicts is not None:
            cells.append(verdicts.get(method, "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_row_table(flat: list[dict[str, Any]], with_acceptance: bool = False) -> str:
    extra = " acceptance |" if with_acceptance else ""
    lines = [
        "| method | variant | seed | epoch | clean acc % (bd / clean) | target FP (bd / clean) "
        "| FP rate % (bd / clean) | ratio | excess (points) |" + extra,
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_acceptance else ""),
    ]
    for row in flat:
        b, c = row["backdoored"], row["clean"]

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}"

        def cnt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.0f}"

        ratio = "n/a" if row["fp_rate_ratio"] is None else f"{row['fp_rate_ratio']:.2f}"
        lines.append(
            f"| {row['method']} | {row['variant']} | {row['seed']} | {row['epoch'] or 'final'} "
            f"| {pct(b['clean_accuracy'])} / {pct(c['clean_accuracy'])} | {cnt(b['target_fp'])} / "
            f"{cnt(c['target_fp'])} | {pct(b['target_fp_rate'])} / {pct(c['target_fp_rate'])} | {ratio} "
            f"| {pct(row['fp_rate_excess'])} |"
            + (f" {_verdict_text(row.get('acceptance'))} |" if with_acceptance else "")
        )
    return "\n".join(lines)


#: ablated parameters whose values are categories (plotted in the order given), not numbers
CATEGORICAL_ABLATIONS = ("trigger",)


def _ablation_value(key: str, value: Any) -> float | str:
    return str(value) if key in CATEGORICAL_ABLATIONS else float(value)


def ablation_curves(
    flat: list[dict[str, Any]], method: str, main_values: dict[str, float | str]
) -> dict[str, list[dict[str, Any]]]:
    """Target FP rate against each ablated parameter for ``method`` on the first pair: one point
    per value (mean and std over seeds), the main setting included at its own value (e.g. rate
    1.0 beside the ablated 0.5; the final epoch beside the intermediate ones; the pair's trigger
    first beside other trigger kinds)."""
    by_key: dict[str, dict[float | str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    main = []
    for row in flat:
        if row["method"] != method or row["pair"] != 0:
            continue
        if row["ablation"] is not None:
            key, value = row["ablation"]
            by_key[key][_ablation_value(key, value)].append(row)
        elif row["epoch"] is not None:
            by_key["epochs"][float(row["epoch"])].append(row)
        else:
            main.append(row)
    curves = {}
    for key, points in by_key.items():
        if key in main_values and main:
            main_value = _ablation_value(key, main_values[key])
            if key in CATEGORICAL_ABLATIONS:  # the main setting first, then the order given
                points = {main_value: [], **points}
            points[main_value] = [*points[main_value], *main]
        order = list(points) if key in CATEGORICAL_ABLATIONS else sorted(points)
        curve = []
        for value in order:
            entry: dict[str, Any] = {"value": value, "n": len(points[value])}
            for model in ("backdoored", "clean"):
                mean, std, _ = _mean_std([r[model]["target_fp_rate"] for r in points[value]])
                entry[model] = {"target_fp_rate": {"mean": mean, "std": std}}
            curve.append(entry)
        curves[key] = curve
    return curves


def _ablation_plots(curves: dict[str, list[dict[str, Any]]], out: Path, probe: str, method: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, curve in curves.items():
        figure, axis = plt.subplots(figsize=(5, 3.5))
        # categories (trigger specs) by their short name: an image trigger's file name
        xs = [
            point["value"] if key not in CATEGORICAL_ABLATIONS else Path(point["value"]).name
            for point in curve
        ]
        for model, style, label in (("backdoored", "o-", "backdoored"), ("clean", "s--", "clean twin")):
            values = [point[model]["target_fp_rate"] for point in curve]
            means = [np.nan if v["mean"] is None else 100 * v["mean"] for v in values]
            stds = [0.0 if v["std"] is None else 100 * v["std"] for v in values]
            if key in CATEGORICAL_ABLATIONS:  # separate kinds: no line between them
                style = style[0]
            axis.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=label)
        axis.set_xlabel(key)
        axis.set_ylabel(f"target FP rate % ({probe})")
        axis.set_title(f"{method}: mean ± std over seeds", fontsize=9)
        axis.legend()
        figure.tight_layout()
        path = out / f"ablation_{key}_{probe}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path.name)
    return written


def _main_values(config: ExperimentConfig, plan: Plan) -> dict[str, float | str]:
    """The main setting's value of each ablated parameter (where the sweep's curve passes)."""
    from ..training import PretrainArguments

    values: dict[str, float | str] = {}
    if plan.variants:
        values["rate"] = plan.variants[0].config.rate
        values["trigger_size"] = plan.variants[0].config.trigger_size
        values["trigger"] = plan.variants[0].config.trigger
    if config.pretrain.get("max_train_steps") is None:
        default = PretrainArguments.__dataclass_fields__["num_train_epochs"].default
        values["epochs"] = config.pretrain.get("num_train_epochs", default)
    return values


def write_report(
    config: ExperimentConfig,
    plan: Plan,
    rows: list[dict[str, Any]],
    failures: dict[str, str],
    pending: list[str] | None = None,
) -> dict[str, Any]:
    """Write results.md / results.json / plots / cards from the evaluated ``rows``; ``failures``
    and ``pending`` (evaluations not run yet, e.g. after ``--stages report``) are listed."""
    out = Path(config.output_dir)
    evaluation = config.evaluation
    fractions = evaluation.get("label_fraction", [0.01, 0.1, 1.0])
    primary = f"{(0.1 if 0.1 in fractions else max(fractions)):g}"
    probes = evaluation.get("probes", ["linear", "knn"])
    report: dict[str, Any] = {
        "config": config.to_dict(),
        "primary_label_fraction": primary,
        "failures": failures,
        "pending": list(pending or []),
        "stages": {
            "variants": len(plan.variants),
            "runs": len(plan.runs),
            "evaluations": len(plan.evaluations),
        },
        "rows": [{k: v for k, v in row.items() if k != "metrics"} for row in rows],
        "by_probe": {},
        "plots": [],
    }
    sections = [f"# {config.name}", "", config.description or "", ""]
    if config.recipe_note:
        sections += [f"> {config.recipe_note}", ""]
    acceptance = config.acceptance if config.acceptance.active else None
    if acceptance is not None:
        sections += [f"Acceptance (per evaluation): {describe_acceptance(acceptance)}.", ""]
    for probe in probes:
        flat = summarise_rows(rows, probe, primary)
        verdicts = None
        if acceptance is not None:
            for row in flat:
                row["acceptance"] = judge(row, acceptance)
            verdicts = judge_by_method(flat, acceptance)
        aggregates = aggregate_by_method(flat)
        report["by_probe"][probe] = {"rows": flat, "by_method": aggregates, "acceptance": verdicts}
        sections += [
            f"## {probe} probe, {float(primary):.0%} labels (mean ± std over pairs and seeds)",
            "",
            markdown_table(aggregates, verdicts),
            "",
            "<details><summary>every evaluation</summary>",
            "",
            _per_row_table(flat, with_acceptance=acceptance is not None),
            "",
            "</details>",
            "",
        ]
        curves = ablation_curves(flat, config.methods[0], _main_values(config, plan))
        report["by_probe"][probe]["ablations"] = curves
        report["plots"] += _ablation_plots(curves, out, probe, config.methods[0])
    report["cards"] = [str(path.relative_to(out)) for path in write_model_cards(plan, out)]
    if report["cards"]:
        sections += ["Model cards (also README.md in each model folder): " + ", ".join(report["cards"]), ""]
    if failures:
        sections += ["## Failed stages", ""] + [f"- {m}" for m in failures.values()] + [""]
    if pending:
        sections += ["## Not evaluated yet (run the experiment without --stages to continue)", ""]
        sections += [f"- {key}" for key in pending] + [""]
    sections += [
        "FP = patched test images of the other classes predicted as the target; FP rate = FP / "
        "patched non-target images (= attack success rate); FP rate excess = the backdoored model's FP "
        "rate minus its clean twin's, in percentage points (read it beside the ratio when the twin's own "
        "rate is high); NFP = target FP / the largest per-class FP. "
        "Each backdoored model is evaluated beside its clean twin (same method, seed and recipe) on the "
        "same labeled subsets and the same patched images; per-evaluation details in eval/*/metrics.json.",
        "",
    ]
    (out / "results.md").write_text("\n".join(sections))
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    return report
