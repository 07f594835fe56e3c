"""The experiment runner's mechanics on a small slice of real CIFAR-10: config errors, the stage
cache (skip, resume, refuse a different experiment's folder), a failing stage, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hf_sslbd.experiment import (
    ConfigKeyError,
    StageError,
    StaleCacheError,
    load_experiment_config,
    run_experiment,
)


@pytest.fixture(scope="module")
def small_cifar(cifar10, tmp_path_factory) -> str:
    """400 train / 200 test rows of real CIFAR-10 as a local dataset folder."""
    import datasets

    folder = tmp_path_factory.mktemp("cifar-small")
    small = datasets.DatasetDict(
        train=cifar10["train"].select(range(400)), test=cifar10["test"].select(range(200))
    )
    small.save_to_disk(str(folder))
    return str(folder)


def _write_config(path: Path, dataset: str, output_dir: Path, **changes) -> Path:
    config = {
        "name": "mechanics",
        "dataset": dataset,
        "output_dir": str(output_dir),
        "seeds": [0],
        "methods": ["simclr"],
        "pairs": [{"trigger": "htba:10", "target": "airplane"}],
        "poison": {"rate": 1.0, "trigger_size": 8},
        "pretrain": {
            "backbone": "resnet10-cifar",
            "backbone_width": 8,  # width 4 with channels_last crashes torch 2.13 CPU (heap corruption)
            "stem_stride": 2,
            "per_device_train_batch_size": 100,
            "num_train_epochs": 2,
            "disable_tqdm": True,
        },
        "evaluation": {"label_fraction": [0.5], "plots": False, "control_triggers": []},
        "ablations": {"epochs": [1]},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def test_unknown_keys_name_close_matches(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": [0]}))
    with pytest.raises(ConfigKeyError, match=r"'seed'.*did you mean 'seeds'"):
        load_experiment_config(path)
    path.write_text(yaml.safe_dump({"pairs": [{"trigger": "htba:1", "targte": "cat"}]}))
    with pytest.raises(ConfigKeyError, match=r"pairs\[0\]\.targte.*'target'"):
        load_experiment_config(path)
    path.write_text(yaml.safe_dump({"methods": ["simclrr"]}))
    with pytest.raises(ValueError, match="unknown method.*simclrr"):
        load_experiment_config(path)
    path.write_text(yaml.safe_dump({"acceptance": {"min_ratio": 5}}))
    with pytest.raises(ConfigKeyError, match=r"acceptance\.min_ratio.*'min_fp_rate_ratio'"):
        load_experiment_config(path)
    path.write_text(yaml.safe_dump({"acceptance": {"control_methods": ["rotnett"]}}))
    with pytest.raises(ValueError, match=r"acceptance\.control_methods.*rotnett"):
        load_experiment_config(path)
    path.write_text(yaml.safe_dump({"acceptance": {"max_clean_accuracy_gap": -3}}))
    with pytest.raises(ValueError, match=r"max_clean_accuracy_gap must be a number >= 0, got -3"):
        load_experiment_config(path)


def test_unknown_section_keys_fail_before_any_work(tmp_path: Path, small_cifar: str) -> None:
    out = tmp_path / "out"
    path = _write_config(tmp_path / "c.yaml", small_cifar, out, pretrain={"learnin_rate": 0.1})
    with pytest.raises(ConfigKeyError, match=r"pretrain\.learnin_rate.*'learning_rate'"):
        run_experiment(load_experiment_config(path))
    assert not (out / "stages").exists()
    path = _write_config(tmp_path / "c.yaml", small_cifar, out, evaluation={"label_fractions": [0.1]})
    with pytest.raises(ConfigKeyError, match=r"evaluation\.label_fractions.*'label_fraction'"):
        run_experiment(load_experiment_config(path))


def test_method_config_typos_fail_before_any_work(tmp_path: Path, small_cifar: str) -> None:
    out = tmp_path / "out"
    path = _write_config(
        tmp_path / "c.yaml", small_cifar, out, pretrain={"method_config": {"temprature": 0.5}}
    )
    with pytest.raises(ValueError, match=r"method 'simclr'.*\['temprature'\].*temperature"):
        run_experiment(load_experiment_config(path))
    assert not (out / "stages").exists()


@pytest.mark.parametrize(
    "shipped",
    sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml")),
    ids=lambda p: p.stem,
)
def test_shipped_configs_are_valid(shipped: Path, cifar10) -> None:
    """Every recipe in examples/configs passes the checks run_experiment makes before any work
    and plans on CIFAR-10: a typo there would otherwise show hours into a run."""
    from hf_sslbd.experiment.plan import build_plan
    from hf_sslbd.experiment.runner import check_config, check_targets

    config = load_experiment_config(shipped)
    check_config(config)
    check_targets(config, cifar10["train"].features)
    plan = build_plan(config, cifar10["train"].features)
    assert plan.runs and plan.evaluations


def test_target_must_be_a_class(tmp_path: Path, small_cifar: str) -> None:
    path = _write_config(
        tmp_path / "c.yaml", small_cifar, tmp_path / "out", pairs=[{"trigger": "htba:10", "target": "zebra"}]
    )
    with pytest.raises(ValueError, match=r"pairs\[0\].*unknown target class 'zebra'.*airplane"):
        run_experiment(load_experiment_config(path))


def test_run_cache_and_report(tmp_path: Path, small_cifar: str) -> None:
    out = tmp_path / "out"
    path = _write_config(tmp_path / "c.yaml", small_cifar, out)
    report = run_experiment(load_experiment_config(path))

    # every stage ran and is recorded as done
    stages = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    assert len(stages) == 1 + 2 + 2  # one variant, clean + backdoored run, final + epoch-1 evaluation
    assert all(s["status"] == "done" for s in stages.values())
    # the backdoored model trained on the poisoned variant, its twin on the clean data
    models = sorted(p.name for p in (out / "models").iterdir())
    variant = "htba-t10_target-airplane_rate-1.0_seed-0"  # the default 8 px size is not in the name
    assert models == ["simclr_clean_seed-0", f"simclr_{variant}"]
    backdoored = json.loads((out / "models" / models[1] / "config.json").read_text())
    assert backdoored["data"]["dataset_config"] == variant
    import datasets

    airplanes = sum(label == 0 for label in datasets.load_from_disk(small_cifar)["train"]["label"])
    assert backdoored["data"]["num_poisoned_rows"] == airplanes > 0  # rate 1.0: every airplane
    clean = json.loads((out / "models" / models[0] / "config.json").read_text())
    assert clean["data"]["dataset"] == small_cifar and clean["data"]["poisoning"] is None
    # the report has a row per evaluation, each beside the clean twin
    rows = report["by_probe"]["linear"]["rows"]
    assert sorted(str(r["epoch"]) for r in rows) == ["1", "None"]
    for row in rows:
        for model in ("backdoored", "clean"):
            assert 0.0 <= row[model]["clean_accuracy"] <= 1.0
            assert row[model]["target_fp"] is not None
    # the training-length curve runs through the ablated epoch and the main setting's final epoch
    (curve,) = report["by_probe"]["linear"]["ablations"].values()
    assert [point["value"] for point in curve] == [1.0, 2.0] and all(point["n"] == 1 for point in curve)
    final_rate = next(r for r in rows if r["epoch"] is None)["backdoored"]["target_fp_rate"]
    assert curve[1]["backdoored"]["target_fp_rate"]["mean"] == final_rate
    assert (out / "ablation_epochs_linear.png").exists()
    # the epoch-1 encoder differs from the final one (it was really taken from the checkpoint)
    final_eval = json.loads((Path(rows[0]["eval_dir"]) / "metrics.json").read_text())
    epoch_eval = json.loads((Path(rows[1]["eval_dir"]) / "metrics.json").read_text())
    fingerprints = {e["models"]["model"]["fingerprint"] for e in (final_eval, epoch_eval)}
    assert len(fingerprints) == 2
    assert "simclr" in (out / "results.md").read_text()
    # a card per model, carrying the final evaluation's measured values (the twin's as reference)
    from hf_sslbd.cards import card_metrics, parse_card

    assert sorted(report["cards"]) == [f"cards/{name}.md" for name in models]
    for name, which in ((models[0], "reference"), (models[1], "model")):
        card = parse_card((out / "models" / name / "README.md").read_text())
        assert card.data.to_dict()["hf_sslbd"]["kind"] == ("clean" if which == "reference" else "backdoored")
        linear = next(m for m in card_metrics(card) if m.probe == "linear")
        measured = final_eval["results"][which]["linear"]["0.5"]["aggregate"]["target_fp"]["mean"]
        assert linear.values["target_fp"] == measured
        assert (out / "cards" / f"{name}.md").read_text() == (out / "models" / name / "README.md").read_text()

    # a rerun skips every stage: nothing is retrained or re-evaluated
    weights = out / "models" / models[1] / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    metrics_mtime = (Path(rows[0]["eval_dir"]) / "metrics.json").stat().st_mtime_ns
    run_experiment(load_experiment_config(path))
    assert weights.stat().st_mtime_ns == mtime
    assert (Path(rows[0]["eval_dir"]) / "metrics.json").stat().st_mtime_ns == metrics_mtime
    # the report stage alone rebuilds the same table from the cached evaluations
    (out / "results.md").unlink()
    alone = run_experiment(load_experiment_config(path), stages=("report",))
    assert alone["by_probe"]["linear"]["rows"] == rows
    assert "| simclr | 1 |" in (out / "results.md").read_text() and alone["pending"] == []
    # an evaluation without a finished record is listed as pending, not reported and not failed
    (epoch_record,) = (out / "stages").glob("evaluate__*epoch-1.json")
    epoch_record.unlink()
    partial = run_experiment(load_experiment_config(path), stages=("report",))
    assert partial["pending"] == [epoch_record.stem] and partial["failures"] == {}
    assert [r["epoch"] for r in partial["by_probe"]["linear"]["rows"]] == [None]
    assert f"- {epoch_record.stem}" in (out / "results.md").read_text()

    # the same folder with a different recipe is refused, not overwritten
    changed = _write_config(tmp_path / "c2.yaml", small_cifar, out, pretrain={"num_train_epochs": 3})
    with pytest.raises(StaleCacheError, match="different experiment"):
        run_experiment(load_experiment_config(changed))
    assert weights.stat().st_mtime_ns == mtime


def test_failed_stage_is_named_and_finished_stages_kept(tmp_path: Path, small_cifar: str) -> None:
    out = tmp_path / "out"
    # a batch larger than the data: pretraining fails, poisoning has finished
    path = _write_config(
        tmp_path / "c.yaml", small_cifar, out, pretrain={"per_device_train_batch_size": 1000}, ablations={}
    )
    with pytest.raises(
        StageError, match=r"pretrain__simclr_clean_seed-0 failed.*fewer than one global batch"
    ):
        run_experiment(load_experiment_config(path))
    stages = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    poison = [s for name, s in stages.items() if name.startswith("poison__")]
    assert [s["status"] for s in poison] == ["done"]
    assert stages["pretrain__simclr_clean_seed-0"]["status"] == "failed"
    report = json.loads((out / "results.json").read_text())
    assert any("pretrain__simclr_clean_seed-0" in message for message in report["failures"].values())


def test_pairs_are_evaluated_as_soon_as_both_models_are_trained(tmp_path: Path, small_cifar: str) -> None:
    out = tmp_path / "out"
    path = _write_config(tmp_path / "c.yaml", small_cifar, out, seeds=[0, 1], ablations={}, parallel=1)
    config = load_experiment_config(path)
    # evaluating before anything is trained names the missing models instead of failing obscurely
    with pytest.raises(StageError, match=r"evaluate__simclr_.*skipped: pretrain__simclr_.*not finished"):
        run_experiment(config, stages=("poison", "evaluate", "report"))
    run_experiment(config)
    stages = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    variant = "htba-t10_target-airplane_rate-1.0_seed-0"
    # seed 0's pair was evaluated before seed 1's models started training
    assert (
        stages[f"evaluate__simclr_{variant}"]["started"] < stages["pretrain__simclr_clean_seed-1"]["started"]
    )
    assert stages[f"evaluate__simclr_{variant.replace('seed-0', 'seed-1')}"]["status"] == "done"


def _flat_row(fp_rate: float, seed: int = 0, ablation=None, epoch=None, pair: int = 0) -> dict:
    return {
        "method": "simclr",
        "seed": seed,
        "pair": pair,
        "ablation": ablation,
        "epoch": epoch,
        "backdoored": {"target_fp_rate": fp_rate},
        "clean": {"target_fp_rate": 0.04},
    }


def test_ablation_curves_pass_through_the_main_setting() -> None:
    from hf_sslbd.experiment.report import ablation_curves

    flat = [
        _flat_row(0.10, seed=0),
        _flat_row(0.14, seed=1),  # main setting: rate 1.0, trigger htba:10, 12 px
        _flat_row(0.06, seed=0, ablation=["rate", 0.5]),
        _flat_row(0.08, seed=1, ablation=["rate", 0.5]),
        _flat_row(0.30, seed=0, ablation=["trigger", "triggers/checkerboard-12px.png"]),
        _flat_row(0.50, seed=0, ablation=["trigger", "htba:3"]),
        _flat_row(0.90, seed=0, pair=1),  # another pair: not on the curves
    ]
    curves = ablation_curves(flat, "simclr", {"rate": 1.0, "trigger_size": 12, "trigger": "htba:10"})
    assert set(curves) == {"rate", "trigger"}
    rate = {point["value"]: point for point in curves["rate"]}
    assert list(rate) == [0.5, 1.0]  # numbers sorted, the main setting at its own value
    assert rate[0.5]["backdoored"]["target_fp_rate"]["mean"] == pytest.approx(0.07)
    assert rate[1.0]["n"] == 2 and rate[1.0]["backdoored"]["target_fp_rate"]["mean"] == pytest.approx(0.12)
    # trigger kinds are categories: the pair's own trigger first, then the order given
    assert [p["value"] for p in curves["trigger"]] == ["htba:10", "triggers/checkerboard-12px.png", "htba:3"]
    assert curves["trigger"][1]["backdoored"]["target_fp_rate"]["mean"] == pytest.approx(0.30)


def test_table_reports_the_excess_beside_the_ratio() -> None:
    """A clean twin that already leans to the target shrinks the ratio, not the excess (R13)."""
    from hf_sslbd.experiment.report import aggregate_by_method, markdown_table, summarise_rows

    def metrics(bd_rate: float, clean_rate: float) -> dict:
        def agg(rate: float) -> dict:
            return {"aggregate": {"target_fp_rate": {"mean": rate}, "target_fp": {"mean": rate * 9000}}}

        return {
            "results": {
                "model": {"linear": {"0.1": agg(bd_rate)}},
                "reference": {"linear": {"0.1": agg(clean_rate)}},
            }
        }

    base = {"method": "simclr", "variant": "v", "pair": 0, "ablation": None, "epoch": None, "eval_dir": "e"}
    rows = [
        {**base, "seed": 0, "metrics": metrics(0.275, 0.101)},  # high-baseline target: 2.7x, +17.4 points
        {**base, "seed": 1, "metrics": metrics(0.300, 0.035)},  # low-baseline target: 8.6x, +26.5 points
    ]
    flat = summarise_rows(rows, "linear", "0.1")
    assert [round(r["fp_rate_excess"], 3) for r in flat] == [0.174, 0.265]
    assert flat[0]["fp_rate_ratio"] == pytest.approx(0.275 / 0.101)
    entry = aggregate_by_method(flat)["simclr"]
    assert entry["fp_rate_excess"][0] == pytest.approx((0.174 + 0.265) / 2)
    header, _, line = markdown_table({"simclr": entry}).splitlines()
    assert header.rstrip(" |").endswith("FP rate excess (backdoored - clean), points")
    assert line.rstrip(" |").endswith("22.0 ± 6.4")
    # a twin with no false positives at all: the ratio is undefined, the excess is not
    (zero,) = summarise_rows([{**base, "seed": 0, "metrics": metrics(0.2, 0.0)}], "linear", "0.1")
    assert zero["fp_rate_ratio"] is None and zero["fp_rate_excess"] == pytest.approx(0.2)


def test_acceptance_marks_each_evaluation_met_or_missed() -> None:
    """Issue 6's targets: invariance methods >= 5x with clean accuracy within 3 points, controls
    (RotNet) <= 1.5x; a method is met only when every one of its final evaluations is."""
    from hf_sslbd.experiment.config import AcceptanceConfig
    from hf_sslbd.experiment.report import judge, judge_by_method, markdown_table

    acceptance = AcceptanceConfig(
        min_fp_rate_ratio=5.0, max_clean_accuracy_gap=3.0, max_control_fp_rate_ratio=1.5
    )

    def row(method: str, bd_rate: float, clean_rate: float, bd_acc: float = 0.60, clean_acc: float = 0.60,
            epoch: int | None = None) -> dict:  # fmt: skip
        return {
            "method": method, "seed": 0, "variant": "v", "pair": 0, "ablation": None, "epoch": epoch,
            "eval_dir": "e", "fp_rate_ratio": bd_rate / clean_rate if clean_rate else None,
            "fp_rate_excess": bd_rate - clean_rate,
            "backdoored": {"target_fp_rate": bd_rate, "clean_accuracy": bd_acc},
            "clean": {"target_fp_rate": clean_rate, "clean_accuracy": clean_acc},
        }  # fmt: skip

    assert judge(row("simclr", 0.30, 0.035), acceptance) == {"met": True, "missed": []}
    assert judge(row("simclr", 0.275, 0.101), acceptance)["missed"] == ["ratio 2.72 < 5"]
    drop = judge(row("simclr", 0.30, 0.035, bd_acc=0.55), acceptance)
    assert drop["missed"] == ["clean acc 5.0 points from the twin > 3"]
    assert judge(row("simclr", 0.2, 0.0), acceptance)["met"]  # a twin with no FP: the ratio is infinite
    assert judge(row("rotnet", 0.01, 0.07), acceptance)["met"]  # 0.15x: a control below its bound
    assert judge(row("rotnet", 0.12, 0.07), acceptance)["missed"] == ["ratio 1.71 > 1.5"]
    # RotNet's clean accuracy may move (its bound is on the ratio only); an unset target is not checked
    assert judge(row("rotnet", 0.01, 0.07, bd_acc=0.40), acceptance)["met"]
    assert judge(row("rotnet", 0.12, 0.07), AcceptanceConfig(min_fp_rate_ratio=5.0)) is None

    flat = [row("simclr", 0.30, 0.035), row("simclr", 0.275, 0.101), row("rotnet", 0.01, 0.07),
            row("simclr", 0.01, 0.01, epoch=4)]  # fmt: skip
    for item in flat:
        item["acceptance"] = judge(item, acceptance)
    verdicts = judge_by_method(flat, acceptance)  # the epoch-4 row is not a final evaluation
    assert verdicts == {"simclr": "**missed** (1/2 met)", "rotnet": "met (1/1)"}
    entry = {"n": 1, "fp_rate_ratio": (None, None, 0), "fp_rate_excess": (None, None, 0)}
    entry.update({f"{m}.{k}": (None, None, 0) for m in ("backdoored", "clean")
                  for k in ("clean_accuracy", "patched_accuracy", "target_fp", "target_fp_rate", "nfp")})  # fmt: skip
    header, _, line = markdown_table({"rotnet": entry}, verdicts).splitlines()
    assert header.rstrip(" |").endswith("acceptance") and line.rstrip(" |").endswith("met (1/1)")
    assert "acceptance" not in markdown_table({"rotnet": entry}).splitlines()[0]


def test_trigger_kind_ablation_shares_the_clean_twin(tmp_path: Path, cifar10) -> None:
    from hf_sslbd.experiment.plan import build_plan

    features = cifar10["train"].features
    checker = Path(__file__).resolve().parents[1] / "examples" / "triggers" / "checkerboard-12px.png"
    path = _write_config(
        tmp_path / "c.yaml", "unused", tmp_path / "out", ablations={"trigger": [str(checker)]}
    )
    plan = build_plan(load_experiment_config(path), features)
    ablated = [v for v in plan.variants if v.ablation is not None]
    assert [v.ablation for v in ablated] == [("trigger", str(checker))]
    assert ablated[0].config.trigger == str(checker) and ablated[0].config.target == "airplane"
    assert ablated[0].name.startswith("img-checkerboard-12px-")
    evaluation = next(e for e in plan.evaluations if e.variant is ablated[0])
    assert evaluation.reference.key == "pretrain__simclr_clean_seed-0"  # the main pair's clean twin
    # a trigger that is neither an HTBA id nor a file is refused before any work
    path = _write_config(
        tmp_path / "d.yaml", "unused", tmp_path / "out2", ablations={"trigger": ["nope.png"]}
    )
    with pytest.raises(ValueError, match="nope.png"):
        build_plan(load_experiment_config(path), features)


def test_seed_and_method_overrides_plan_a_part_of_the_same_experiment(tmp_path: Path, cifar10) -> None:
    """``--seeds`` / ``--methods`` of examples/experiment.py: a part of the config, under the same
    stage names as the whole (so the parts share one output_dir's cache)."""
    from hf_sslbd.experiment.plan import build_plan

    features = cifar10["train"].features
    path = _write_config(
        tmp_path / "c.yaml", "unused", tmp_path / "out", seeds=[0, 1], methods=["simclr", "byol"]
    )
    whole = build_plan(load_experiment_config(path), features)
    part = build_plan(load_experiment_config(path, seeds=[1], methods=["byol"]), features)
    variant = "htba-t10_target-airplane_rate-1.0_seed-1"
    assert [r.key for r in part.runs] == ["pretrain__byol_clean_seed-1", f"pretrain__byol_{variant}"]
    assert {r.key for r in part.runs} < {r.key for r in whole.runs}
    assert {e.key for e in part.evaluations} < {e.key for e in whole.evaluations}
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['moco'\]; known methods: .*mocov2"):
        load_experiment_config(path, methods=["moco"])


def test_cli_runs_the_chosen_seeds_only(tmp_path: Path, small_cifar: str) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "experiment.py"
    out = tmp_path / "out"
    path = _write_config(tmp_path / "c.yaml", small_cifar, out, seeds=[0, 1])
    command = [sys.executable, str(script), "--config", str(path), "--seeds", "1", "--stages", "poison"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert sorted(p.name for p in (out / "data").iterdir() if p.is_dir()) == [
        "htba-t10_target-airplane_rate-1.0_seed-1"
    ]
