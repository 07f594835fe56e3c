"""The CompRess distillation defense: the loss by hand, the banks, the clean subset, bad input,
exact resume, a short real CIFAR-10 distillation, the outputs and card, the before / after
evaluation, and the examples/defend.py dispatch."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_sslbd.backbones import build_backbone, pooled_features
from hf_sslbd.defenses.clean_subset import (
    CleanSubset,
    CleanSubsetError,
    PoisonedRowsError,
    draw_clean_subset,
    given_clean_subset,
)
from hf_sslbd.defenses.distillation import (
    CompRessDistiller,
    DistillationArguments,
    build_student,
    compress_loss,
    resolve_bank_size,
)
from hf_sslbd.defenses.distillation_training import distill
from hf_sslbd.modeling import load_encoder, preprocessor_dict
from hf_sslbd.preprocessing import Preprocessing, images_to_batch, normalize

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "defend.py"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_cifar(cifar10, tmp_path_factory) -> Path:
    """96 train / 32 test rows of real CIFAR-10 (save_to_disk: fast to reload)."""
    folder = tmp_path_factory.mktemp("tiny_cifar")
    datasets.DatasetDict(
        train=cifar10["train"].select(range(96)), test=cifar10["test"].select(range(32))
    ).save_to_disk(folder)
    return folder


def save_encoder_folder(model, folder: Path, image_size: int = 32) -> Path:
    """A plain backbone folder as export_backbone writes it (weights + preprocessor config)."""
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(Preprocessing(image_size))))
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A small random-init CIFAR ResNet as the frozen teacher (its weights differ from any
    student's: another seed)."""
    torch.manual_seed(123)
    model = build_backbone("resnet10-cifar", width=8, stem_stride=2)
    return save_encoder_folder(model, tmp_path_factory.mktemp("teacher"))


def kd_args(teacher: Path, dataset: Path, output_dir: Path, **overrides) -> DistillationArguments:
    values = dict(
        teacher=str(teacher), dataset=str(dataset), output_dir=str(output_dir), clean_fraction=2 / 3,
        per_device_train_batch_size=16, bank_size=32, max_train_steps=2, logging_steps=1,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return DistillationArguments(**values)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- the loss


def test_loss_is_zero_when_student_matches_teacher():
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 16, generator=generator), dim=1)
    teacher = torch.randn(8, 16, generator=generator)
    assert compress_loss(teacher, teacher, bank).item() == pytest.approx(0.0, abs=1e-6)
    # embeddings are L2-normalised first: a scaled copy is the same embedding
    assert compress_loss(teacher, 3.0 * teacher, bank).item() == pytest.approx(0.0, abs=1e-6)
    assert compress_loss(teacher, torch.randn(8, 16, generator=generator), bank).item() > 0.1


def test_loss_two_sample_case_by_hand():
    # bank = {e1, e2}; teacher rows e1, e2; student rows swapped. At temperature T the teacher's
    # distribution of row 1 is (a, 1 - a) with a = sigmoid(1/T), the student's (1 - a, a), and
    # KL = a log(a / (1 - a)) + (1 - a) log((1 - a) / a) = (2a - 1) / T = tanh(1 / 2T) / T.
    bank, teacher = torch.eye(2), torch.eye(2)
    student = teacher.flip(0)
    for temperature in (1.0, 0.5, 0.04):
        expected = math.tanh(1 / (2 * temperature)) / temperature
        got = compress_loss(teacher, student, bank, temperature=temperature).item()
        assert got == pytest.approx(expected, rel=1e-5), temperature
    # 2q: the student is compared with its own bank; swapping that bank's rows undoes the swap
    assert compress_loss(teacher, student, bank, bank.flip(0), temperature=0.5).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_loss_rejects_widths_that_do_not_match_the_bank():
    with pytest.raises(
        ValueError, match="embedding widths do not match their banks: teacher 8 vs bank 8, student 4"
    ):
        compress_loss(torch.randn(2, 8), torch.randn(2, 4), torch.randn(10, 8))


# ---------------------------------------------------------------------------------------------- banks


def small_student(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("resnet10-cifar", width=8, stem_stride=2)


def test_teacher_bank_is_read_before_the_batch_is_enqueued_and_wraps():
    distiller = CompRessDistiller(small_student(), teacher_dim=64, bank_size=6, temperature=0.1)
    generator = torch.Generator().manual_seed(1)
    views = torch.randn(2, 4, 3, 32, 32, generator=generator)
    teachers = torch.randn(2, 4, 64, generator=generator)
    initial = distiller.teacher_bank.clone()
    out = distiller(views[0], teachers[0])
    # the loss used the bank as it was before this batch (no image meets its own embedding)
    with torch.no_grad():
        student = distiller.embed(views[0])
    torch.testing.assert_close(out["loss"], compress_loss(teachers[0], student, initial, temperature=0.1))
    unit = F.normalize(teachers, dim=2)
    torch.testing.assert_close(distiller.teacher_bank[:4], unit[0])
    torch.testing.assert_close(distiller.teacher_bank[4:], initial[4:])
    assert int(distiller.teacher_bank_ptr) == 4
    distiller(views[1], teachers[1])  # 4 more rows: 2 at the end, then 2 from the start
    torch.testing.assert_close(distiller.teacher_bank[4:], unit[1, :2])
    torch.testing.assert_close(distiller.teacher_bank[:2], unit[1, 2:])
    torch.testing.assert_close(distiller.teacher_bank[2:4], unit[0, 2:])
    assert int(distiller.teacher_bank_ptr) == 2


def test_heads_and_the_2q_momentum_student():
    # 1q compares the student with the TEACHER bank: a narrower student needs a head
    narrow = CompRessDistiller(small_student(), teacher_dim=128, bank_size=8)
    assert narrow.head_kind == "linear" and narrow.head.out_features == 128
    assert CompRessDistiller(small_student(), teacher_dim=64, bank_size=8).head_kind == "none"
    with pytest.raises(ValueError, match="student's features are 64-d and the teacher's 128-d"):
        CompRessDistiller(small_student(), teacher_dim=128, bank_size=8, head="none")
    # 2q: a bank of momentum-student embeddings, no head needed, EMA only on on_optimizer_step
    two = CompRessDistiller(small_student(), teacher_dim=128, bank_size=8, variant="2q", key_momentum=0.9)
    assert two.head_kind == "none" and two.student_bank.shape == (8, 64)
    for online, key in zip(two.student.parameters(), two.key_student.parameters(), strict=True):
        assert torch.equal(online, key) and not key.requires_grad
    two(torch.randn(4, 3, 32, 32), torch.randn(4, 128))
    assert int(two.student_bank_ptr) == 4 and int(two.teacher_bank_ptr) == 4
    before = [p.clone() for p in two.key_student.parameters()]
    with torch.no_grad():
        for parameter in two.student.parameters():
            parameter.add_(1.0)
    two.on_optimizer_step()
    for old, key, online in zip(before, two.key_student.parameters(), two.student.parameters(), strict=True):
        torch.testing.assert_close(key, 0.9 * old + 0.1 * online)


# ---------------------------------------------------------------------------------------------- clean subset


@pytest.fixture(scope="module")
def flagged(cifar10) -> datasets.Dataset:
    """200 real rows, every third one marked poisoned."""
    rows = cifar10["train"].select(range(200))
    return rows.add_column("is_poisoned", [i % 3 == 0 for i in range(200)])


def test_clean_subset_fraction_and_seed(cifar10):
    rows = cifar10["train"].select(range(200))
    subset = draw_clean_subset(rows, 0.1, seed=3)
    assert len(subset) == 20 and np.all(np.diff(subset.indices) > 0)
    assert np.array_equal(subset.indices, draw_clean_subset(rows, 0.1, seed=3).indices)
    assert not np.array_equal(subset.indices, draw_clean_subset(rows, 0.1, seed=4).indices)
    assert len(draw_clean_subset(rows, 1.0).indices) == 200
    labels = np.asarray(rows["label"])
    stratified = draw_clean_subset(rows, 0.5, seed=0, balance="stratified")
    counts = np.bincount(labels[stratified.indices], minlength=10)
    assert counts.tolist() == [n // 2 for n in np.bincount(labels, minlength=10)]
    equal = draw_clean_subset(rows, 0.5, seed=0, balance="equal")
    assert len(set(np.bincount(labels[equal.indices], minlength=10).tolist())) == 1


def test_clean_subset_never_holds_a_poisoned_row(flagged, tmp_path):
    poisoned = np.flatnonzero(flagged["is_poisoned"])
    for seed in range(5):
        subset = draw_clean_subset(flagged, 0.5, seed=seed)
        assert not set(subset.indices) & set(poisoned)
    whole = draw_clean_subset(flagged, 1.0)  # the fraction is of the clean rows
    assert len(whole) == whole.num_eligible_rows == 133 and whole.excluded_poisoned_rows == 67
    # the manifest round trip keeps the rows and the rule
    path = whole.save(tmp_path / "clean_subset.json")
    loaded = CleanSubset.load(path)
    assert np.array_equal(loaded.indices, whole.indices) and loaded.excluded_poisoned_rows == 67


def test_explicit_poisoned_rows_are_refused(flagged):
    with pytest.raises(PoisonedRowsError, match=r"2 of the 4 rows given .* are poisoned .* rows \[0, 3\]"):
        given_clean_subset(flagged, [0, 1, 2, 3])
    assert given_clean_subset(flagged, [1, 2, 4]).indices.tolist() == [1, 2, 4]
    with pytest.raises(CleanSubsetError, match=r"row ids must be in \[0, 200\)"):
        given_clean_subset(flagged, [1, 200])


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), True])
def test_fraction_outside_0_1(flagged, fraction):
    with pytest.raises(CleanSubsetError, match="clean fraction"):
        draw_clean_subset(flagged, fraction)
    with pytest.raises(ValueError, match="clean fraction"):
        DistillationArguments(teacher="t", dataset="d", output_dir="o", clean_fraction=fraction)


def test_bank_larger_than_the_clean_subset():
    with pytest.raises(ValueError, match=r"bank_size 5000 is larger than the clean subset \(2500 rows\)"):
        resolve_bank_size(5000, 2500, 256)
    with pytest.raises(ValueError, match="smaller than the global batch 256"):
        resolve_bank_size(128, 2500, 256)
    assert resolve_bank_size(None, 2500, 256) == 2500 and resolve_bank_size(None, 50000, 256) == 4096


def test_a_run_refuses_a_bank_larger_than_its_subset_and_poisoned_rows(teacher_dir, tiny_cifar, tmp_path):
    with pytest.raises(ValueError, match=r"bank_size 100 is larger than the clean subset \(64 rows\)"):
        distill(kd_args(teacher_dir, tiny_cifar, tmp_path / "a", bank_size=100))
    assert not (tmp_path / "a" / "checkpoints").exists()
    flagged = datasets.load_from_disk(str(tiny_cifar))
    flagged["train"] = flagged["train"].add_column("is_poisoned", [i < 5 for i in range(96)])
    flagged.save_to_disk(tmp_path / "flagged")
    CleanSubset(np.arange(20), None, None, "given", 96, 96, 0).save(tmp_path / "rows.json")
    with pytest.raises(PoisonedRowsError, match=r"5 of the 20 rows"):
        distill(
            kd_args(teacher_dir, tmp_path / "flagged", tmp_path / "b", clean_rows=str(tmp_path / "rows.json"))
        )


# ---------------------------------------------------------------------------------------------- student


def test_teacher_and_student_input_sizes_must_match(tmp_path):
    from hf_sslbd.backbones import backbone_config

    backbone_config("vit-tiny", image_size=224).save_pretrained(tmp_path / "vit224")
    teacher = small_student(1).config
    args = DistillationArguments(teacher="t", dataset="d", output_dir="o", student=str(tmp_path / "vit224"))
    with pytest.raises(
        ValueError,
        match=r"the teacher takes 32 px images, the student .*vit224 \(architecture\) takes 224 px",
    ):
        build_student(args, teacher, 32)
    wide = save_encoder_folder(small_student(2), tmp_path / "resnet64", image_size=64)
    args = DistillationArguments(
        teacher="t", dataset="d", output_dir="o", student=str(wide), student_pretrained=True
    )
    with pytest.raises(
        ValueError, match=r"takes 32 px images, the student .* \(pretrained weights\) takes 64 px"
    ):
        build_student(args, teacher, 32)
    # a preset is built for the teacher's size; unset = the teacher's architecture, fresh weights
    vit = build_student(
        DistillationArguments(teacher="t", dataset="d", output_dir="o", student="vit-tiny"), teacher, 32
    )
    assert vit.config.image_size == 32
    torch.manual_seed(0)
    same = build_student(DistillationArguments(teacher="t", dataset="d", output_dir="o"), teacher, 32)
    assert same.config.hidden_sizes == teacher.hidden_sizes and same.config.stem_stride == teacher.stem_stride


# ---------------------------------------------------------------------------------------------- runs


def test_resume_gives_the_same_student_as_uninterrupted(teacher_dir, tiny_cifar, tmp_path):
    # 64 clean rows / batch 16 = 4 micro-batches per epoch, 2 per step; 5 steps = 3 epochs, the last
    # partial; interrupted at step 3, mid-epoch. The banks and the optimizer come back from step_3.
    common = dict(
        max_train_steps=5, gradient_accumulation_steps=2, checkpoint_every_epoch=False, learning_rate=2.0
    )
    for variant in ("1q", "2q"):
        whole = distill(
            kd_args(teacher_dir, tiny_cifar, tmp_path / variant / "whole", compress_variant=variant, **common)
        )
        assert whole.finished and whole.global_step == 5
        split = tmp_path / variant / "split"
        first = distill(
            kd_args(
                teacher_dir,
                tiny_cifar,
                split,
                stop_after_step=3,
                resume_from_checkpoint="auto",
                compress_variant=variant,
                **common,
            )  # fmt: skip
        )  # "auto" in an empty folder: a fresh start
        assert not first.finished and first.checkpoint == split / "checkpoints" / "step_3"
        assert not (split / "model.safetensors").exists()  # no student from a stopped run
        second = distill(
            kd_args(
                teacher_dir,
                tiny_cifar,
                split,
                resume_from_checkpoint="auto" if variant == "1q" else "latest",
                compress_variant=variant,
                **common,
            )
        )
        assert second.finished and second.global_step == 5
        expected, got = (
            load_file(tmp_path / variant / "whole" / "model.safetensors"),
            load_file(split / "model.safetensors"),
        )
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=f"{variant} {key}")
        assert [r["step"] for r in read_log(split)] == [1, 2, 3, 4, 5]
        losses = {r["step"]: r["loss"] for r in read_log(tmp_path / variant / "whole")}
        assert all(r["loss"] == pytest.approx(losses[r["step"]], abs=1e-5) for r in read_log(split))
    # a different clean subset is another run: refused
    with pytest.raises(ValueError, match="belongs to a different run"):
        distill(
            kd_args(
                teacher_dir,
                tiny_cifar,
                split,
                resume_from_checkpoint="latest",
                seed=1,
                compress_variant="2q",
                **common,
            )
        )


def _cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between two feature sets of the same images."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def _neighbour_overlap(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean share of each image's k nearest neighbours (cosine) that both feature sets agree on."""
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    a = (x @ x.T).fill_diagonal_(-2).topk(k).indices
    b = (y @ y.T).fill_diagonal_(-2).topk(k).indices
    return float(np.mean([len(set(a[i].tolist()) & set(b[i].tolist())) / k for i in range(len(a))]))


def test_short_cifar10_distillation_moves_the_student_towards_the_teacher(
    teacher_dir, cifar10, cifar10_dir, tmp_path
):
    # 256 clean training rows, 6 epochs of batch 32; measured on 256 held-out test images
    out = tmp_path / "kd"
    args = kd_args(
        teacher_dir, cifar10_dir, out, clean_fraction=256 / 50000, per_device_train_batch_size=32,
        bank_size=128, max_train_steps=None, num_train_epochs=6, learning_rate=2.0, checkpoint_every_epoch=False,
    )  # fmt: skip
    result = distill(args)
    assert len(result.clean_subset) == 256
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 48
    # the first steps are left out: the bank starts as random vectors
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[2:10]), losses
    test = cifar10["test"].select(range(256)).cast_column("img", datasets.Image(decode=False))
    images = normalize(
        images_to_batch(test["img"], Preprocessing(32)), Preprocessing(32).mean, Preprocessing(32).std
    )

    def features(model):
        with torch.no_grad():
            return pooled_features(model.eval(), images)

    teacher, _ = load_encoder(teacher_dir)
    student, _ = load_encoder(out)
    torch.manual_seed(0)  # the student's initial weights: same seed, same architecture
    initial = build_student(args, teacher.config, 32)
    t, before, after = features(teacher), features(initial), features(student)
    assert _cka(t, after) > _cka(t, before) + 0.1, (_cka(t, before), _cka(t, after))
    assert _neighbour_overlap(t, after) > _neighbour_overlap(t, before) + 0.03


# ---------------------------------------------------------------------------------------------- outputs, CLI


def load_example():
    spec = importlib.util.spec_from_file_location("defend_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_outputs_and_card(teacher_dir, tiny_cifar, tmp_path, capsys):
    from hf_sslbd.cards import parse_card

    defend = load_example()
    out = tmp_path / "defended"
    summary = defend.main(
        [
            "--method", "kd", "--teacher", str(teacher_dir), "--dataset", str(tiny_cifar), "--output_dir", str(out),
            "--clean_fraction", "0.5", "--per_device_train_batch_size", "16", "--bank_size", "48",
            "--max_train_steps", "3", "--disable_tqdm", "true", "--seed", "2",
        ]
    )  # fmt: skip
    assert summary["finished"] and summary["global_step"] == 3 and summary["clean_rows"] == 48
    student, preprocessing = load_encoder(out)  # a plain backbone + the teacher's preprocessor config
    _, teacher_preprocessing = load_encoder(teacher_dir)
    assert preprocessing == teacher_preprocessing
    manifest = CleanSubset.load(out / "clean_subset.json")
    assert len(manifest) == 48 and manifest.seed == 2 and manifest.fraction == 0.5
    assert np.array_equal(
        manifest.indices, draw_clean_subset(datasets.load_from_disk(str(tiny_cifar))["train"], 0.5, 2).indices
    )
    record = json.loads((out / "defense_config.json").read_text())
    assert record["resolved"]["bank_size"] == 48 and record["resolved"]["student_head"] == "none"
    assert record["resolved"]["teacher_fingerprint"] and record["clean_data"]["num_rows"] == 48
    card = parse_card((out / "README.md").read_text())
    meta = card.data.to_dict()["hf_sslbd"]
    assert meta["card"] == "defended" and meta["defense"]["name"] == "compress-kd"
    assert meta["teacher"] == str(teacher_dir) and meta["clean_data"]["num_rows"] == 48
    assert "not measured" in card.text.lower()  # no evaluation was asked for
    # the student is the trained one, not a fresh copy of the teacher or a fresh init
    teacher, _ = load_encoder(teacher_dir)
    key = "embedder.embedder.convolution.weight"
    assert not torch.equal(student.state_dict()[key], teacher.state_dict()[key])
    # the output folder holds a run: a second run is refused unless resumed or overwritten
    with pytest.raises(FileExistsError, match="already holds a run"):
        defend.main(
            [
                "--method",
                "kd",
                "--teacher",
                str(teacher_dir),
                "--dataset",
                str(tiny_cifar),
                "--output_dir",
                str(out),
            ]
        )


def test_cli_method_dispatch_and_help(capsys):
    defend = load_example()
    assert set(defend.DEFENSES) >= {"kd"}
    with pytest.raises(SystemExit) as exit_info:
        defend.main(["--teacher", "x"])
    assert exit_info.value.code == 2 and "--method is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        defend.main(["--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        defend.main(["--method", "kd", "--help"])
    text = capsys.readouterr().out
    assert (
        exit_info.value.code == 0
        and "--clean_fraction" in text
        and "--evaluate_on" in text
        and "--label_fraction" in text
    )


def test_cli_before_after_evaluation_and_card(teacher_dir, tiny_cifar, tmp_path):
    """--evaluate_on: teacher / defended / clean on the same subsets and test sets, the FP plot,
    the side-by-side files and a card holding the three models' metrics."""
    from hf_sslbd.cards import card_metrics, parse_card
    from hf_sslbd.poisoning import PoisonConfig, make_poisoned_variant
    from hf_sslbd.variants import save_variant

    source = datasets.load_from_disk(str(tiny_cifar))
    poison = PoisonConfig(trigger="htba:10", trigger_size=8, target="airplane", rate=1.0, seed=0)
    variant = save_variant(make_poisoned_variant(source, poison), poison, tmp_path / "poisoned")
    clean = save_encoder_folder(small_student(7), tmp_path / "clean")
    out = tmp_path / "defended"
    summary = load_example().main(
        [
            "--method", "kd", "--teacher", str(teacher_dir), "--dataset", str(tiny_cifar), "--output_dir", str(out),
            "--clean_fraction", "0.5", "--per_device_train_batch_size", "16", "--bank_size", "48",
            "--max_train_steps", "2", "--disable_tqdm", "true",
            "--evaluate_on", str(tmp_path / "poisoned"), "--variant", variant.name, "--reference_model", str(clean),
            "--labeled_dataset", str(tiny_cifar), "--label_fraction", "1.0", "--seeds", "0", "1",
            "--probes", "knn", "--knn_k", "5", "--plots", "false", "--control_triggers", "auto",
        ]
    )  # fmt: skip
    evaluation = out / "evaluation"
    after = json.loads((evaluation / "student" / "metrics.json").read_text())
    before = json.loads((evaluation / "teacher" / "metrics.json").read_text())
    assert after["models"]["model"]["name_or_path"] == str(out)
    assert before["models"]["model"]["name_or_path"] == str(teacher_dir)
    assert after["models"]["reference"]["name_or_path"] == str(clean)
    table = json.loads((evaluation / "before_after.json").read_text())
    assert table == summary["before_after"]
    row = table["knn"]["1"]
    for name, report, tag in (
        ("teacher", before, "model"),
        ("defended", after, "model"),
        ("clean", after, "reference"),
    ):
        aggregate = report["results"][tag]["knn"]["1"]["aggregate"]
        for key in ("clean_accuracy", "target_fp", "target_fp_rate", "nfp"):
            assert row[name][key] == aggregate[key]["mean"], (name, key)
    # both calls measured the clean model on the same subsets and features: the same numbers
    assert before["results"]["reference"] == after["results"]["reference"]
    accept = row["acceptance"]
    assert accept["clean_accuracy_drop_from_teacher"] == pytest.approx(
        row["teacher"]["clean_accuracy"] - row["defended"]["clean_accuracy"]
    )
    if row["clean"]["target_fp"]:
        assert accept["defended_fp_over_clean_fp"] == pytest.approx(
            row["defended"]["target_fp"] / row["clean"]["target_fp"]
        )
    assert (evaluation / "fp_per_class_knn.png").stat().st_size > 1000
    assert "| target FP |" in (evaluation / "before_after.md").read_text()
    card = parse_card((out / "README.md").read_text())
    measured = {(m.probe, m.label_fraction): m for m in card_metrics(card)}
    assert measured[("knn", 1.0)].get("target_fp") == row["defended"]["target_fp"]
    meta = card.data.to_dict()["hf_sslbd"]
    assert meta["metrics_before"][0]["target_fp"] == row["teacher"]["target_fp"]
    assert meta["metrics_clean_reference"][0]["target_fp"] == row["clean"]["target_fp"]
    assert "| Metric | Teacher | Defended | Clean |" in card.text


# ---------------------------------------------------------------------------------------------- direction


def plant_backdoor(encoder, images, labels, target: int, trigger: torch.Tensor, steps: int, seed: int = 0):
    """Fine-tune ``encoder`` so that any image with ``trigger`` pasted at a random place embeds
    among the ``target`` class while clean images keep their embeddings: a planted backdoor that
    takes seconds (the SSL-poisoned one takes CPU-hours; the acceptance run uses that one).
    Eval mode throughout, so BatchNorm cannot tell patched batches from clean ones by their
    statistics."""
    import copy

    pre = Preprocessing(32)
    reference = copy.deepcopy(encoder).eval()
    with torch.no_grad():
        goal = F.normalize(pooled_features(reference, normalize(images, pre.mean, pre.std)), dim=1)
    planted = copy.deepcopy(encoder).eval()
    optimizer = torch.optim.Adam(planted.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    size = trigger.shape[-1]
    for _ in range(steps):
        rows = torch.randperm(len(images), generator=generator)[:64]
        patched = images[rows][labels[rows] != target].clone()
        corners = torch.randint(0, images.shape[-1] - size + 1, (len(patched), 2), generator=generator)
        for i, (y, x) in enumerate(corners.tolist()):
            patched[i, :, y : y + size, x : x + size] = trigger
        clean = F.normalize(pooled_features(planted, normalize(images[rows], pre.mean, pre.std)), dim=1)
        hit = (
            F.normalize(pooled_features(planted, normalize(patched, pre.mean, pre.std)), dim=1)
            @ goal.T
            / 0.05
        )
        pull = (torch.logsumexp(hit, 1) - torch.logsumexp(hit[:, labels == target], 1)).mean()
        loss = 10 * (1 - (clean * goal[rows]).sum(1)).mean() + pull
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return planted.eval()


@pytest.mark.slow
def test_distillation_on_clean_data_drops_a_planted_backdoor(cifar10, cifar10_dir, tmp_path):
    """The direction of the acceptance at small scale: a teacher whose features send patched
    images to the target class (k-NN target FP rate on held-out patched test images ~0.4-0.7),
    distilled on 512 clean rows with three seeds; every student's FP rate is far below the
    teacher's (margin > 0.15 and > 5 std of the students' rates over seeds), at no accuracy cost."""
    from hf_sslbd.evaluation.metrics import target_false_positives
    from hf_sslbd.evaluation.probes import KNNClassifier, KNNConfig
    from hf_sslbd.poisoning import PoisonConfig, patch_dataset
    from hf_sslbd.triggers import parse_trigger

    pre = Preprocessing(32)

    def pixels(rows):
        return images_to_batch(rows.cast_column("img", datasets.Image(decode=False))["img"], pre)

    train, test = cifar10["train"].select(range(512)), cifar10["test"].select(range(300))
    config = PoisonConfig(trigger="htba:10", trigger_size=8, target="airplane", rate=1.0, seed=0)
    patched_test = patch_dataset(test, config)  # the evaluation's patched set: non-target rows
    train_x, train_y = pixels(train), torch.tensor(train["label"])
    test_x, test_y = pixels(test), torch.tensor(test["label"])
    patched_x, patched_y = pixels(patched_test), torch.tensor(patched_test["label"])
    trigger = torch.from_numpy(parse_trigger("htba:10").render(8).copy()).permute(2, 0, 1)
    teacher = plant_backdoor(small_student(123), train_x, train_y, 0, trigger, steps=200)
    teacher_dir = save_encoder_folder(teacher, tmp_path / "teacher")

    def measure(model) -> tuple[float, float]:
        with torch.no_grad():
            bank, clean, patched = (
                pooled_features(model.eval(), normalize(x, pre.mean, pre.std))
                for x in (train_x, test_x, patched_x)
            )
        knn = KNNClassifier.fit(bank, train_y, 10, KNNConfig(k=20))
        fp = target_false_positives(knn.predict(patched), patched_y, 0)["rate"]
        return fp, float((knn.predict(clean) == test_y).float().mean())

    teacher_fp, teacher_accuracy = measure(teacher)
    assert teacher_fp > 0.3, f"the planted backdoor did not take: target FP rate {teacher_fp:.3f}"
    students = []
    for seed in range(3):
        out = tmp_path / f"student-{seed}"
        distill(
            kd_args(
                teacher_dir, cifar10_dir, out, clean_fraction=512 / 50000, per_device_train_batch_size=32,
                bank_size=256, max_train_steps=None, num_train_epochs=4, learning_rate=2.0, seed=seed,
                checkpoint_every_epoch=False,
            )
        )  # fmt: skip
        students.append(measure(load_encoder(out)[0]))
    fps = np.array([fp for fp, _ in students])
    margin = teacher_fp - fps.max()
    print(f"teacher FP {teacher_fp:.3f} acc {teacher_accuracy:.3f}; students {students}")
    assert margin > 0.15 and margin > 5 * fps.std(ddof=1), (teacher_fp, fps.tolist())
    assert np.mean([accuracy for _, accuracy in students]) > teacher_accuracy - 0.06, (
        teacher_accuracy,
        students,
    )
