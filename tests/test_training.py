"""The pretraining loop: schedule, resume equality, momentum on real steps only, outputs and
provenance, bad input, and a short real CIFAR-10 run per registered method."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _toy_method import ToyMethod
from safetensors.torch import load_file

from hf_sslbd.methods import METHODS
from hf_sslbd.modeling import SSLModel, load_encoder
from hf_sslbd.training import (
    CheckpointError,
    PretrainArguments,
    learning_rate_at,
    list_checkpoints,
    parameter_groups,
    parse_pretrain_args,
    train,
)

REAL_METHODS = sorted(name for name in METHODS if name != "toy")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", ToyMethod)
    return ToyMethod


@pytest.fixture(scope="module")
def tiny_cifar(cifar10, tmp_path_factory) -> Path:
    """96 train / 64 test rows of real CIFAR-10, saved with save_to_disk (fast to reload)."""
    folder = tmp_path_factory.mktemp("tiny_cifar")
    datasets.DatasetDict(
        train=cifar10["train"].select(range(96)), test=cifar10["test"].select(range(64))
    ).save_to_disk(folder)
    return folder


def small_args(dataset: Path, output_dir: Path, **overrides) -> PretrainArguments:
    values = dict(
        dataset=str(dataset),
        output_dir=str(output_dir),
        method="simclr",
        backbone="resnet10-cifar",
        backbone_width=8,
        stem_stride=2,
        per_device_train_batch_size=16,
        num_train_epochs=1,
        logging_steps=1,
        disable_tqdm=True,
        report_to="none",
        seed=0,
    )
    values.update(overrides)
    return PretrainArguments(**values)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- units


def test_learning_rate_warmup_then_cosine():
    lrs = [learning_rate_at(step, 100, 10, 0.4) for step in range(100)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[10:]) < 0)
    assert lrs[10] == pytest.approx(0.4) and lrs[55] == pytest.approx(0.2)
    assert lrs[-1] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert learning_rate_at(0, 10, 0, 1.0) == 1.0  # no warm-up


def test_no_weight_decay_on_norms_and_biases(toy):
    from hf_sslbd.backbones import backbone_config
    from hf_sslbd.modeling import SSLConfig

    model = SSLModel(
        SSLConfig(
            method="toy",
            backbone_config=backbone_config("resnet10-cifar", width=8).to_dict(),
            method_config={},
        )
    )
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "method.head.0.weight" in decayed and "method.head.0.bias" in not_decayed
    assert "method.head.1.weight" in not_decayed  # LayerNorm weight
    assert any("normalization.weight" in n for n in not_decayed)  # BatchNorm weights of the backbone
    assert all(not n.startswith("method.momentum") for n in decayed | not_decayed)  # no momentum copies


def test_method_config_json_and_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset: some/data\noutput_dir: out\nmethod: simclr\nmethod_config:\n  temperature: 0.5\n"
        "per_device_train_batch_size: 64\nchannels_last: false\n"
    )
    args = parse_pretrain_args([str(config), "--per_device_train_batch_size", "32"])
    assert args.method_config == {"temperature": 0.5}
    assert args.per_device_train_batch_size == 32  # the flag after the file wins
    assert args.channels_last is False
    args = parse_pretrain_args(
        ["--dataset", "d", "--output_dir", "o", "--method_config", '{"temperature": 0.1}']
    )
    assert args.method_config == {"temperature": 0.1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: d\noutput_dir: o\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown arguments \['learning_rat'\]"):
        parse_pretrain_args([str(bad)])
    with pytest.raises(ValueError, match="method_config is not valid JSON"):
        PretrainArguments(dataset="d", output_dir="o", method_config="{temperature: 1}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
        ({"mixed_precision": "fp8"}, r"mixed_precision 'fp8' is not one of \['no', 'bf16', 'fp16'\]"),
        ({"optimizer": "lamb"}, r"optimizer 'lamb' is not one of \['sgd', 'adamw'\]"),
        ({"report_to": "wandb"}, "report_to 'wandb' is not one of"),
        ({"load_size": 16, "image_size": 32}, r"load_size \(16\) must be >= image_size \(32\)"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        PretrainArguments(dataset="d", output_dir="o", **overrides)


# ---------------------------------------------------------------------------------------------- runs


def test_resume_gives_the_same_parameters_as_uninterrupted(tiny_cifar, tmp_path):
    # 64 rows / batch 16 = 4 micro-batches per epoch, 2 per step = 2 steps per epoch; 5 steps = 3
    # epochs, the last one partial. Interrupted at step 3: mid-epoch, two micro-batches into epoch 1.
    common = dict(
        gradient_accumulation_steps=2, max_train_steps=5, warmup_epochs=0.5, checkpoint_every_epoch=False,
        max_train_samples=64, method_config={"hidden_dim": 64},
    )  # fmt: skip
    whole = train(small_args(tiny_cifar, tmp_path / "whole", **common))
    assert whole.finished and whole.global_step == 5
    # "auto": a fresh start in an empty folder, then a continuation with the same command
    first = train(
        small_args(tiny_cifar, tmp_path / "split", stop_after_step=3, resume_from_checkpoint="auto", **common)
    )
    assert not first.finished and first.global_step == 3
    assert first.checkpoint == tmp_path / "split" / "checkpoints" / "step_3"
    assert not (tmp_path / "split" / "config.json").exists()  # no final model from a stopped run
    state = json.loads((first.checkpoint / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, 2)
    second = train(small_args(tiny_cifar, tmp_path / "split", resume_from_checkpoint="auto", **common))
    assert second.finished and second.global_step == 5
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    got = load_file(tmp_path / "split" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # the log of the resumed run continues the first one: steps 1..5 once each
    assert [r["step"] for r in read_log(tmp_path / "split") if "loss" in r] == list(range(1, 6))
    losses = {r["step"]: r["loss"] for r in read_log(tmp_path / "whole")}
    for record in read_log(tmp_path / "split"):
        assert record["loss"] == pytest.approx(losses[record["step"]], abs=1e-5)


def test_workers_and_images_in_memory_do_not_change_the_result_and_runs_share_a_process(tiny_cifar, tmp_path):
    common = dict(max_train_steps=3, max_train_samples=48, method_config={"hidden_dim": 64})
    # default (auto): the 48 small images are decoded once into memory; the second run decodes
    # every batch in a DataLoader worker
    train(small_args(tiny_cifar, tmp_path / "main", **common))
    train(
        small_args(
            tiny_cifar, tmp_path / "workers", dataloader_num_workers=1, images_in_memory=False, **common
        )
    )
    expected = load_file(tmp_path / "main" / "model.safetensors")
    got = load_file(tmp_path / "workers" / "model.safetensors")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # a later run in the same process may change accelerate's settings (mixed precision)
    result = train(small_args(tiny_cifar, tmp_path / "bf16", mixed_precision="bf16", **common))
    assert result.finished and math.isfinite(result.last_loss)


def test_image_rows_in_memory_serve_the_decoded_pixels(tiny_cifar):
    from hf_sslbd.preprocessing import Preprocessing
    from hf_sslbd.training import ImageRows

    split = datasets.load_from_disk(str(tiny_cifar))["train"]
    lazy = ImageRows(split, "img", Preprocessing(image_size=32, resize_size=32), in_memory=False)
    cached = ImageRows(split, "img", Preprocessing(image_size=32, resize_size=32), in_memory=None)
    assert lazy.images is None and cached.images is not None  # auto: 96 x 3 x 32 x 32 bytes fit
    assert cached.images.shape == (96, 3, 32, 32) and cached.images.dtype == torch.uint8
    indices = [5, 0, 95, 5]
    assert torch.equal(cached.__getitems__(indices), lazy.__getitems__(indices))


def test_momentum_updates_only_on_real_optimizer_steps(toy, tiny_cifar, tmp_path, monkeypatch):
    calls: list[float] = []
    original = ToyMethod.on_optimizer_step

    def record(self, backbone, progress):
        calls.append(progress)
        original(self, backbone, progress)

    monkeypatch.setattr(ToyMethod, "on_optimizer_step", record)
    # 6 micro-batches per epoch, accumulation 4: steps after micro-batches 4 and 6 (end of epoch)
    result = train(
        small_args(
            tiny_cifar, tmp_path / "run", method="toy", gradient_accumulation_steps=4, num_train_epochs=2
        )
    )
    assert result.global_step == 4
    assert calls == pytest.approx([0.25, 0.5, 0.75, 1.0])
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert int(saved["method.steps"]) == 4
    # the momentum backbone moved (EMA), but is not the online one
    online = saved["backbone.embedder.embedder.convolution.weight"]
    target = saved["method.momentum_backbone.embedder.embedder.convolution.weight"]
    assert not torch.equal(online, target)


def test_outputs_provenance_and_logs(tiny_cifar, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = train(
        small_args(
            tiny_cifar, out, num_train_epochs=2, report_to="tensorboard", learning_rate=0.4, knn_monitor=True,
            knn_bank_samples=40, knn_eval_samples=20, knn_k=5, max_train_samples=64, method_config='{"temperature": 0.5}',
        )
    )  # fmt: skip
    assert result.finished and result.global_step == 8  # 64 rows / 16 = 4 steps per epoch
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sslbd" and config["method"] == "simclr"
    assert config["method_config"]["temperature"] == 0.5 and config["method_config"]["hidden_dim"] == 512
    resolved = config["training_args"]["resolved"]
    assert resolved["peak_learning_rate"] == pytest.approx(0.4 * 16 / 256)
    assert resolved["steps_per_epoch"] == 4 and resolved["max_train_steps"] == 8
    assert config["training_args"]["learning_rate"] == 0.4
    data = config["data"]
    assert data["num_rows"] == 64 and data["num_rows_in_split"] == 96 and data["image_column"] == "img"
    assert data["fingerprint"] and data["poisoning"] is None
    assert config["seed"] == 0
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["images_per_second"] > 0 and 0 <= r["data_time_fraction"] < 1 for r in steps)
    assert steps[0]["lr"] < steps[3]["lr"]  # warm-up over the first epoch
    knn = [r for r in log if "knn_accuracy" in r]
    assert [r["epoch"] for r in knn] == [1, 2] and all(0 <= r["knn_accuracy"] <= 1 for r in knn)
    assert list((out / "runs").rglob("events.out.tfevents*"))
    assert [p.name for p in list_checkpoints(out)] == ["step_4", "step_8"]
    # the exported backbone is the trained one
    model = SSLModel.from_pretrained(out)
    encoder, preprocessing = load_encoder(out / "backbone")
    assert preprocessing.mean == model.config.mean
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


def test_poisoned_variant_provenance(cifar10, tmp_path):
    from hf_sslbd.poisoning import PoisonConfig, make_poisoned_variant
    from hf_sslbd.variants import save_variant

    source = datasets.DatasetDict(
        train=cifar10["train"].select(range(64)), test=cifar10["test"].select(range(16))
    )
    config = PoisonConfig(trigger="htba:10", trigger_size=8, target="airplane", rate=1.0, seed=0)
    folder = save_variant(make_poisoned_variant(source, config), config, tmp_path / "poisoned")
    result = train(
        small_args(tmp_path / "poisoned", tmp_path / "run", dataset_config=folder.name, max_train_steps=1)
    )
    assert result.finished
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert data["dataset_config"] == folder.name
    assert data["num_poisoned_rows"] > 0
    assert data["poisoning"]["target"]["name"] == "airplane"


#: per method: method-config overrides (small heads, a queue / bank that fills in two steps) and
#: run settings under which a few dozen steps on 256 images visibly learn. Jigsaw uses 4
#: permutations: 24 do not move in this budget.
SHORT_RUNS: dict[str, tuple[dict, dict]] = {
    "simclr": ({"hidden_dim": 128}, {}),
    "mocov2": ({"hidden_dim": 128, "queue_size": 64}, {"learning_rate": 1.0, "num_train_epochs": 4}),
    "byol": ({"hidden_dim": 128, "predictor_hidden_dim": 128, "out_dim": 64}, {}),
    "msf": ({"hidden_dim": 128, "bank_size": 64}, {}),
    "simsiam": ({"hidden_dim": 128, "out_dim": 128, "predictor_hidden_dim": 32}, {"learning_rate": 1.0}),
    "rotnet": ({}, {"learning_rate": 0.3, "num_train_epochs": 6}),
    "jigsaw": ({"hidden_dim": 128, "num_permutations": 4}, {"learning_rate": 0.3, "num_train_epochs": 4}),
}


@pytest.mark.parametrize("method", REAL_METHODS)
def test_short_cifar10_run_lowers_the_loss(method, cifar10_dir, tmp_path):
    torch.set_num_threads(1)
    method_config, run = SHORT_RUNS.get(method, ({}, {}))
    settings = dict(
        method=method, method_config=method_config, max_train_samples=256, per_device_train_batch_size=32,
        num_train_epochs=3, warmup_epochs=0.5, checkpoint_every_epoch=False,
    )  # fmt: skip
    settings.update(run)
    result = train(small_args(cifar10_dir, tmp_path / method, **settings))
    losses = [r["loss"] for r in read_log(tmp_path / method) if "loss" in r]
    assert len(losses) == result.global_step == 8 * settings["num_train_epochs"]
    # the first two steps are left out: a queue / memory bank starts with random entries
    first, last = np.mean(losses[2:8]), np.mean(losses[-6:])
    assert last < first, f"{method}: loss {first:.4f} -> {last:.4f}"


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_method_and_backbone(tiny_cifar, tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: \[.*'simclr'"):
        train(small_args(tiny_cifar, tmp_path / "a", method="nope"))
    with pytest.raises(
        ValueError, match=r"unknown backbone 'resnet7'; known presets: resnet18 .*resnet10-cifar"
    ):
        train(small_args(tiny_cifar, tmp_path / "b", backbone="resnet7"))
    with pytest.raises(
        ValueError, match=r"method_config keys \['temprature'\] are not fields of SimCLRConfig"
    ):
        train(small_args(tiny_cifar, tmp_path / "c", method_config={"temprature": 0.1}))


def test_corrupt_image_fails_before_the_first_step_and_names_the_row(tiny_cifar, tmp_path):
    from hf_sslbd.preprocessing import CorruptImageError

    train_rows = datasets.load_from_disk(str(tiny_cifar))["train"].cast_column(
        "img", datasets.Image(decode=False)
    )
    cells = list(train_rows["img"])
    cells[37] = {"bytes": b"not an image", "path": None}
    folder = tmp_path / "corrupt"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": cells, "label": train_rows["label"]}).cast_column(
            "img", datasets.Image()
        )
    ).save_to_disk(folder)
    # decoded into memory up front (the default for small images): the run stops before training,
    # and the output folder holds no checkpoint
    with pytest.raises(CorruptImageError, match="cannot decode row 37"):
        train(small_args(folder, tmp_path / "out", max_train_steps=2))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_dataset_without_image_column(tmp_path):
    folder = tmp_path / "text"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ).save_to_disk(folder)
    with pytest.raises(ValueError, match=r"no image column found.*columns \['text', 'label'\]"):
        train(small_args(folder, tmp_path / "out"))


def test_batch_too_small_for_the_method(tiny_cifar, tmp_path):
    with pytest.raises(ValueError, match="simclr needs a global batch of at least 2, got 1"):
        train(small_args(tiny_cifar, tmp_path / "out", per_device_train_batch_size=1))
    with pytest.raises(ValueError, match="queue_size 100 is not divisible by the global batch 16"):
        train(small_args(tiny_cifar, tmp_path / "out3", method="mocov2", method_config={"queue_size": 100}))
    with pytest.raises(ValueError, match=r"96 training rows are fewer than one global batch \(128"):
        train(small_args(tiny_cifar, tmp_path / "out2", per_device_train_batch_size=128))


def test_image_size_the_backbone_cannot_take(tiny_cifar, tmp_path):
    from hf_sslbd.backbones import build_backbone

    build_backbone("vit-tiny", image_size=32).save_pretrained(tmp_path / "vit32")
    with pytest.raises(ValueError, match="this ViT takes 32 px images .* got 64 px"):
        train(small_args(tiny_cifar, tmp_path / "out", model_name_or_path=str(tmp_path / "vit32"), image_size=64,
                         backbone_width=None, stem_stride=None))  # fmt: skip


def test_resume_follows_the_data_not_its_folder(cifar10, tmp_path):
    """A variant added beside the training data (a second seed of an experiment) leaves the run
    resumable; the same variant name with other rows under it is refused."""
    from hf_sslbd.poisoning import PoisonConfig, make_poisoned_variant, save_variant

    def source(start: int) -> datasets.DatasetDict:
        rows = range(start, start + 96)
        return datasets.DatasetDict(
            train=cifar10["train"].select(rows), test=cifar10["test"].select(range(32))
        )

    folder, out = tmp_path / "poisoned", tmp_path / "run"
    poison = PoisonConfig(trigger="htba:10", trigger_size=6, target="airplane", rate=1.0, seed=0)
    name = save_variant(make_poisoned_variant(source(0), poison), poison, folder).name
    run = dict(dataset_config=name, max_train_steps=6)
    train(small_args(folder, out, stop_after_step=3, **run))
    other_seed = dataclasses.replace(poison, seed=1)
    save_variant(make_poisoned_variant(source(0), other_seed), other_seed, folder)
    train(small_args(folder, out, resume_from_checkpoint="latest", **run))
    assert [entry["step"] for entry in read_log(out)] == [1, 2, 3, 4, 5, 6]

    rerun = tmp_path / "rerun"
    train(small_args(folder, rerun, stop_after_step=3, **run))
    save_variant(make_poisoned_variant(source(96), poison), poison, folder, overwrite=True)
    with pytest.raises(
        CheckpointError, match=r"different run \(data_fingerprint: .*delete the checkpoints folder"
    ):
        train(small_args(folder, rerun, resume_from_checkpoint="latest", **run))


def test_resume_errors(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints \(expected step_N folders"):
        train(small_args(tiny_cifar, out, resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        train(small_args(tiny_cifar, out, resume_from_checkpoint=str(tmp_path)))
    train(small_args(tiny_cifar, out, max_train_steps=6, stop_after_step=3))
    with pytest.raises(
        CheckpointError, match=r"belongs to a different run \(method_config: .*temperature"
    ) as error:
        train(small_args(tiny_cifar, out, max_train_steps=6, resume_from_checkpoint="latest",
                         method_config={"temperature": 0.7}))  # fmt: skip
    assert "fingerprint" not in str(error.value)
    with pytest.raises(CheckpointError, match=r"different run \(backbone_config: "):
        train(
            small_args(tiny_cifar, out, max_train_steps=6, resume_from_checkpoint="latest", backbone_width=16)
        )
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(small_args(tiny_cifar, out, max_train_steps=6))
