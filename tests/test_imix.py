"""i-CutMix (hf_sslbd.methods.imix) and its virtual-label losses, in MoCo v2 and SimCLR: the box,
the losses by hand, seeded reproducibility, mixing off = the plain method, a short real CIFAR-10
run, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_sslbd.backbones import build_backbone, feature_dim, pooled_features
from hf_sslbd.methods import get_method_class
from hf_sslbd.methods.imix import cutmix_box, icutmix
from hf_sslbd.methods.losses import imix_infonce_loss, imix_nt_xent_loss, infonce_queue_loss, nt_xent_loss
from hf_sslbd.modeling import SSLModel
from hf_sslbd.training import CheckpointError, PretrainArguments, resolve_method_config, train

SIZE = 16


def _distinct_images(batch: int = 6, size: int = SIZE) -> torch.Tensor:
    # image i is filled with the value i: every pixel tells which image it came from
    return torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, size, size).clone()


def _method(name: str, **overrides):
    torch.manual_seed(0)
    backbone = build_backbone("resnet10-cifar", width=8)
    cls = get_method_class(name)
    return cls(cls.config_class(**overrides), backbone, feature_dim(backbone.config), SIZE), backbone


# ---------------------------------------------------------------------------------------------- the box


@pytest.mark.parametrize("seed", range(8))
def test_box_pixels_come_from_the_partner_and_their_share_is_one_minus_lambda(seed):
    torch.manual_seed(seed)
    images = _distinct_images()
    mixed = icutmix(images, alpha=1.0)
    top, left, height, width = mixed.box
    assert 0.5 <= mixed.lam <= 1.0  # folded: each image keeps the larger share
    assert sorted(mixed.permutation.tolist()) == list(range(6))
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[top : top + height, left : left + width] = True
    for i, partner in enumerate(mixed.permutation.tolist()):
        own = mixed.images[i] == i
        from_partner = mixed.images[i] == partner
        if partner != i:
            assert torch.equal(from_partner[0], inside) and torch.equal(own[0], ~inside)
        # lam is the exact share of the image's own pixels
        assert own[0].float().mean().item() == pytest.approx(mixed.lam if partner != i else 1.0)
    assert 1 - height * width / SIZE**2 == pytest.approx(mixed.lam)
    assert torch.equal(images, _distinct_images())  # the input is not modified


def test_box_sides_follow_lambda_and_are_clipped():
    torch.manual_seed(0)
    assert cutmix_box(32, 32, 1.0)[2:] == (0, 0)
    for lam in (0.5, 0.75, 0.9):
        sides = [cutmix_box(32, 32, lam)[2:] for _ in range(50)]
        side = int(32 * math.sqrt(1 - lam))
        assert max(h for h, _ in sides) == side and max(w for _, w in sides) == side
        assert min(h for h, _ in sides) < side  # a centre near the border clips the box
        for top_h in sides:
            assert 0 <= top_h[0] <= side and 0 <= top_h[1] <= side


def test_lambda_follows_the_folded_beta():
    torch.manual_seed(0)
    images = _distinct_images(4, 64)

    def draws(alpha: float) -> tuple[np.ndarray, np.ndarray]:
        mixes = [icutmix(images, alpha) for _ in range(300)]
        # a box strictly inside the image was not clipped: its lam is the Beta draw up to rounding
        inside = [0 < m.box[0] < 64 - m.box[2] and 0 < m.box[1] < 64 - m.box[3] for m in mixes]
        lams = np.array([m.lam for m in mixes])
        return lams, lams[np.array(inside)]

    uniform, uniform_inside = draws(1.0)
    peaked, peaked_inside = draws(100.0)
    assert uniform.min() >= 0.5 and peaked.min() >= 0.5  # folded to max(lam, 1 - lam)
    # Beta(1, 1): uniform shares; Beta(100, 100): halves (sd 0.035), clipping only raises them
    assert uniform_inside.min() < 0.55 and uniform_inside.max() > 0.95
    assert len(peaked_inside) > 10 and peaked_inside.max() < 0.65
    assert peaked.mean() < uniform.mean()


def test_seeded_reproducibility_and_probability():
    images = torch.rand(8, 3, SIZE, SIZE)
    torch.manual_seed(3)
    first = icutmix(images, 1.0)
    torch.manual_seed(3)
    again = icutmix(images, 1.0)
    assert torch.equal(first.images, again.images) and torch.equal(first.permutation, again.permutation)
    assert (first.lam, first.box) == (again.lam, again.box)
    torch.manual_seed(4)
    other = icutmix(images, 1.0)
    assert not torch.equal(first.images, other.images)

    torch.manual_seed(0)
    draws = [icutmix(images, 1.0, prob=0.3) for _ in range(200)]
    unmixed = [d for d in draws if d.images is images]
    assert 100 < len(unmixed) < 180  # about 70% left alone
    for draw in unmixed:
        assert draw.lam == 1.0 and torch.equal(draw.permutation, torch.arange(8))


# ---------------------------------------------------------------------------------------------- losses


def test_imix_infonce_by_hand():
    # queries = keys = the two axes, one queue entry at -x, temperature 1, partners swapped
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys, queue, swap = query.clone(), torch.tensor([[-1.0, 0.0]]), torch.tensor([1, 0])
    z0 = math.log(math.e + 1 + math.exp(-1))  # row 0 logits [1, 0, -1]
    z1 = math.log(1 + math.e + 1)  # row 1 logits [0, 1, 0]
    # lam = 1: the own key is the only target
    plain = imix_infonce_loss(query, keys, queue, swap, 1.0, temperature=1.0)
    assert plain.item() == pytest.approx(((z0 - 1) + (z1 - 1)) / 2, rel=1e-6)
    # lam = 0.75: 0.75 on the own key (logit 1), 0.25 on the partner's (logit 0)
    mixed = imix_infonce_loss(query, keys, queue, swap, 0.75, temperature=1.0)
    assert mixed.item() == pytest.approx(((z0 - 0.75) + (z1 - 0.75)) / 2, rel=1e-6)


def test_imix_infonce_is_cross_entropy_on_a_soft_target():
    torch.manual_seed(0)
    query, keys, queue = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(16, 8), dim=1)
    permutation, lam = torch.tensor([2, 0, 3, 1]), 0.7
    target = torch.zeros(4, 4 + 16)
    target[torch.arange(4), torch.arange(4)] += lam
    target[torch.arange(4), permutation] += 1 - lam
    assert torch.allclose(target.sum(1), torch.ones(4)) and torch.all(
        target[torch.arange(4), permutation] == 1 - lam
    )
    logits = F.normalize(query, dim=1) @ torch.cat([F.normalize(keys, dim=1), queue]).T / 0.2
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert imix_infonce_loss(query, keys, queue, permutation, lam).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    # lam = 1 is InfoNCE over [keys | queue] with the own key as label
    plain = F.cross_entropy(logits, torch.arange(4))
    assert imix_infonce_loss(query, keys, queue, permutation, 1.0).item() == pytest.approx(
        plain.item(), rel=1e-6
    )


def test_imix_infonce_offset_is_this_ranks_block():
    # rank 1 of 2: its queries and partners index the second half of the gathered keys
    torch.manual_seed(1)
    query, keys, queue = torch.randn(3, 8), torch.randn(6, 8), F.normalize(torch.randn(6, 8), dim=1)
    permutation = torch.tensor([1, 2, 0])
    on_rank1 = imix_infonce_loss(query, keys, queue, permutation, 0.6, offset=3)
    reordered = torch.cat([keys[3:], keys[:3]])  # the same candidates, this rank's block first
    assert on_rank1.item() == pytest.approx(
        imix_infonce_loss(query, reordered, queue, permutation, 0.6).item()
    )
    with pytest.raises(ValueError, match="offset 4 does not place 3 queries within 6 keys"):
        imix_infonce_loss(query, keys, queue, permutation, 0.6, offset=4)


def _naive_imix_nt_xent(z_a, z_b, permutation, lam, temperature):
    """Every anchor against the 2B - 1 others, soft targets written out one by one."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    batch, losses = z_a.shape[0], []
    for anchor in range(2 * batch):
        target = torch.zeros(2 * batch)
        i = anchor % batch
        if anchor < batch:  # mixed view a_i: lam of image i, 1 - lam of image permutation[i]
            target[batch + i] += lam
            target[batch + permutation[i]] += 1 - lam
        else:  # whole view b_i: in a_i with weight lam, in a_j's box when permutation[j] = i
            target[i] += lam
            target[int((permutation == i).nonzero())] += 1 - lam
        others = [j for j in range(2 * batch) if j != anchor]
        log_p = torch.log_softmax(torch.stack([z[anchor] @ z[j] / temperature for j in others]), 0)
        losses.append(-(target[others] * log_p).sum())
    return torch.stack(losses).mean()


def test_imix_nt_xent_matches_naive_reference_and_lambda_one_is_nt_xent():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(5, 6), torch.randn(5, 6)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    for lam in (0.55, 0.8):
        got = imix_nt_xent_loss(z_a, z_b, permutation, lam, temperature=0.3)
        assert got.item() == pytest.approx(
            _naive_imix_nt_xent(z_a, z_b, permutation, lam, 0.3).item(), rel=1e-5
        )
    assert torch.equal(imix_nt_xent_loss(z_a, z_b, permutation, 1.0, 0.3), nt_xent_loss(z_a, z_b, 0.3))


def test_loss_input_errors():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"permutation must have shape \(4,\)"):
        imix_nt_xent_loss(z, z, torch.arange(3), 0.7)
    with pytest.raises(ValueError, match="lam must be in"):
        imix_infonce_loss(z, z, z, torch.arange(4), 1.5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        icutmix(torch.rand(2, 3, 8, 8), 0.0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        icutmix(torch.rand(3, 8, 8), 1.0)


# ---------------------------------------------------------------------------------------------- methods


def _views(batch: int = 8):
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(batch, 3, SIZE, SIZE, generator=generator) for _ in range(2)]


def test_mixing_off_is_the_plain_loss_and_draws_no_randomness():
    views = _views()
    method, backbone = _method("simclr", temperature=0.3)
    torch.manual_seed(0)
    out = method.forward_views(backbone, views)
    assert set(out) == {"loss"}
    state_after = torch.get_rng_state()
    torch.manual_seed(0)
    z = method.projector(pooled_features(backbone, torch.cat(views)))
    assert torch.equal(out["loss"], nt_xent_loss(z[:8], z[8:], 0.3))
    assert torch.equal(torch.get_rng_state(), state_after)  # SimCLR's forward draws nothing when off

    method, backbone = _method("mocov2", queue_size=64)
    queue = method.queue.clone()
    torch.manual_seed(0)
    out = method.forward_views(backbone, views)
    assert set(out) == {"loss", "positive_similarity"}
    torch.manual_seed(0)  # the same key shuffle as in forward
    query = method.projector(torch.cat([pooled_features(backbone, c) for c in views[0].chunk(2)]))
    key = F.normalize(method._keys(views[1], 2), dim=1)
    assert torch.equal(out["loss"], infonce_queue_loss(query, key, queue, method.config.temperature))


@pytest.mark.parametrize("name", ["simclr", "mocov2"])
def test_mixing_on_mixes_the_first_view_with_virtual_labels(name):
    views = _views()
    extra = {"queue_size": 64} if name == "mocov2" else {}
    method, backbone = _method(name, icutmix_alpha=1.0, **extra)
    queue = method.queue.clone() if name == "mocov2" else None
    torch.manual_seed(7)
    out = method.forward_views(backbone, views)
    lam = out["icutmix_lambda"].item()
    assert 0.5 <= lam < 1.0
    out["loss"].backward()
    assert all(p.grad is not None for p in backbone.parameters())

    torch.manual_seed(7)  # replay: the mix is the first draw of the forward
    mixed = icutmix(views[0], 1.0)
    assert mixed.lam == pytest.approx(lam)
    with torch.no_grad():
        if name == "simclr":
            z = method.projector(pooled_features(backbone, torch.cat([mixed.images, views[1]])))
            expected = imix_nt_xent_loss(
                z[:8], z[8:], mixed.permutation, mixed.lam, method.config.temperature
            )
        else:
            query = method.projector(torch.cat([pooled_features(backbone, c) for c in mixed.images.chunk(2)]))
            key = F.normalize(method._keys(views[1], 2), dim=1)
            expected = imix_infonce_loss(
                query, key, queue, mixed.permutation, mixed.lam, method.config.temperature
            )
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_config_errors_and_methods_without_icutmix(tmp_path):
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(
            ValueError, match=r"MoCoV2Config.icutmix_alpha must be > 0 .* None to turn i-CutMix off"
        ):
            _method("mocov2", icutmix_alpha=bad)
    with pytest.raises(TypeError, match="SimCLRConfig.icutmix_alpha must be a number"):
        _method("simclr", icutmix_alpha="1.0")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"SimCLRConfig.icutmix_prob must be in \(0, 1\]"):
            _method("simclr", icutmix_alpha=1.0, icutmix_prob=bad)

    def args(method: str, **config) -> PretrainArguments:
        return PretrainArguments(dataset="d", output_dir=str(tmp_path), method=method, method_config=config)

    for method in ("byol", "rotnet"):
        with pytest.raises(ValueError, match=rf"method '{method}' has no i-CutMix .*\['mocov2', 'simclr'\]"):
            resolve_method_config(args(method, icutmix_alpha=1.0))
    config = resolve_method_config(args("mocov2", icutmix_alpha=1.0, icutmix_prob=0.5))
    assert (config["icutmix_alpha"], config["icutmix_prob"]) == (1.0, 0.5)
    assert resolve_method_config(args("simclr"))["icutmix_alpha"] is None  # off by default


# ---------------------------------------------------------------------------------------------- real data


#: the settings of test_training's short runs (a queue that fills in two steps for MoCo)
SHORT_RUNS = {
    "simclr": ({"hidden_dim": 128}, {"num_train_epochs": 3}),
    "mocov2": ({"hidden_dim": 128, "queue_size": 64}, {"learning_rate": 1.0, "num_train_epochs": 4}),
}


@pytest.mark.parametrize("method", sorted(SHORT_RUNS))
def test_short_cifar10_run_with_icutmix_lowers_the_loss(method, cifar10_dir, tmp_path):
    torch.set_num_threads(1)
    method_config, run = SHORT_RUNS[method]
    args = PretrainArguments(
        dataset=str(cifar10_dir), output_dir=str(tmp_path), method=method,
        method_config={**method_config, "icutmix_alpha": 1.0}, backbone="resnet10-cifar", backbone_width=8,
        stem_stride=2, max_train_samples=256, per_device_train_batch_size=32, warmup_epochs=0.5,
        checkpoint_every_epoch=False, logging_steps=1, disable_tqdm=True, report_to="none", seed=0, **run,
    )  # fmt: skip
    result = train(args)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == result.global_step == 8 * run["num_train_epochs"]
    lambdas = [r["icutmix_lambda"] for r in steps]
    assert all(0.5 <= lam <= 1 for lam in lambdas) and len(set(lambdas)) > 10  # a fresh mix every step
    losses = [r["loss"] for r in steps]
    first, last = np.mean(losses[2:8]), np.mean(losses[-6:])
    assert last < first, f"{method} with i-CutMix: loss {first:.4f} -> {last:.4f}"
    # the setting travels with the saved model
    assert SSLModel.from_pretrained(tmp_path).method.config.icutmix_alpha == 1.0


def test_checkpoint_from_before_icutmix_resumes_and_turning_it_on_does_not(cifar10_dir, tmp_path):
    def args(**overrides) -> PretrainArguments:
        values = dict(
            dataset=str(cifar10_dir), output_dir=str(tmp_path), method="simclr", method_config={"hidden_dim": 32},
            backbone="resnet10-cifar", backbone_width=8, stem_stride=2, max_train_samples=64,
            per_device_train_batch_size=16, max_train_steps=4, checkpoint_every_epoch=False, disable_tqdm=True,
            report_to="none", seed=0,
        )  # fmt: skip
        return PretrainArguments(**{**values, **overrides})

    first = train(args(stop_after_step=2))
    # what a checkpoint written before the i-CutMix fields existed records
    state_file = first.checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("icutmix_alpha", "icutmix_prob"):
        del state["identity"]["method_config"][key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"different run \(method_config: .*icutmix_alpha"):
        train(args(resume_from_checkpoint="latest", method_config={"hidden_dim": 32, "icutmix_alpha": 1.0}))
    resumed = train(args(resume_from_checkpoint="latest"))  # the fields' defaults = how it trained
    assert resumed.finished and resumed.global_step == 4
