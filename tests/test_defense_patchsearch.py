"""PatchSearch: k-means, Grad-CAM window search, poison score, classifier, filtering, metrics.

The toy world: smooth random images in three colour families; some images of family 0 carry a
bright red square (the "trigger"). The toy encoder's features are soft colour histograms in which
pure red weighs 20 times more than other colours, so that a red square dominates the features:
the poisoned images form their own clusters, and pasting the square on any image pulls it there. That is exactly the behaviour a backdoored encoder has and PatchSearch exploits;
every step below must find it through its own mechanism (gradients, flips, a trained classifier).
"""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from hf_sslbd.defenses.patchsearch import (
    ImageSizeMismatchError,
    PatchSearchConfig,
    check_data_matches_model,
    run_patchsearch,
)
from hf_sslbd.defenses.patchsearch.clustering import KMeansError, assign, kmeans
from hf_sslbd.defenses.patchsearch.filtering import write_filtered_variant
from hf_sslbd.defenses.patchsearch.matching import (
    correlation_map,
    flag_by_matching,
    match_filters,
    robust_threshold,
)
from hf_sslbd.defenses.patchsearch.metrics import (
    auroc,
    average_ranks,
    detection_metrics,
    ranking_order,
    removal_metrics,
    topk_precision,
)
from hf_sslbd.defenses.patchsearch.saliency import (
    WindowSizeError,
    best_window,
    find_candidate_windows,
    similarity_cam,
)
from hf_sslbd.defenses.patchsearch.scoring import (
    embed,
    iterative_search,
    paste_at_random,
    poison_score,
    select_test_rows,
)
from hf_sslbd.preprocessing import Preprocessing

torch.set_num_threads(1)

SIZE = 32
TRIGGER = 6
IDENTITY = Preprocessing(image_size=SIZE, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


class RedPatchEncoder(nn.Module):
    """A fixed "encoder" with many features: each channel of its feature map (the Grad-CAM layer)
    is a Gaussian bump around one of 4x4x4 colours, so images of different colours use different
    channels (as real features are image-specific), and the pure-red channel has ``gain`` times
    the weight (the backdoor: the trigger's feature dominates). Features = the channels' means."""

    def __init__(self, gain: float = 20.0, levels: int = 4, sigma: float = 0.15) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        grid = torch.linspace(0, 1, levels)
        self.register_buffer("centres", torch.cartesian_prod(grid, grid, grid))
        red = int((self.centres - torch.tensor([1.0, 0.0, 0.0])).pow(2).sum(1).argmin())
        weight = torch.ones(len(self.centres))
        weight[red] = gain
        self.weight = nn.Parameter(weight)
        self.sigma = sigma

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        distance = (pixel_values.unsqueeze(1) - self.centres.view(1, -1, 3, 1, 1)).pow(2).sum(2)
        maps = torch.exp(-distance / (2 * self.sigma**2)) * self.weight.view(1, -1, 1, 1)
        pooled = maps.mean(dim=(2, 3), keepdim=True)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=maps,
            pooler_output=pooled,
            hidden_states=(maps,) if output_hidden_states else None,
        )


def _smooth_image(rng: np.random.Generator, family: int) -> np.ndarray:
    """A 32 px image: the family's colour shifted per image, plus smooth noise (4x4 blocks)."""
    base = np.array([[0.25, 0.45, 0.3], [0.3, 0.3, 0.6], [0.55, 0.5, 0.2]][family]) + rng.uniform(
        -0.15, 0.15, 3
    )
    noise = rng.normal(0, 0.08, size=(4, 4, 3))
    return np.clip(base + np.kron(noise, np.ones((8, 8, 1))), 0, 1)


def _toy_images(n: int, poisoned: int, seed: int = 0):
    """uint8 (n, 3, 32, 32) images, labels, is_poisoned and trigger boxes; the first ``poisoned``
    images of family 0 carry the red square at a random place."""
    rng = np.random.default_rng(seed)
    images, labels, flags, boxes = [], [], [], []
    poison_left = poisoned
    for index in range(n):
        family = index % 3
        image = _smooth_image(rng, family)
        box = None
        if family == 0 and poison_left > 0:
            y, x = rng.integers(0, SIZE - TRIGGER + 1, size=2)
            image[y : y + TRIGGER, x : x + TRIGGER] = [1.0, 0.05, 0.05]
            box = [int(x), int(y), TRIGGER, TRIGGER]
            poison_left -= 1
        images.append(np.round(image * 255).astype(np.uint8))
        labels.append(family)
        flags.append(box is not None)
        boxes.append(box)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, labels, flags, boxes


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _toy_dataset(n: int = 150, poisoned: int = 15, seed: int = 0) -> datasets.Dataset:
    pixels, labels, flags, boxes = _toy_images(n, poisoned, seed)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "is_poisoned": datasets.Value("bool"),
            "trigger_box": datasets.List(datasets.Value("int32"), length=4),
        }
    )
    cells = [{"bytes": _png(p.permute(1, 2, 0).numpy()), "path": None} for p in pixels]
    return datasets.Dataset.from_dict(
        {"img": cells, "label": labels, "is_poisoned": flags, "trigger_box": boxes}, features=features
    )


# ------------------------------------------------------------------------------------- k-means
def _blobs(seed: int = 0, per_blob: int = 60):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    x = torch.cat([c + 0.5 * torch.randn(per_blob, 3, generator=generator) for c in centres])
    truth = torch.arange(4).repeat_interleave(per_blob)
    order = torch.randperm(len(x), generator=generator)
    return x[order], truth[order], centres


def test_kmeans_recovers_separable_blobs():
    x, truth, centres = _blobs()
    result = kmeans(x, 4, seed=3, chunk_size=17)  # a chunk size that does not divide N
    # a clustering equal to the truth up to a permutation of cluster ids
    pairs = {(int(a), int(t)) for a, t in zip(result.assignments, truth, strict=True)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
    for cluster, blob in pairs:
        assert torch.allclose(result.centroids[cluster], centres[blob], atol=0.3)
    expected = (x - result.centroids[result.assignments]).pow(2).sum(1)
    assert torch.allclose(result.distances, expected, atol=1e-4)
    assert result.inertia == pytest.approx(float(expected.sum()), rel=1e-5)


def test_kmeans_is_seeded():
    x, _, _ = _blobs(seed=1, per_blob=40)
    x = torch.cat([x, torch.randn(50, 3) * 6])  # a non-separable part, where seeds matter
    a, b = kmeans(x, 9, seed=5), kmeans(x, 9, seed=5)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    others = [kmeans(x, 9, seed=s).centroids for s in (6, 7, 8)]
    assert any(not torch.equal(a.centroids, c) for c in others)


def test_kmeans_assign_matches_brute_force_and_handles_duplicates():
    generator = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(103, 5, generator=generator), torch.randn(7, 5, generator=generator)
    labels, dists = assign(x, centroids, chunk_size=10)
    brute = torch.cdist(x, centroids).pow(2)
    assert torch.equal(labels, brute.argmin(1))
    assert torch.allclose(dists, brute.min(1).values, atol=1e-4)
    # fewer distinct points than clusters: still k centroids, each row at distance 0
    duplicated = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    result = kmeans(duplicated, 3, seed=0)
    assert result.centroids.shape == (3, 2) and float(result.distances.max()) == 0.0


def test_kmeans_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(KMeansError, match="only 10 rows"):
        kmeans(x, 11)
    with pytest.raises(KMeansError, match="positive integer"):
        kmeans(x, 0)
    with pytest.raises(KMeansError, match=r"\(N, D\)"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(KMeansError, match="NaN"):
        kmeans(torch.tensor([[0.0], [float("nan")]]), 1)


# ------------------------------------------------------------------------------------ saliency
def test_saliency_finds_the_planted_patch():
    pixels, _, flags, boxes = _toy_images(30, 10, seed=2)
    model = RedPatchEncoder().eval()
    poisoned = torch.tensor(flags)
    images = pixels[poisoned]
    features = embed(model, images, IDENTITY)
    centroid = features.mean(0, keepdim=True)  # the centre of the poisoned cluster
    clusters = torch.zeros(len(images), dtype=torch.long)
    cam = similarity_cam(model, images, IDENTITY, centroid, clusters)
    assert cam.shape == (len(images), SIZE, SIZE)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0 + 1e-6
    windows, corners = find_candidate_windows(model, images, IDENTITY, centroid, clusters, TRIGGER)
    assert windows.dtype == torch.uint8 and windows.shape == (len(images), 3, TRIGGER, TRIGGER)
    for (y, x), box in zip(corners.tolist(), [b for b in boxes if b is not None], strict=True):
        assert (x, y) == (box[0], box[1])  # the exact place of the red square
    # the crops are the red square itself
    assert windows[:, 0].float().mean() > 240 and windows[:, 1:].float().mean() < 20


def test_saliency_of_a_clean_image_points_elsewhere():
    # a control: without the square, the redness channel is silent and the window lands elsewhere
    pixels, _, flags, _ = _toy_images(9, 0, seed=3)
    model = RedPatchEncoder().eval()
    centroid = embed(model, pixels, IDENTITY).mean(0, keepdim=True)
    windows, _ = find_candidate_windows(
        model, pixels, IDENTITY, centroid, torch.zeros(len(pixels), dtype=torch.long), TRIGGER
    )
    assert not any(flags) and windows[:, 0].float().mean() < 200


def test_best_window_on_a_hand_made_map():
    cam = torch.zeros(2, 8, 8)
    cam[0, 5:7, 1:3] = 1.0
    cam[1, 0:2, 6:8] = 1.0
    assert best_window(cam, 2).tolist() == [[5, 1], [0, 6]]
    with pytest.raises(WindowSizeError, match="larger than the 8 px"):
        best_window(cam, 9)


# ------------------------------------------------------------------------------------- scoring
def test_paste_at_random_keeps_the_window_inside_and_is_seeded():
    images = torch.zeros(20, 3, 10, 10, dtype=torch.uint8)
    window = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    a = paste_at_random(images, window, torch.Generator().manual_seed(0))
    b = paste_at_random(images, window, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(images.sum()) == 0  # a copy, the input is untouched
    assert ((a == 200).flatten(1).sum(1) == 3 * 16).all()  # the whole window, in every image
    assert len({tuple(img[0].nonzero()[0].tolist()) for img in a}) > 1  # several places


def test_select_test_rows_takes_the_nearest_per_cluster():
    assignments = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    distances = torch.tensor([0.3, 0.1, 0.2, 0.5, 0.05, 0.9, 0.4, 0.2])
    rows = select_test_rows(assignments, distances, 6, torch.Generator().manual_seed(0))
    assert rows.tolist() == [1, 2, 3, 4, 6, 7]
    few = select_test_rows(assignments, distances, 2, torch.Generator().manual_seed(0))
    assert len(few) == 2 and set(few.tolist()) <= {1, 4, 7}  # one nearest row of two clusters


def _toy_clusters(dataset_pixels, model, k, seed=0):
    features = embed(model, dataset_pixels, IDENTITY)
    return kmeans(features, k, seed=seed)


def test_poison_score_flips_to_the_trigger_cluster_only_for_the_trigger():
    pixels, _, flags, boxes = _toy_images(120, 12, seed=4)
    model = RedPatchEncoder().eval()
    clusters = _toy_clusters(pixels, model, 4)
    flags_t = torch.tensor(flags)
    poison_clusters = set(clusters.assignments[flags_t].tolist())
    assert len(poison_clusters) == 1  # the toy encoder puts the poisons together
    (poison_cluster,) = poison_clusters
    test_rows = select_test_rows(
        clusters.assignments, clusters.distances, 40, torch.Generator().manual_seed(0)
    )
    test_images = pixels[test_rows]
    test_clusters = clusters.assignments[test_rows]
    others = int((test_clusters != poison_cluster).sum())
    x, y, w, h = boxes[flags.index(True)]
    trigger = pixels[flags.index(True), :, y : y + h, x : x + w]
    generator = torch.Generator().manual_seed(0)
    score = poison_score(
        model, IDENTITY, trigger, poison_cluster, test_images, test_clusters, clusters.centroids, generator
    )
    assert others >= 25 and score >= 0.9 * others  # (nearly) every test image of another cluster flips
    clean_row = flags.index(False)
    ordinary = pixels[clean_row, :, 0:TRIGGER, 0:TRIGGER]
    clean_score = poison_score(
        model,
        IDENTITY,
        ordinary,
        int(clusters.assignments[clean_row]),
        test_images,
        test_clusters,
        clusters.centroids,
        generator,
    )
    assert clean_score <= 2


def test_iterative_search_ranks_the_poisoned_cluster_first():
    pixels, _, flags, _ = _toy_images(150, 15, seed=5)
    model = RedPatchEncoder().eval()
    clusters = _toy_clusters(pixels, model, 8)
    search = iterative_search(
        model,
        IDENTITY,
        lambda rows: pixels[torch.tensor(rows, dtype=torch.long)],
        clusters,
        window=TRIGGER,
        num_test_images=40,
        samples_per_iteration=2,
        seed=0,
        progress=False,
    )
    truth = np.array(flags)
    scores = search.scores.numpy()
    top = ranking_order(scores)[:5]
    assert truth[top].all()  # the best-scored rows are poisons
    # poisoned clusters survive the rounds: (almost) all poisons end up scored, a poisoned cluster last
    assert np.isnan(scores[truth]).mean() <= 0.2
    poisoned_clusters = set(clusters.assignments[torch.from_numpy(truth)].tolist())
    assert search.history[-1]["top_clusters"][0][0] in poisoned_clusters
    assert search.history[0]["clusters"] == 8 and search.history[-1]["clusters"] == 1
    assert np.nanmax(scores[~truth]) < np.nanmin(scores[truth])
    assert auroc(truth, scores) > 0.9  # unscored poisons tie with the unscored clean rows


# ------------------------------------------------------------------ pattern control (re-ranking)
class PatternEncoder(nn.Module):
    """A toy backdoored encoder that tells a *pattern* from *colour*: colour-histogram features
    (as :class:`RedPatchEncoder`, no gain) plus two strong channels, each max-pooled: "pattern"
    fires only on a red-above-green edge (the trigger, a red block over a green block), "dark"
    on any black 6 px area (a natural confounder: a dark patch pulls images into a cluster of
    dark images through its colour alone)."""

    def __init__(self, levels: int = 4, sigma: float = 0.15) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        grid = torch.linspace(0, 1, levels)
        self.register_buffer("centres", torch.cartesian_prod(grid, grid, grid))
        self.sigma = sigma
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        x = pixel_values * self.scale
        distance = (x.unsqueeze(1) - self.centres.view(1, -1, 3, 1, 1)).pow(2).sum(2)
        histogram = torch.exp(-distance / (2 * self.sigma**2)).mean(dim=(2, 3))
        red_minus_green = x[:, 0] - x[:, 1]
        edge = red_minus_green[:, :-1] - red_minus_green[:, 1:]  # row above minus row below
        pattern = 8.0 * torch.relu(edge - 1.5).flatten(1).max(1).values
        local = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), TRIGGER, stride=1)
        dark = 40.0 * torch.relu(0.05 - local).flatten(1).max(1).values
        pooled = torch.cat([histogram, pattern[:, None], dark[:, None]], dim=1)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=pooled[:, :, None, None],
            pooler_output=pooled[:, :, None, None],
            hidden_states=(pooled[:, :, None, None],) if output_hidden_states else None,
        )


def _pattern_world(n: int = 150, per_group: int = 15, seed: int = 0):
    """Smooth images; ``per_group`` of family 0 carry the red-over-green trigger, ``per_group`` of
    family 1 (clean) a black square. Returns pixels and, per kind, the row of one example and
    its box."""
    rng = np.random.default_rng(seed)
    images, boxes = [], {"trigger": [], "dark": []}
    for index in range(n):
        family = index % 3
        image = _smooth_image(rng, family)
        kind = {0: "trigger", 1: "dark"}.get(family)
        if kind is not None and len(boxes[kind]) < per_group:
            y, x = (int(v) for v in rng.integers(0, SIZE - TRIGGER + 1, size=2))
            if kind == "trigger":
                image[y : y + TRIGGER // 2, x : x + TRIGGER] = [1.0, 0.0, 0.0]
                image[y + TRIGGER // 2 : y + TRIGGER, x : x + TRIGGER] = [0.0, 1.0, 0.0]
            else:
                image[y : y + TRIGGER, x : x + TRIGGER] = 0.0
            boxes[kind].append((index, y, x))
        images.append(np.round(image * 255).astype(np.uint8))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), boxes


def test_control_separates_a_pattern_trigger_from_a_flat_dark_patch():
    from hf_sslbd.defenses.patchsearch.scoring import SearchResult, control_windows, rerank_by_control

    pixels, boxes = _pattern_world(seed=11)
    model = PatternEncoder().eval()
    clusters = _toy_clusters(pixels, model, 6)
    test_rows = select_test_rows(
        clusters.assignments, clusters.distances, 60, torch.Generator().manual_seed(0)
    )
    test_clusters = clusters.assignments[test_rows]
    search = SearchResult(
        scores=torch.full((len(pixels),), float("nan"), dtype=torch.float64), test_rows=test_rows
    )
    rows = {}
    for kind in ("trigger", "dark"):
        row, y, x = boxes[kind][0]
        rows[kind] = row
        search.windows[row] = pixels[row, :, y : y + TRIGGER, x : x + TRIGGER].clone()
        search.scores[row] = poison_score(
            model,
            IDENTITY,
            search.windows[row],
            int(clusters.assignments[row]),
            pixels[test_rows],
            test_clusters,
            clusters.centroids,
            torch.Generator().manual_seed(1),
        )
    # both windows flip many images into their own cluster: the raw score cannot tell them apart
    assert search.scores[rows["trigger"]] >= 20 and search.scores[rows["dark"]] >= 20
    controls = control_windows(search.windows[rows["trigger"]])
    assert set(controls) == {"rot180", "mean_colour"}
    assert torch.equal(controls["rot180"], search.windows[rows["trigger"]].flip(1).flip(2))
    assert (
        controls["mean_colour"].dtype == torch.uint8
        and controls["mean_colour"].flatten(1).float().std(1).max() == 0
    )

    load = lambda r: pixels[torch.tensor(r, dtype=torch.long)]  # noqa: E731
    dark_first = [rows["dark"], rows["trigger"]]
    result = rerank_by_control(model, IDENTITY, load, dark_first, search, clusters, seed=0)
    assert result.applied and result.order == [rows["trigger"], rows["dark"]]
    assert result.control[rows["trigger"]] <= 2  # the trigger's pattern is gone in its controls
    assert result.control[rows["dark"]] >= 0.8 * float(search.scores[rows["dark"]])  # the colour is not
    # no pattern-specific candidate (a flat-colour trigger looks like this): the search's order stays
    alone = rerank_by_control(model, IDENTITY, load, [rows["dark"]], search, clusters, seed=0)
    assert not alone.applied and alone.order == [rows["dark"]]
    with pytest.raises(ValueError, match="never scored"):
        rerank_by_control(model, IDENTITY, load, [rows["dark"], rows["dark"] + 1], search, clusters)


# ------------------------------------------------------------------ classifier early stop
def test_f1_and_the_early_stop_rule():
    from hf_sslbd.defenses.patchsearch.classifier import f1_score, should_stop

    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    assert f1_score(torch.tensor([1, 1, 0, 0, 1, 0, 0, 0]), labels) == pytest.approx(
        2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    )
    assert f1_score(torch.zeros(8, dtype=torch.long), labels) == 0.0
    assert f1_score(labels, labels) == 1.0
    assert not should_stop([0.5, 0.5, 0.5], patience=3)  # needs more than `patience` checks
    assert should_stop([0.2, 0.501, 0.505, 0.509], patience=3)  # equal in whole percent
    assert not should_stop([0.5, 0.5, 0.6, 0.5], patience=3)


def _classifier_run(patience: int, steps: int = 300):
    from hf_sslbd.defenses.patchsearch.classifier import ClassifierSettings, train_and_flag

    pixels, _, flags, boxes = _toy_images(120, 12, seed=9)
    scores = torch.tensor(flags, dtype=torch.float64) + 0.01 * torch.arange(120) / 120
    ranking = torch.argsort(scores, descending=True)
    x, y, w, h = boxes[flags.index(True)]
    window = pixels[flags.index(True), :, y : y + h, x : x + w]
    settings = ClassifierSettings(
        topk=5,
        top_fraction=0.1,
        ensemble_size=1,
        steps=steps,
        batch_size=16,
        learning_rate=0.05,
        width=8,
        stem_stride=2,
        eval_interval=5,
        patience=patience,
        # the paper's resized pastes: with same-size ones (the default) this toy stops at a stable F1
        # of 0.91, which tests the stop rule as well but not "it learned the trigger" below
        paste_scale=(0.33, 1.33),
    )
    return train_and_flag(
        lambda r: pixels[torch.tensor(r, dtype=torch.long)],
        ranking,
        [window],
        settings,
        seed=0,
        progress=False,
    ), flags


def test_classifier_early_stop_fires_once_the_f1_is_stable():
    stopped, flags = _classifier_run(patience=4)
    (steps,) = stopped.steps_run
    (history,) = stopped.validation_f1
    assert steps < 300 and steps == 5 * len(history)  # stopped at a check, well before the budget
    assert len(history) > 4 and len({int(v * 100) for v in history[-4:]}) == 1
    assert history[-1] == 1.0  # it stopped because it learned the trigger, not by accident
    full, _ = _classifier_run(patience=1000, steps=60)
    assert full.steps_run == [60] and len(full.validation_f1[0]) == 12  # never stable for 1000 checks


# ----------------------------------------------------------------------------------- metrics
def test_auroc_against_hand_computed_cases():
    # 2 poisons (0.9, 0.4), 3 clean (0.8, 0.4, 0.1): pairs above = (0.9>0.8,0.4,0.1)=3, (0.4>0.1)=1,
    # (0.4=0.4) = 1/2 -> 4.5 / 6
    assert auroc([1, 0, 1, 0, 0], [0.9, 0.8, 0.4, 0.4, 0.1]) == pytest.approx(4.5 / 6)
    assert auroc([1, 1, 0, 0], [4, 3, 2, 1]) == 1.0
    assert auroc([0, 0, 1, 1], [4, 3, 2, 1]) == 0.0
    assert auroc([1, 0, 1, 0], [1, 1, 1, 1]) == 0.5
    # NaN (never scored) ranks below every score, tied with the other NaNs
    assert auroc([1, 0, 0, 1], [2.0, float("nan"), 0.0, float("nan")]) == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert np.isnan(auroc([0, 0], [1, 2]))


def test_auroc_matches_the_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.2
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert auroc(labels, scores) == pytest.approx(pairwise)
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_removal_and_topk_metrics_by_hand():
    truth = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    flagged = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    m = removal_metrics(truth, flagged)
    assert (m["removed_rows"], m["removed_poisons"], m["removed_clean"], m["poisons_left"]) == (3, 2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["clean_removed_fraction"] == pytest.approx(1 / 7) and m["f1"] == pytest.approx(2 / 3)
    scores = [5, 1, 4, 6, 0, 0, 0, 0, 0, float("nan")]
    assert topk_precision(truth, scores, 1) == 0.0  # row 3 (clean) scores highest
    assert topk_precision(truth, scores, 3) == pytest.approx(2 / 3)
    assert ranking_order(scores)[:4].tolist() == [3, 0, 2, 1] and ranking_order(scores)[-1] == 9
    full = detection_metrics(truth, flagged, scores, topk=(1, 3, 50))
    assert set(full["topk_precision"]) == {"1", "3"} and full["auroc"] == auroc(truth, scores)
    with pytest.raises(ValueError, match="10 rows but flagged has 2"):
        removal_metrics(truth, [1, 0])


# --------------------------------------------------------------------------------- filtering
def test_filtered_variant_loads_without_the_flagged_rows(tmp_path):
    train = _toy_dataset(30, 5, seed=6)
    test = _toy_dataset(12, 0, seed=7)
    removed = np.zeros(30, bool)
    removed[[0, 3, 6, 7]] = True  # rows 0, 3, 6 are poisons; 7 is clean
    source_record = {
        "config": {"mode": "targeted", "seed": 0},
        "trigger_spec": "htba:10",
        "target": {"id": 0, "name": "a"},
    }
    folder = write_filtered_variant(
        datasets.DatasetDict(train=train, test=test, test_patched=test),
        removed,
        tmp_path / "out",
        "toy_patchsearch",
        {
            "method": "patchsearch",
            "source": {"dataset": "toy", "config": "c"},
            "detection": removal_metrics(train["is_poisoned"], removed),
        },
        source_record=source_record,
    )
    loaded = datasets.load_dataset(str(tmp_path / "out"), "toy_patchsearch")
    assert loaded["train"].num_rows == 26 and loaded["test"].num_rows == 12
    kept = [i for i in range(30) if not removed[i]]
    original = [train[i]["img"].tobytes() for i in kept]
    assert [row["img"].tobytes() for row in loaded["train"]] == original
    assert sum(loaded["train"]["is_poisoned"]) == 5 - 3
    assert json.loads((folder / "removed_rows.json").read_text()) == [0, 3, 6, 7]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Removed**: 4 of 30 training rows" in card and "2 poisoned rows left" in card
    from hf_sslbd.variants import VariantExistsError, load_variant_info

    info = load_variant_info(tmp_path / "out", "toy_patchsearch")
    assert info["defense"]["removed_rows"] == 4 and info["config"]["mode"] == "targeted"
    assert info["counts"]["train"] == {"rows": 26, "poisoned": 2}
    with pytest.raises(VariantExistsError, match="overwrite"):
        write_filtered_variant(
            datasets.DatasetDict(train=train),
            removed,
            tmp_path / "out",
            "toy_patchsearch",
            {"method": "x", "source": {"dataset": "toy"}},
        )
    with pytest.raises(ValueError, match="train split has 30 rows"):
        write_filtered_variant(datasets.DatasetDict(train=train), removed[:5], tmp_path / "other", "v", {})
    assert not (tmp_path / "other").exists()


# -------------------------------------------------------------------------- the whole pipeline
def _toy_config(**overrides) -> PatchSearchConfig:
    settings = dict(
        num_clusters=8,
        window_size=TRIGGER,
        num_test_images=40,
        classifier_topk=5,
        classifier_ensemble=1,
        classifier_steps=80,
        classifier_batch_size=32,
        classifier_learning_rate=0.05,
        classifier_width=8,
        classifier_stem_stride=2,
        batch_size=64,
        device="cpu",
        seed=0,
    )
    settings.update(overrides)
    return PatchSearchConfig(**settings)


def test_run_patchsearch_flags_the_poisons_of_the_toy(tmp_path):
    dataset = _toy_dataset(150, 15, seed=8)
    config = _toy_config(flag_mode="classifier")
    result = run_patchsearch((RedPatchEncoder().eval(), IDENTITY), dataset, config, progress=False)
    m = result.metrics
    assert m["rows"] == 150 and m["poisoned_rows"] == 15
    assert m["topk_precision"]["5"] == 1.0 and m["auroc"] > 0.95
    # one small classifier trained for 80 steps: it ranks almost perfectly, its 0.5 cut is rougher
    assert m["classifier_auroc"] > 0.98 and "match_auroc" not in m
    assert m["recall"] >= 0.9 and m["clean_removed_fraction"] < 0.1
    assert bool(
        torch.isnan(
            result.match_scores if result.match_scores is not None else torch.tensor(float("nan"))
        ).all()
    )
    assert m["top_windows_from_poisons"] == 5
    assert result.top_windows.shape == (5, 3, TRIGGER, TRIGGER)
    saved = result.save(tmp_path)
    report = json.loads((saved / "patchsearch.json").read_text())
    assert report["metrics"]["recall"] == m["recall"] and report["config"]["num_clusters"] == 8
    assert (saved / "top_windows.png").is_file()
    again = run_patchsearch((RedPatchEncoder().eval(), IDENTITY), dataset, config, progress=False)
    assert torch.equal(torch.nan_to_num(again.scores, -1), torch.nan_to_num(result.scores, -1))
    assert torch.equal(again.probabilities, result.probabilities)


def test_run_patchsearch_default_flags_the_toy_by_matching_the_windows(tmp_path):
    dataset = _toy_dataset(150, 15, seed=8)
    # the toy's images are flat 8 px blocks: their scores spread wider than real photos' (robust sigma
    # 0.2 vs 0.07 on CIFAR-10), so the poisons (score 1.0) sit at 4 sigma, the clean maximum at 2.3
    config = _toy_config(match_windows=5, match_z=3.0)
    assert config.flag_mode == "match" and config.match_contrast
    result = run_patchsearch((RedPatchEncoder().eval(), IDENTITY), dataset, config, progress=False)
    m = result.metrics
    assert m["match_auroc"] > 0.98 and "classifier_auroc" not in m
    assert m["recall"] >= 0.9 and m["clean_removed_fraction"] < 0.05
    assert bool(torch.isnan(result.probabilities).all()) and "classifier" not in result.timings
    match = result.diagnostics["match"]
    assert match["flagged"] == int(result.flagged.sum()) and match["threshold"] > match["center"]
    saved = result.save(tmp_path)
    report = json.loads((saved / "patchsearch.json").read_text())
    assert report["config"]["flag_mode"] == "match" and report["metrics"]["recall"] == m["recall"]


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    dataset = _toy_dataset(20, 2)
    encoder = (RedPatchEncoder().eval(), IDENTITY)
    with pytest.raises(ValueError, match="no image column found"):
        run_patchsearch(encoder, dataset.remove_columns("img"), _toy_config(num_clusters=2), progress=False)
    with pytest.raises(ValueError, match="num_clusters=21 is larger than the dataset \\(20 rows\\)"):
        run_patchsearch(encoder, dataset, _toy_config(num_clusters=21), progress=False)
    with pytest.raises(WindowSizeError, match="window of 33 px is larger than the 32 px"):
        run_patchsearch(encoder, dataset, _toy_config(num_clusters=2, window_size=33), progress=False)
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        run_patchsearch(encoder, dataset, _toy_config(window_size=0), progress=False)
    big = (RedPatchEncoder().eval(), Preprocessing(image_size=64))
    with pytest.raises(ImageSizeMismatchError, match="takes 64x64 px images .* data has 32x32 px"):
        run_patchsearch(big, dataset, _toy_config(num_clusters=2), progress=False)
    with pytest.raises(ImageSizeMismatchError, match="smaller than the crop"):
        check_data_matches_model(dataset[0]["img"], Preprocessing(image_size=224, resize_size=256))
    with pytest.raises(TypeError, match="one split"):
        run_patchsearch(encoder, datasets.DatasetDict(train=dataset), _toy_config(), progress=False)


@pytest.mark.parametrize("preset", ["resnet10-cifar", "vit-tiny"])
def test_cam_runs_on_real_backbones_and_pools_like_the_library(preset):
    from hf_sslbd.backbones import backbone_config, model_from_config, pool_output, pooled_features

    torch.manual_seed(0)
    config = backbone_config(preset, image_size=SIZE)
    if preset == "vit-tiny":
        config.num_hidden_layers = 2
    model = model_from_config(config).eval()
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    pre = Preprocessing(image_size=SIZE)
    with torch.no_grad():
        from hf_sslbd.preprocessing import normalize

        x = normalize(images, pre.mean, pre.std)
        # Grad-CAM pools the output it asked hidden states of: the same features as the library's
        output = model(pixel_values=x, output_hidden_states=True)
        assert torch.allclose(pool_output(model, output), pooled_features(model, x), atol=1e-6)
    features = embed(model, images, pre)
    cam = similarity_cam(model, images, pre, features[:1], torch.zeros(3, dtype=torch.long))
    assert cam.shape == (3, SIZE, SIZE) and torch.isfinite(cam).all()
    assert float(cam.amax()) == pytest.approx(1.0, abs=1e-4)  # a non-degenerate map, min-max scaled
    assert not any(p.grad is not None for p in model.parameters())  # no gradient left on the weights


def test_auto_layer_picks_a_map_fine_enough_for_the_window():
    from hf_sslbd.backbones import backbone_config, model_from_config
    from hf_sslbd.defenses.patchsearch.saliency import auto_layer

    model = model_from_config(backbone_config("resnet10-cifar", width=8, stem_stride=2)).eval()
    with torch.no_grad():
        hidden = model(pixel_values=torch.zeros(1, 3, SIZE, SIZE), output_hidden_states=True).hidden_states
    sides = [h.shape[-1] for h in hidden]
    assert sides == [16, 16, 8, 4, 2]
    assert hidden[auto_layer(model, hidden, SIZE, 12 / 2)].shape[-1] == 8  # 4 px cells for a 12 px window
    assert hidden[auto_layer(model, hidden, SIZE, 16 / 2)].shape[-1] == 4
    assert auto_layer(model, hidden, SIZE, None) == -1  # no limit: the last stage, as the paper
    assert auto_layer(model, hidden, SIZE, 1) == -len(hidden)  # nothing fine enough: the finest map


# ------------------------------------------------------------------- command line, real CIFAR-10
def test_defend_cli_patchsearch_on_a_real_cifar10_variant(tmp_path, cifar10):
    """examples/defend.py --method patchsearch end to end on a small real poisoned variant, with a
    randomly initialised encoder: the plumbing (loading, report, scores, filtered variant with the
    source's record and splits), not detection quality."""
    import importlib.util
    from pathlib import Path

    from hf_sslbd.backbones import build_backbone
    from hf_sslbd.modeling import PREPROCESSOR_CONFIG_NAME, preprocessor_dict
    from hf_sslbd.poisoning import PoisonConfig, make_poisoned_variant, save_variant
    from hf_sslbd.variants import load_variant_info

    small = datasets.DatasetDict(
        train=cifar10["train"].select(range(300)), test=cifar10["test"].select(range(40))
    )
    config = PoisonConfig(target="airplane", rate=0.5, trigger_size=8, seed=0)
    variant = save_variant(make_poisoned_variant(small, config), config, tmp_path / "data")
    torch.manual_seed(0)
    encoder_dir = tmp_path / "encoder"
    build_backbone("resnet10-cifar", width=8, stem_stride=2).save_pretrained(encoder_dir)
    (encoder_dir / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(preprocessor_dict(Preprocessing(SIZE))))

    example = Path(__file__).resolve().parents[1] / "examples" / "defend.py"
    spec = importlib.util.spec_from_file_location("defend_example", example)
    defend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defend)
    assert "patchsearch" in defend.DEFENSES
    out = tmp_path / "out"
    args = ["--method", "patchsearch", "--model", str(encoder_dir), "--dataset", str(tmp_path / "data")]
    args += ["--dataset_config", variant.name, "--output_dir", str(out), "--num_clusters", "6"]
    args += ["--num_test_images", "12", "--window_size", "8", "--classifier_topk", "4"]
    args += ["--classifier_steps", "3", "--classifier_ensemble", "1", "--classifier_batch_size", "16"]
    args += ["--device", "cpu", "--batch_size", "64"]
    summary = defend.main(args)

    report = json.loads((out / "patchsearch.json").read_text())
    poisoned = sum(datasets.load_dataset(str(tmp_path / "data"), variant.name, split="train")["is_poisoned"])
    assert poisoned > 0 and report["config"]["num_clusters"] == 6
    assert report["metrics"]["poisoned_rows"] == poisoned and report["rows"] == 300
    removed = report["metrics"]["removed_rows"]
    name = summary["filtered_variant"]["config"]
    assert name == f"{variant.name}_patchsearch-seed-0"
    filtered = datasets.load_dataset(str(out / "filtered"), name)
    assert filtered["train"].num_rows == 300 - removed
    assert filtered["test"].num_rows == 40 and filtered["test_patched"].num_rows == 40 - small["test"][
        "label"
    ].count(0)
    info = load_variant_info(out / "filtered", name)
    assert info["config"]["target"] == "airplane" and info["defense"]["removed_rows"] == removed
    assert (out / "filtered" / name / "trigger.png").is_file()
    from hf_sslbd.variants import VariantExistsError

    with pytest.raises(VariantExistsError, match="overwrite"):
        defend.main(args)


# ------------------------------------------------------------------------------ window matching
def _textured_world(n: int = 300, poisoned: int = 30, patch: int = 8, seed: int = 0):
    """uint8 (n, 3, 32, 32) smooth noisy images; the first ``poisoned`` carry a random-colour
    checkerboard-like ``patch`` px trigger at a random place. Returns images, flags, corners, trigger."""
    rng = np.random.default_rng(seed)
    trigger = rng.uniform(0, 1, size=(patch, patch, 3))
    images, corners = [], []
    for index in range(n):
        image = _smooth_image(rng, index % 3) + rng.normal(0, 0.03, size=(SIZE, SIZE, 3))
        corner = None
        if index < poisoned:
            y, x = (int(v) for v in rng.integers(0, SIZE - patch + 1, size=2))
            image[y : y + patch, x : x + patch] = trigger
            corner = (y, x)
        images.append(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
        corners.append(corner)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    flags = torch.arange(n) < poisoned
    return pixels, flags, corners, torch.from_numpy(np.round(trigger * 255).astype(np.uint8)).permute(2, 0, 1)


def _loader(pixels):
    return lambda rows: pixels[rows]


def test_correlation_map_is_the_pearson_correlation_of_each_patch():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 12, 12, generator=generator)
    windows = torch.rand(3, 3, 5, 5, generator=generator)
    result = correlation_map(images, match_filters(windows))
    assert result.shape == (2, 3, 8, 8)
    for b, k, y, x in [(0, 0, 0, 0), (1, 2, 7, 7), (0, 1, 3, 5)]:
        patch = images[b, :, y : y + 5, x : x + 5].flatten().double()
        window = windows[k].flatten().double()
        expected = torch.corrcoef(torch.stack([patch, window]))[0, 1]
        assert abs(float(result[b, k, y, x]) - float(expected)) < 1e-4
    # the window itself, pasted, correlates 1 at its place; its negative -1
    canvas = images[:1].clone()
    canvas[0, :, 4:9, 2:7] = windows[1]
    assert abs(float(correlation_map(canvas, match_filters(windows[1:2]))[0, 0, 4, 2]) - 1.0) < 1e-4
    canvas[0, :, 4:9, 2:7] = 1 - windows[1]
    assert abs(float(correlation_map(canvas, match_filters(windows[1:2]))[0, 0, 4, 2]) + 1.0) < 1e-4


def test_matching_finds_a_planted_patch_with_high_recall_and_few_clean_rows():
    pixels, flags, corners, trigger = _textured_world(300, 30, seed=1)
    # windows as the search gives them: crops of poisoned images around the trigger, a pixel or two off
    windows = []
    for row, (dy, dx) in zip(range(3), [(0, 0), (1, -1), (-2, 1)], strict=True):
        y, x = corners[row]
        y, x = min(max(y + dy, 0), SIZE - 8), min(max(x + dx, 0), SIZE - 8)
        windows.append(pixels[row, :, y : y + 8, x : x + 8])
    result = flag_by_matching(_loader(pixels), len(pixels), windows, z=5.0, batch_size=64, progress=False)
    m = removal_metrics(flags.numpy(), result.flagged.numpy())
    assert m["recall"] >= 0.95 and m["clean_removed_fraction"] <= 0.01
    assert auroc(flags.numpy(), result.scores.numpy()) > 0.99
    assert result.scores[flags].min() > 0.8 and result.threshold < result.scores[flags].min()
    assert result.best_window.min() >= 0 and result.best_window.max() < 3
    # clean windows (crops of clean images) do not flag the poisons
    clean = [pixels[row, :, 5:13, 5:13] for row in (100, 101, 102)]
    other = flag_by_matching(_loader(pixels), len(pixels), clean, z=5.0, batch_size=64, progress=False)
    assert removal_metrics(flags.numpy(), other.flagged.numpy())["recall"] < 0.2


def test_subwindows_rescue_a_badly_misaligned_window():
    pixels, flags, corners, _ = _textured_world(300, 30, patch=8, seed=2)
    # a window half off the trigger: only its 4 x 8 lower part lies on it
    row = next(r for r in range(30) if corners[r][0] >= 4)
    y, x = corners[row]
    windows = [pixels[row, :, y - 4 : y + 4, x : x + 8]]
    whole = flag_by_matching(_loader(pixels), len(pixels), windows, progress=False)
    crops = flag_by_matching(_loader(pixels), len(pixels), windows, subwindow=4, stride=1, progress=False)
    whole_auroc = auroc(flags.numpy(), whole.scores.numpy())
    crops_auroc = auroc(flags.numpy(), crops.scores.numpy())
    # the whole window mixes trigger and background and ranks some clean rows above poisons; its best
    # crop ranks every poison first (4 px crops also match natural texture closely, so their scores
    # bunch near the top: the z rule separates them poorly, the ranking does not)
    assert whole_auroc < 0.98 and crops_auroc == 1.0
    assert crops.scores[flags].min() > crops.scores[~flags].max()


def test_robust_threshold_ignores_a_minority_of_high_scores():
    generator = torch.Generator().manual_seed(0)
    clean = 0.4 + 0.05 * torch.randn(900, generator=generator, dtype=torch.float64)
    mixed = torch.cat([clean, torch.full((100,), 0.95, dtype=torch.float64)])
    threshold, center, scale = robust_threshold(mixed, z=5.0)
    # the poisons move the median a little and the lower-half sigma hardly at all
    assert abs(center - 0.4) < 0.01 and abs(scale - 0.05) < 0.007
    assert abs(threshold - (center + 5 * scale)) < 1e-12 and 0.6 < threshold < 0.7
    flagged = mixed > threshold
    assert bool(flagged[900:].all()) and int(flagged[:900].sum()) == 0
    # a larger z is stricter; an explicit threshold overrides the rule
    assert robust_threshold(mixed, z=8.0)[0] > threshold
    windows = torch.rand(2, 3, 4, 4, generator=generator)
    pixels = (torch.rand(20, 3, 16, 16, generator=generator) * 255).to(torch.uint8)
    explicit = flag_by_matching(_loader(pixels), 20, windows, threshold=-1.0, progress=False)
    assert explicit.threshold == -1.0 and bool(explicit.flagged.all())


def test_matching_bad_input():
    pixels = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    window = torch.rand(1, 3, 20, 20)
    with pytest.raises(WindowSizeError, match="window of 20 px is larger than the 16 px"):
        flag_by_matching(_loader(pixels), 4, window, progress=False)
    with pytest.raises(ValueError, match="no windows to match"):
        match_filters([])
    with pytest.raises(ValueError, match="every window is flat"):
        match_filters(torch.full((2, 3, 4, 4), 0.5))
    with pytest.raises(ValueError, match="must be square"):
        match_filters(torch.rand(1, 3, 4, 5))
    with pytest.raises(
        ValueError, match="subwindow must be an integer from 2 to the window size \\(4\\) px, got 5"
    ):
        match_filters(torch.rand(1, 3, 4, 4), subwindow=5)
    with pytest.raises(ValueError, match="match_z must be positive, got 0"):
        robust_threshold(torch.rand(10), z=0)
    with pytest.raises(ValueError, match="match_threshold must be a correlation in \\[-1, 1\\]"):
        flag_by_matching(_loader(pixels), 4, torch.rand(1, 3, 4, 4), threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="flag_mode must be one of"):
        PatchSearchConfig(flag_mode="vote").validate()
    with pytest.raises(ValueError, match="match_subwindow must be from 2 to window_size \\(10\\) px"):
        PatchSearchConfig(window_size=10, match_subwindow=12).validate()


def test_best_window_names_the_matching_window_even_after_flat_ones_are_dropped():
    pixels, flags, corners, trigger = _textured_world(120, 12, seed=3)
    flat = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    windows = [flat, pixels[100, :, 0:8, 0:8], trigger]
    for subwindow in (None, 4):
        result = flag_by_matching(_loader(pixels), 120, windows, subwindow=subwindow, progress=False)
        assert bool((result.best_window[flags] == 2).all())
        assert set(result.best_window.tolist()) <= {1, 2}


def test_defend_cli_patchsearch_help_lists_the_flagging_options(capsys):
    import importlib.util
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "defend.py"
    spec = importlib.util.spec_from_file_location("defend_example_help", example)
    defend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defend)
    with pytest.raises(SystemExit) as exit_info:
        defend.main(["--method", "patchsearch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--flag_mode", "--match_z", "--match_subwindow", "--classifier_paste_scale"):
        assert flag in text
