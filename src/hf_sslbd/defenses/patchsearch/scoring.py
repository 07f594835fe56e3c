"""The poison score of a candidate window, and PatchSearch's iterative search over clusters.

Poison score (the paper's "flips"): paste the candidate window at a random place on each held-out
test image and count the test images *of other clusters* that the backbone then puts in the
candidate's cluster. A trigger drags images of every class into its (poisoned) cluster; an
ordinary object part does not.

Test images: the ``num_test_images // k`` rows closest to each centroid (one row of
``num_test_images`` random clusters when there are more clusters than test images), so every
part of the feature space is represented.

Iterative search: each round scores ``samples_per_iteration`` random, not yet scored images of
every remaining cluster, ranks the clusters by their best score so far and drops the lowest
``remove_per_iteration`` fraction (at least one cluster), until no cluster or no image is left.
Poisoned clusters survive and get scanned deeper; clean ones are dropped after a few images.
Images never scored keep the score NaN (ranked below every scored image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ...backbones import pooled_features
from ...preprocessing import Preprocessing, normalize
from .clustering import KMeansResult, assign
from .saliency import check_window, find_candidate_windows


@torch.inference_mode()
def embed(
    model: PreTrainedModel, images: Tensor, preprocessing: Preprocessing, batch_size: int = 256
) -> Tensor:
    """L2-normalised pooled features (N, D) of uint8 / [0, 1] images at the model's input size."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device), preprocessing.mean, preprocessing.std)
        out.append(F.normalize(pooled_features(model, x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def select_test_rows(
    assignments: Tensor, distances: Tensor, num_test_images: int, generator: torch.Generator
) -> Tensor:
    """Row indices of the held-out test images (see the module docstring)."""
    if num_test_images < 1:
        raise ValueError(f"num_test_images must be positive, got {num_test_images}")
    k = int(assignments.max()) + 1 if len(assignments) else 0
    per_cluster = num_test_images // max(k, 1)
    order = torch.argsort(distances, stable=True)
    by_cluster: list[list[int]] = [[] for _ in range(k)]
    for row in order.tolist():  # rows of each cluster, nearest to its centroid first
        by_cluster[int(assignments[row])].append(row)
    if per_cluster > 0:
        rows = [r for members in by_cluster for r in members[:per_cluster]]
    else:
        clusters = [c for c in torch.randperm(k, generator=generator).tolist() if by_cluster[c]]
        rows = [by_cluster[c][0] for c in clusters[:num_test_images]]
    return torch.tensor(sorted(rows), dtype=torch.long)


def paste_at_random(images: Tensor, window: Tensor, generator: torch.Generator) -> Tensor:
    """A copy of ``images`` (B, C, H, W) with ``window`` (C, w, w) pasted at a uniformly random
    top-left corner per image (the window always fully inside)."""
    check_window(window.shape[-1], min(images.shape[-2:]))
    out = images.clone()
    size = window.shape[-1]
    ys = torch.randint(images.shape[-2] - size + 1, (images.shape[0],), generator=generator).tolist()
    xs = torch.randint(images.shape[-1] - size + 1, (images.shape[0],), generator=generator).tolist()
    for index, (y, x) in enumerate(zip(ys, xs, strict=True)):
        out[index, :, y : y + size, x : x + size] = window.to(out.dtype)
    return out


def poison_score(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    window: Tensor,
    cluster: int,
    test_images: Tensor,
    test_clusters: Tensor,
    centroids: Tensor,
    generator: torch.Generator,
    batch_size: int = 256,
) -> int:
    """How many test images of other clusters than ``cluster`` move into it when ``window`` is
    pasted on them."""
    pasted = paste_at_random(test_images, window, generator)
    new_clusters, _ = assign(embed(model, pasted, preprocessing, batch_size), centroids)
    return int(((new_clusters == cluster) & (test_clusters != cluster)).sum())


@dataclass
class SearchResult:
    """``scores`` (N,) float poison score per row (NaN: never scored); ``windows`` row -> its
    candidate window (C, w, w) for every scored row; ``test_rows`` the held-out images;
    ``history`` one record per round; ``processed`` rows scored."""

    scores: Tensor
    windows: dict[int, Tensor] = field(default_factory=dict)
    test_rows: Tensor | None = None
    history: list[dict] = field(default_factory=list)
    processed: int = 0


def iterative_search(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    load_images: Callable[[list[int]], Tensor],
    clusters: KMeansResult,
    window: int,
    num_test_images: int = 1000,
    samples_per_iteration: int = 2,
    remove_per_iteration: float = 0.25,
    prune_clusters: bool = True,
    cam_layer: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> SearchResult:
    """Poison scores of the training rows by PatchSearch's iterative search (module docstring).

    ``load_images(rows)`` returns uint8 (len(rows), 3, S, S) images at the model's input size.
    With ``prune_clusters=False`` every row of every cluster is scored (slow, for studies)."""
    if samples_per_iteration < 1:
        raise ValueError(f"samples_per_iteration must be positive, got {samples_per_iteration}")
    if not 0.0 < remove_per_iteration < 1.0:
        raise ValueError(f"remove_per_iteration must be in (0, 1), got {remove_per_iteration}")
    generator = torch.Generator().manual_seed(int(seed))
    assignments, centroids = clusters.assignments.cpu(), clusters.centroids.cpu()
    n, k = len(assignments), centroids.shape[0]
    scores = torch.full((n,), float("nan"), dtype=torch.float64)
    result = SearchResult(scores=scores)

    test_rows = select_test_rows(assignments, clusters.distances.cpu(), num_test_images, generator)
    test_images = load_images(test_rows.tolist())
    check_window(window, min(test_images.shape[-2:]))
    test_clusters = assign(embed(model, test_images, preprocessing, batch_size), centroids)[0]
    result.test_rows = test_rows

    # a random queue of rows per cluster: each round pops from the front
    queues: list[list[int]] = [[] for _ in range(k)]
    for row in torch.randperm(n, generator=generator).tolist():
        queues[int(assignments[row])].append(row)
    best = torch.full((k,), float("-inf"), dtype=torch.float64)
    candidates = list(range(k))
    bar = tqdm(total=n if not prune_clusters else None, desc="PatchSearch", unit="img", disable=not progress)
    while candidates:
        rows = []
        for cluster in candidates:
            take = min(samples_per_iteration, len(queues[cluster]))
            rows.extend(queues[cluster][:take])
            del queues[cluster][:take]
        if not rows:
            break
        images = load_images(rows)
        row_clusters = assignments[torch.tensor(rows)]
        windows, _ = find_candidate_windows(
            model, images, preprocessing, centroids, row_clusters, window, cam_layer, batch_size
        )
        for row, cluster, candidate in zip(rows, row_clusters.tolist(), windows, strict=True):
            score = poison_score(
                model,
                preprocessing,
                candidate,
                cluster,
                test_images,
                test_clusters,
                centroids,
                generator,
                batch_size,
            )
            scores[row] = score
            result.windows[row] = candidate.clone()
            best[cluster] = max(float(best[cluster]), score)
            bar.update(1)
        result.processed += len(rows)
        # best first; ties by cluster id so the order does not depend on the set's iteration order
        ranked = sorted(candidates, key=lambda c: (-float(best[c]), c))
        result.history.append(
            {
                "iteration": len(result.history),
                "scored_rows": len(rows),
                "clusters": len(candidates),
                "top_clusters": [[c, float(best[c])] for c in ranked[:5]],
                "max_score": float(best.max()),
            }
        )
        bar.set_postfix(clusters=len(candidates), best=float(best.max()))
        if prune_clusters:
            remove = max(1, int(remove_per_iteration * len(ranked)))
            candidates = ranked[: len(ranked) - remove]
    bar.close()
    return result


# ------------------------------------------------------------------------ pattern control
#: the control pastes of :func:`control_score`: the same pixels rotated by 180 degrees (the pattern
#: is gone, colour, brightness and contrast stay; a horizontal flip alone would not do, SSL views
#: are flipped so a backdoor survives it) and a flat patch of the window's mean colour
CONTROLS = ("rot180", "mean_colour")


def control_windows(window: Tensor) -> dict[str, Tensor]:
    """The :data:`CONTROLS` of a (C, w, w) window, same dtype."""
    mean = window.float().mean(dim=(1, 2), keepdim=True).expand_as(window)
    if not window.dtype.is_floating_point:
        mean = mean.round()
    return {"rot180": window.flip(-1).flip(-2), "mean_colour": mean.to(window.dtype).contiguous()}


def control_score(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    window: Tensor,
    cluster: int,
    test_images: Tensor,
    test_clusters: Tensor,
    centroids: Tensor,
    generator: torch.Generator,
    batch_size: int = 256,
) -> int:
    """The largest poison score of the window's controls (:func:`control_windows`).

    Why: on a small 32 px encoder, a dark or high-contrast natural patch covering 14% of an image
    drags images into a cluster of dark images about as well as a trigger drags them into its own.
    Such a patch acts through its colour and contrast, which its controls keep; a trigger acts
    through its pattern, which they destroy (measured on the R1 encoder: true triggers keep 0-1 of
    ~30 flips, the natural patches of the top-20 keep 13-30)."""
    return max(
        poison_score(
            model,
            preprocessing,
            control,
            cluster,
            test_images,
            test_clusters,
            centroids,
            generator,
            batch_size,
        )
        for control in control_windows(window).values()
    )


@dataclass
class ControlResult:
    """``order``: the re-ranked candidate rows (most specific first); ``specificity`` row -> poison
    score minus control score; ``applied``: False when no candidate is pattern-specific (then the
    order is the search's)."""

    order: list[int]
    specificity: dict[int, float]
    control: dict[int, int]
    applied: bool


def rerank_by_control(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    load_images: Callable[[list[int]], Tensor],
    candidates: list[int],
    search: SearchResult,
    clusters: KMeansResult,
    min_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 256,
) -> ControlResult:
    """Order the ``candidates`` (the top of the search's ranking, scored rows) by their specificity:
    poison score minus the control score of their window on the search's test images.

    Falls back to the search's order when the best specificity is below ``min_fraction`` of the
    best poison score among the candidates: no candidate owes its flips to a pattern (a flat-colour
    trigger, whose controls are as strong as itself; or no trigger at all)."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"control_min_fraction must be in [0, 1], got {min_fraction!r}")
    missing = [r for r in candidates if r not in search.windows]
    if missing:
        raise ValueError(
            f"rows {missing[:5]} were never scored by the search; only scored rows can be re-ranked"
        )
    if not candidates:
        return ControlResult([], {}, {}, False)
    generator = torch.Generator().manual_seed(int(seed))
    centroids = clusters.centroids.cpu()
    test_images = load_images(search.test_rows.tolist())
    test_clusters = assign(embed(model, test_images, preprocessing, batch_size), centroids)[0]
    assignments = clusters.assignments.cpu()
    control, specificity = {}, {}
    for row in candidates:
        control[row] = control_score(
            model,
            preprocessing,
            search.windows[row],
            int(assignments[row]),
            test_images,
            test_clusters,
            centroids,
            generator,
            batch_size,
        )
        specificity[row] = float(search.scores[row]) - control[row]
    best_score = max(float(search.scores[r]) for r in candidates)
    applied = best_score > 0 and max(specificity.values()) >= min_fraction * best_score
    # stable: ties keep the search's order
    order = sorted(candidates, key=lambda r: -specificity[r]) if applied else list(candidates)
    return ControlResult(order, specificity, control, applied)
