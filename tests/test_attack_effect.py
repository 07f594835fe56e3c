"""The science: on real CIFAR-10 the backdoored SimCLR encoder of the demo recipe
(examples/configs/demo.yaml) calls patched images of other classes the target class more often
than its clean twin does, with about the same clean accuracy.

The full demo takes about 12 minutes on 2 cores (12 min 19 s; both models train side by side), so
it is marked ``attack`` and run by hand: ``python -m pytest -m attack -s tests/test_attack_effect.py``;
CI runs the same recipe cut to 4 epochs (the ``slow`` test below). Margins, from the demo's recipe
(RESULTS.md R10: PNG poison, 8 epochs; three labeled subsets): linear-probe target FP 748 (714-783
across subsets) against the clean twin's 382 (356-419), k-NN 708 (695-725) against 416 (396-434).
The backdoored model must exceed its twin by 1.4x AND 200 FP (linear), 1.5x (k-NN), with clean
accuracy within 3 points (R10: 0.4): the subsets move a mean by about +-40. The same margins held
for the previous recipes (R8: 10 epochs, 724 vs 372; R5: JPEG, 12 epochs, 661 vs 379). Session 1's
thresholds (1.5x and +300) came from ONE lucky labeled subset of an older recipe (R1: 1,063 FP on
seed 0, 225 and 447 on the others) and are withdrawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_sslbd.experiment import load_experiment_config, run_experiment

DEMO = Path(__file__).resolve().parents[1] / "examples" / "configs" / "demo.yaml"


def run_demo(cifar10_dir: Path, tmp_path: Path, **pretrain: object) -> dict:
    """The demo config on the real CIFAR-10, with ``pretrain`` overrides."""
    config = load_experiment_config(DEMO, dataset=str(cifar10_dir), output_dir=str(tmp_path / "out"))
    config.pretrain.update(pretrain)
    return run_experiment(config)


def assert_backdoor(report: dict, linear_ratio: float, linear_margin: int, knn_ratio: float) -> None:
    """The backdoored model's target FP beats its clean twin's by the given ratios and margin
    (both probes), and the backdoor costs at most 3 points of clean accuracy (the issue's bound)."""
    (row,) = report["by_probe"]["linear"]["rows"]
    (knn,) = report["by_probe"]["knn"]["rows"]
    backdoored, clean = row["backdoored"], row["clean"]
    print(f"linear: backdoored FP {backdoored['target_fp']} clean FP {clean['target_fp']}")
    print(f"k-NN: backdoored FP {knn['backdoored']['target_fp']} clean FP {knn['clean']['target_fp']}")
    assert backdoored["target_fp"] > linear_ratio * clean["target_fp"]
    assert backdoored["target_fp"] > clean["target_fp"] + linear_margin
    assert abs(backdoored["clean_accuracy"] - clean["clean_accuracy"]) < 0.03
    assert knn["backdoored"]["target_fp"] > knn_ratio * knn["clean"]["target_fp"]


@pytest.mark.attack
def test_backdoored_encoder_has_many_more_target_false_positives(cifar10_dir, tmp_path) -> None:
    assert_backdoor(run_demo(cifar10_dir, tmp_path), linear_ratio=1.4, linear_margin=200, knn_ratio=1.5)


@pytest.mark.slow
def test_short_demo_already_ties_the_trigger_to_the_target(cifar10_dir, tmp_path) -> None:
    """The demo recipe cut to 4 epochs, so that CI proves the attack on every change (about 7 minutes
    on 2 cores, the two models side by side). Margins from RESULTS.md R9 (this recipe, two seeds,
    three labeled subsets each): linear FP 653 vs 460 (seed 0) and 591 vs 380 (seed 1), i.e. 1.42x
    and 1.55x, +193 and +211; k-NN 589 vs 443 and 563 vs 404 (1.33x, 1.40x); clean accuracy within
    0.6 points. Asserted: 1.2x and +100 (linear), 1.15x (k-NN), clean accuracy within 3 points."""
    report = run_demo(cifar10_dir, tmp_path, num_train_epochs=4)
    assert_backdoor(report, linear_ratio=1.2, linear_margin=100, knn_ratio=1.15)
