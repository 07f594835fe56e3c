"""PatchSearch (Tejankar et al., CVPR 2023): find the poisoned training images with the backdoored
encoder itself, then filter them out.

Steps (one module each):
1. embed the training set with the encoder (cached) and cluster it (:mod:`.clustering`);
2. per cluster, the candidate trigger of an image is the window where the Grad-CAM of its
   similarity to the cluster centre is largest (:mod:`.saliency`);
3. its poison score counts held-out images of other clusters that move into the cluster when the
   window is pasted on them; an iterative search drops low-scoring clusters (:mod:`.scoring`);
4. the training set is flagged: by default every image is matched against the top-ranked windows
   (normalised cross-correlation, robust threshold: :mod:`.matching`); the paper's way, a small
   poison classifier trained on pastes of the top-ranked windows (:mod:`.classifier`), is
   ``flag_mode="classifier"`` (``"union"``: rows that either flags);
5. the flagged rows are removed and the rest is written as a dataset variant (:mod:`.filtering`);
   detection quality is measured against ``is_poisoned`` (:mod:`.metrics`).

``run_patchsearch(encoder, dataset, PatchSearchConfig(...))`` does 1-4 (+ metrics) on one split;
``run_defense(PatchSearchArguments(...), PatchSearchConfig(...))`` is the command line's job:
load, run, save the report and write the filtered variant (``examples/defend.py --method
patchsearch``). Retraining is ``examples/pretrain.py`` on the filtered variant (``--dataset
<output_dir>/filtered --dataset_config <name>``), evaluation ``examples/evaluate.py`` on it.

The paper retrains on the filtered set with i-CutMix: ``examples/pretrain.py --dataset
<output_dir>/filtered --dataset_config <name> --method mocov2 --method_config '{"icutmix_alpha":
1.0}'`` (README, step 5). It lives in the SSL methods, not here, because it is not an image
augmentation: the query view is CutMixed with another image of the batch and the *loss targets*
are mixed too (lam x InfoNCE to its own key + (1 - lam) x InfoNCE to the partner's key).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel

from ...backbones import check_image_size
from ...data import find_image_column
from ...preprocessing import Preprocessing, decode_image, images_to_batch
from .classifier import ClassifierSettings, train_and_flag
from .clustering import KMeansResult, kmeans
from .matching import MatchResult, flag_by_matching
from .metrics import auroc, detection_metrics, ranking_order, topk_precision
from .saliency import check_window
from .scoring import ControlResult, SearchResult, iterative_search, rerank_by_control

REPORT_NAME = "patchsearch.json"
FLAG_MODES = ("match", "classifier", "union")
SCORES_NAME = "patchsearch_scores.safetensors"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PatchSearchConfig:
    """Every setting of a PatchSearch run; recorded in full in its report and card. Defaults are for
    32 px CIFAR images; the paper's ImageNet-100 values (224 px) are in each help text."""

    num_clusters: int = _help("k of k-means (paper: 1000 on ImageNet-100; ~10 per class here)", default=100)
    kmeans_iterations: int = _help("Lloyd iterations of k-means (paper: 20)", default=20)
    window_size: int = _help(
        "side of the candidate trigger window in px of the model input, about the trigger's size "
        "(paper: 60 at 224 px for 50 px triggers)",
        default=10,
    )
    cam_layer: int | None = _help(
        "index into the encoder's hidden_states for Grad-CAM (default: for a CNN the deepest stage whose "
        "cells are at most half the window, e.g. the 8x8 stage of a stride-2-stem ResNet at 32 px; the "
        "input of the last block for a ViT. The paper: the last stage / block)",
        default=None,
    )
    num_test_images: int = _help(
        "held-out images a candidate is pasted on: the nearest ones to every centroid (paper: 1000; the "
        "search's cost is proportional to it and does not grow with the dataset)",
        default=500,
    )
    samples_per_iteration: int = _help("images scored per remaining cluster and round (paper: 2)", default=2)
    remove_per_iteration: float = _help("fraction of clusters dropped per round (paper: 0.25)", default=0.25)
    prune_clusters: bool = _help("iterative search; false scores every image (slow)", default=True)
    flag_mode: str = _help(
        "how the training set is flagged: match (every image against the top-ranked windows by normalised "
        "cross-correlation; on R1 10k: recall 1.0 with no clean row removed, AUROC 1.0), classifier (the paper's poison "
        "classifier ensemble; with same-size pastes recall 0.93 at 0.7 percent clean), union (rows that either flags)",
        default="match",
    )
    match_windows: int = _help("top-ranked candidate windows matched against the images", default=20)
    match_z: float = _help(
        "flag rows whose match score exceeds median + z x (median - 15.87 percent quantile) of all scores (a robust "
        "sigma from the lower half, which the poisons do not reach); R1 10k: clean max at 3.0, poisons >= 5.5 "
        "(contrast on)",
        default=4.5,
    )
    match_contrast: bool = _help(
        "weight the correlation by min(r, 1/r), r = patch contrast / window contrast (centred norms): a pasted "
        "trigger keeps its contrast; without it a faint natural edge matches a flat-colour trigger's border",
        default=True,
    )
    match_threshold: float | None = _help(
        "an explicit correlation threshold in [-1, 1] instead of the z rule", default=None
    )
    match_subwindow: int | None = _help(
        "match every crop of this side (px) of each window instead of the whole window, so the part of a "
        "misaligned window that lies on the trigger matches alone (default: whole windows)",
        default=None,
    )
    match_stride: int = _help("step (px) between the crops of match_subwindow", default=2)
    classifier_topk: int = _help(
        "top-ranked windows pasted to train the poison classifier, and the size of its top/bottom "
        "validation sets (paper: 20)",
        default=20,
    )
    classifier_top_fraction: float = _help(
        "most suspicious fraction of the ranking kept out of the classifier's training pool (paper: 0.1)",
        default=0.10,
    )
    classifier_ensemble: int = _help("poison classifiers averaged (paper: 5)", default=5)
    classifier_steps: int = _help(
        "most SGD steps per classifier (paper: 2000 at batch 32, lr 0.01; on 32 px CIFAR that budget gave a "
        "worse classifier, AUROC 0.89 vs 0.96 for 300 steps at batch 64, lr 0.05: RESULTS.md)",
        default=300,
    )
    classifier_batch_size: int = _help("classifier batch size (paper: 32)", default=64)
    classifier_learning_rate: float = _help("SGD learning rate, cosine schedule (paper: 0.01)", default=0.05)
    classifier_eval_interval: int = _help(
        "steps between the early-stop checks: F1 of the top-k ranked (as poisons) vs bottom-k (as clean) "
        "images (paper: 20)",
        default=20,
    )
    classifier_patience: int = _help(
        "stop once that F1 (whole percent) is the same over this many checks (paper: 10)", default=10
    )
    classifier_paste_scale: list[float] = _help(
        "low high: a pasted window is resized by a random factor in this range (paper: 20-80 px for a "
        "60 px window, 0.33 1.33). Default 1 1, the window's own size (about the trigger's): on R1 10k, one "
        "classifier's AUROC 0.958 -> 0.986, five: recall 0.929 at 0.7 percent clean removed (RESULTS.md)",
        default_factory=lambda: [1.0, 1.0],
    )
    classifier_threshold: float = _help(
        "flag rows whose mean probability of poison exceeds this", default=0.5
    )
    classifier_backbone: str = _help(
        "backbone preset of the poison classifier (paper: ResNet with [1, 1, 1, 1] blocks)",
        default="resnet10-cifar",
    )
    classifier_width: int | None = _help("channels of the classifier ResNet's first stage", default=16)
    classifier_stem_stride: int | None = _help(
        "stride of a -cifar classifier stem (1 or 2; 2 is 3-7x faster on CPU)", default=2
    )
    control_candidates: int = _help(
        "top-ranked scored rows re-ranked by pattern specificity before the classifier takes its top-k: poison "
        "score minus the best score of two controls of the window (rotated 180 degrees; flat mean colour), which "
        "keep a natural patch's colour and contrast but not a trigger's pattern. 0: off (the paper's ranking)",
        default=100,
    )
    control_min_fraction: float = _help(
        "keep the search's ranking when the best specificity is below this fraction of the best poison score "
        "(no candidate owes its flips to a pattern, e.g. a flat-colour trigger)",
        default=0.5,
    )
    max_rows: int | None = _help("run on a seeded random subset of this many rows (None: all)", default=None)
    image_column: str | None = _help("image column (default: detected)", default=None)
    batch_size: int = _help("batch size of the encoder's forward passes", default=256)
    device: str | None = _help("cpu, cuda, cuda:1 ... (default: cuda if available)", default=None)
    feature_cache_dir: str | None = _help("cache of the encoder's features (safetensors)", default=None)
    seed: int = _help("one seed for the subset, k-means, the search and the classifiers", default=0)

    def validate(self) -> PatchSearchConfig:
        """Raise ``ValueError`` naming the first bad value."""
        positive = (
            "num_clusters",
            "kmeans_iterations",
            "window_size",
            "num_test_images",
            "samples_per_iteration",
            "batch_size",
            "classifier_eval_interval",
            "classifier_patience",
            "match_windows",
            "match_stride",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be positive or None, got {self.max_rows!r}")
        if not 0.0 < self.remove_per_iteration < 1.0:
            raise ValueError(f"remove_per_iteration must be in (0, 1), got {self.remove_per_iteration!r}")
        if len(self.classifier_paste_scale) != 2:
            raise ValueError(
                f"classifier_paste_scale must be two numbers (low high), got {self.classifier_paste_scale!r}"
            )
        if isinstance(self.control_candidates, bool) or not isinstance(self.control_candidates, int):
            raise ValueError(f"control_candidates must be an integer >= 0, got {self.control_candidates!r}")
        if self.control_candidates < 0:
            raise ValueError(f"control_candidates must be an integer >= 0, got {self.control_candidates!r}")
        if not 0.0 <= self.control_min_fraction <= 1.0:
            raise ValueError(f"control_min_fraction must be in [0, 1], got {self.control_min_fraction!r}")
        if self.flag_mode not in FLAG_MODES:
            raise ValueError(f"flag_mode must be one of {FLAG_MODES}, got {self.flag_mode!r}")
        if not self.match_z > 0:
            raise ValueError(f"match_z must be positive, got {self.match_z!r}")
        if self.match_threshold is not None and not -1.0 <= self.match_threshold <= 1.0:
            raise ValueError(f"match_threshold must be in [-1, 1] or None, got {self.match_threshold!r}")
        if self.match_subwindow is not None and not 2 <= self.match_subwindow <= self.window_size:
            raise ValueError(
                f"match_subwindow must be from 2 to window_size ({self.window_size}) px or None, "
                f"got {self.match_subwindow!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self

    def classifier_settings(self) -> ClassifierSettings:
        return ClassifierSettings(
            topk=self.classifier_topk,
            top_fraction=self.classifier_top_fraction,
            ensemble_size=self.classifier_ensemble,
            steps=self.classifier_steps,
            batch_size=self.classifier_batch_size,
            learning_rate=self.classifier_learning_rate,
            paste_scale=(float(self.classifier_paste_scale[0]), float(self.classifier_paste_scale[1])),
            threshold=self.classifier_threshold,
            backbone=self.classifier_backbone,
            width=self.classifier_width,
            stem_stride=self.classifier_stem_stride,
            eval_interval=self.classifier_eval_interval,
            patience=self.classifier_patience,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PatchSearchResult:
    """What a run found. Per row of the split (``rows``: indices into the given dataset, a subset
    with ``max_rows``): ``scores`` (poison score, NaN = never scored), ``probabilities`` (the
    classifier ensemble's; NaN when it did not run), ``match_scores`` (best correlation with a top
    window; NaN when matching did not run), ``flagged``, ``clusters``; plus ``metrics`` against ``is_poisoned``
    (empty without it), the ``top_windows`` (uint8, most suspicious first), the search history,
    timings (s) and the config."""

    rows: Tensor
    scores: Tensor
    probabilities: Tensor
    flagged: Tensor
    clusters: Tensor
    top_windows: Tensor
    metrics: dict[str, Any]
    history: list[dict]
    timings: dict[str, float]
    diagnostics: dict[str, Any]
    config: PatchSearchConfig
    match_scores: Tensor | None = None

    def report(self) -> dict[str, Any]:
        """A JSON-able summary (no per-row arrays)."""
        return {
            "method": "patchsearch",
            "config": self.config.to_dict(),
            "rows": int(len(self.rows)),
            "flagged": int(self.flagged.sum()),
            "metrics": self.metrics,
            "timings_s": self.timings,
            "diagnostics": self.diagnostics,
            "search_history": self.history,
        }

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``patchsearch.json``, the per-row arrays (safetensors) and ``top_windows.png``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / REPORT_NAME, "w") as handle:
            json.dump(_jsonable(self.report()), handle, indent=2)
        save_file(
            {
                "rows": self.rows.contiguous(),
                "scores": self.scores.contiguous(),
                "probabilities": self.probabilities.contiguous(),
                "match_scores": (
                    self.match_scores
                    if self.match_scores is not None
                    else torch.full_like(self.scores, float("nan"))
                ).contiguous(),
                "flagged": self.flagged.to(torch.uint8).contiguous(),
                "clusters": self.clusters.contiguous(),
                "top_windows": self.top_windows.contiguous(),
            },
            str(out / SCORES_NAME),
        )
        if len(self.top_windows):
            _save_window_grid(self.top_windows, out / "top_windows.png")
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _save_window_grid(windows: Tensor, path: Path, columns: int = 10) -> None:
    from PIL import Image

    count, _, size, _ = windows.shape
    rows = (count + columns - 1) // columns
    scale = max(1, 48 // size)
    grid = torch.full((3, rows * (size + 1), columns * (size + 1)), 255, dtype=torch.uint8)
    for index, window in enumerate(windows):
        r, c = divmod(index, columns)
        grid[:, r * (size + 1) : r * (size + 1) + size, c * (size + 1) : c * (size + 1) + size] = window
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


class ImageSizeMismatchError(ValueError):
    """The data's images do not have the size the encoder takes."""


def check_data_matches_model(
    image: Any, preprocessing: Preprocessing, model: PreTrainedModel | None = None
) -> None:
    """Raise unless the encoder's preprocessing fits images like ``image`` (a dataset cell).

    Without a resize step (32 px protocols) the images must already have the model's size: a
    centre crop would cut the border (and maybe the trigger) and a smaller image would be
    stretched. With a resize step (224 px protocols), images smaller than the crop are refused."""
    width, height = decode_image(image).size
    size = preprocessing.image_size
    if model is not None and getattr(model, "config", None) is not None:
        check_image_size(model.config, size)
    if preprocessing.resize_size is None and (width, height) != (size, size):
        raise ImageSizeMismatchError(
            f"the encoder takes {size}x{size} px images (no resize step) but the data has {width}x{height} px "
            "images: use an encoder trained at the data's size, or data at the encoder's size"
        )
    if preprocessing.resize_size is not None and min(width, height) < size:
        raise ImageSizeMismatchError(
            f"the encoder takes {size} px crops of images resized to {preprocessing.resize_size} px but the data "
            f"has {width}x{height} px images, smaller than the crop: use an encoder trained at the data's size"
        )


class _ImageLoader:
    """``loader(rows)`` -> uint8 (B, 3, S, S) images of those rows at the model's input size."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, preprocessing: Preprocessing) -> None:
        self.raw = dataset.select_columns([image_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.column, self.preprocessing = image_column, preprocessing

    def __call__(self, rows: list[int]) -> Tensor:
        if not rows:
            size = self.preprocessing.image_size
            return torch.zeros(0, 3, size, size, dtype=torch.uint8)
        values = self.raw[list(rows)][self.column]
        return images_to_batch(values, self.preprocessing, rows=list(rows))


def _leave_inference_mode(model: torch.nn.Module) -> None:
    """Weights that a move under ``torch.inference_mode`` (feature extraction) turned into
    inference tensors cannot take part in Grad-CAM's autograd: replace them by normal copies."""
    for module in model.modules():
        for name, tensor in list(module._parameters.items()):
            if tensor is not None and tensor.is_inference():
                module._parameters[name] = torch.nn.Parameter(
                    tensor.clone(), requires_grad=tensor.requires_grad
                )
        for name, tensor in list(module._buffers.items()):
            if tensor is not None and tensor.is_inference():
                module._buffers[name] = tensor.clone()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_patchsearch(
    encoder: str | os.PathLike | tuple[PreTrainedModel, Preprocessing],
    dataset: datasets.Dataset,
    config: PatchSearchConfig | None = None,
    progress: bool = True,
) -> PatchSearchResult:
    """Rank and flag the rows of ``dataset`` (one split) with PatchSearch.

    ``encoder``: a model folder / Hub id (anything :func:`hf_sslbd.modeling.load_encoder` takes) or
    a ``(backbone, preprocessing)`` pair. With an ``is_poisoned`` column, ``metrics`` holds the
    detection quality (removal precision / recall / clean fraction removed, top-k precision and
    AUROC of the poison scores and of the classifier's probabilities)."""
    from ...evaluation.features import extract_features, resolve_device

    config = (config or PatchSearchConfig()).validate()
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"run_patchsearch takes one split (datasets.Dataset), got {type(dataset).__name__}")
    if isinstance(encoder, tuple):
        model, preprocessing = encoder
    else:
        from ...modeling import load_encoder

        model, preprocessing = load_encoder(encoder)
    image_column = find_image_column(dataset.features, config.image_column)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    rows = torch.arange(len(dataset))
    if config.max_rows is not None and config.max_rows < len(dataset):
        generator = torch.Generator().manual_seed(config.seed)
        rows = torch.randperm(len(dataset), generator=generator)[: config.max_rows].sort().values
        dataset = dataset.select(rows.tolist())
    n = len(dataset)
    if config.num_clusters > n:
        raise ValueError(
            f"num_clusters={config.num_clusters} is larger than the dataset ({n} rows); use at most {n}"
        )
    check_window(config.window_size, preprocessing.image_size)
    loader = _ImageLoader(dataset, image_column, preprocessing)
    check_data_matches_model(loader.raw[0][image_column], preprocessing, model)

    device = resolve_device(config.device)
    model = model.eval().to(device)
    features = extract_features(
        model,
        preprocessing,
        dataset,
        image_column=image_column,
        batch_size=config.batch_size,
        device=device,
        cache_dir=config.feature_cache_dir,
        channels_last=False,
        progress=progress,
        description="PatchSearch features",
    ).features
    _leave_inference_mode(model)
    timings["features"] = time.perf_counter() - start

    mark = time.perf_counter()
    clusters: KMeansResult = kmeans(
        F.normalize(features.float(), dim=1), config.num_clusters, config.kmeans_iterations, seed=config.seed
    )
    timings["kmeans"] = time.perf_counter() - mark

    mark = time.perf_counter()
    search: SearchResult = iterative_search(
        model,
        preprocessing,
        loader,
        clusters,
        window=config.window_size,
        num_test_images=config.num_test_images,
        samples_per_iteration=config.samples_per_iteration,
        remove_per_iteration=config.remove_per_iteration,
        prune_clusters=config.prune_clusters,
        cam_layer=config.cam_layer,
        seed=config.seed + 1,
        batch_size=config.batch_size,
        progress=progress,
    )
    timings["search"] = time.perf_counter() - mark

    settings = config.classifier_settings()
    ranking = torch.from_numpy(ranking_order(search.scores.numpy(), seed=config.seed + 2).copy())
    mark = time.perf_counter()
    control: ControlResult | None = None
    if config.control_candidates > 0:
        head = [int(r) for r in ranking[: config.control_candidates] if int(r) in search.windows]
        control = rerank_by_control(
            model,
            preprocessing,
            loader,
            head,
            search,
            clusters,
            min_fraction=config.control_min_fraction,
            seed=config.seed + 4,
            batch_size=config.batch_size,
        )
        # the scored head is a prefix of the ranking (unscored rows rank last): reorder it in place
        ranking[: len(head)] = torch.tensor(control.order, dtype=ranking.dtype)
    timings["control"] = time.perf_counter() - mark
    use_classifier = config.flag_mode in ("classifier", "union")
    use_match = config.flag_mode in ("match", "union")
    needed = max(settings.topk if use_classifier else 0, config.match_windows if use_match else 0)
    top_rows = [int(r) for r in ranking[:needed] if int(r) in search.windows]
    if len(top_rows) < needed:
        knob = "classifier_topk" if use_classifier and settings.topk == needed else "match_windows"
        raise ValueError(
            f"the search scored only {search.processed} rows, fewer than {knob}={needed}: "
            f"lower {knob} or num_clusters, or raise samples_per_iteration"
        )
    top_windows = torch.stack([search.windows[r] for r in top_rows])

    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    flagged = torch.zeros(n, dtype=torch.bool)
    classified = matched = None
    if use_classifier:
        mark = time.perf_counter()
        classified = train_and_flag(
            loader,
            ranking,
            list(top_windows[: settings.topk]),
            settings,
            seed=config.seed + 3,
            device=device,
            progress=progress,
        )
        flagged |= classified.flagged
        timings["classifier"] = time.perf_counter() - mark
    if use_match:
        mark = time.perf_counter()
        matched = flag_by_matching(
            loader,
            n,
            top_windows[: config.match_windows],
            z=config.match_z,
            threshold=config.match_threshold,
            subwindow=config.match_subwindow,
            stride=config.match_stride,
            contrast=config.match_contrast,
            batch_size=config.batch_size,
            device=device,
            progress=progress,
        )
        flagged |= matched.flagged
        timings["matching"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start

    metrics: dict[str, Any] = {}
    if "is_poisoned" in dataset.column_names:
        truth = np.asarray(
            dataset.select_columns(["is_poisoned"]).with_format("numpy")[:]["is_poisoned"], bool
        )
        metrics = detection_metrics(truth, flagged.numpy(), search.scores.numpy())
        if classified is not None:
            metrics["classifier_auroc"] = auroc(truth, classified.probabilities.numpy())
            if matched is not None:
                metrics["classifier"] = detection_metrics(truth, classified.flagged.numpy(), None)
        if matched is not None:
            metrics["match_auroc"] = auroc(truth, matched.scores.numpy())
            if classified is not None:
                metrics["match"] = detection_metrics(truth, matched.flagged.numpy(), None)
        scored = ~torch.isnan(search.scores)
        metrics["scored_rows"] = int(scored.sum())
        metrics["scored_poisons"] = int(truth[scored.numpy()].sum())
        metrics["top_windows_from_poisons"] = int(truth[top_rows].sum())
        # the ranking the classifier was trained from (search scores, head re-ranked by the control)
        final = np.empty(n)
        final[ranking.numpy()] = np.arange(n, 0, -1)
        metrics["final_ranking_topk_precision"] = {
            str(k): topk_precision(truth, final, k) for k in (5, 10, 20, 50, 100, 500) if k <= n
        }
    diagnostics = {
        "kmeans_iterations": clusters.iterations,
        "kmeans_inertia": clusters.inertia,
        "scored_rows": search.processed,
        "test_images": int(len(search.test_rows)),
        "flag_mode": config.flag_mode,
        "classifier_validation_accuracy": None if classified is None else classified.validation_accuracy,
        "classifier_final_loss": None if classified is None else classified.final_loss,
        "classifier_steps_run": None if classified is None else classified.steps_run,
        "classifier_validation_f1": None if classified is None else classified.validation_f1,
        "match": None if matched is None else _match_summary(matched),
        "control_applied": None if control is None else control.applied,
        "control_top": None
        if control is None
        else [
            {"row": r, "score": float(search.scores[r]), "control": control.control[r]}
            for r in control.order[: settings.topk]
        ],
        "peak_rss_mb": _peak_rss_mb(),
    }
    return PatchSearchResult(
        rows=rows,
        scores=search.scores,
        probabilities=nan if classified is None else classified.probabilities,
        flagged=flagged,
        clusters=clusters.assignments,
        top_windows=top_windows,
        metrics=metrics,
        history=search.history,
        timings=timings,
        diagnostics=diagnostics,
        config=config,
        match_scores=None if matched is None else matched.scores,
    )


def _match_summary(matched: MatchResult) -> dict[str, Any]:
    scores = matched.scores
    return {
        "threshold": matched.threshold,
        "center": matched.center,
        "scale": matched.scale,
        "flagged": int(matched.flagged.sum()),
        "score_quantiles": {
            str(q): float(torch.quantile(scores, q)) for q in (0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
        },
        "flagged_min_score_z": (
            (float(scores[matched.flagged].min()) - matched.center) / matched.scale
            if bool(matched.flagged.any())
            else None
        ),
        "unflagged_max_score_z": (
            (float(scores[~matched.flagged].max()) - matched.center) / matched.scale
            if bool((~matched.flagged).any())
            else None
        ),
    }


@dataclass
class PatchSearchArguments:
    """Inputs and outputs of a PatchSearch defense run (the command line's part)."""

    model: str = _help("the backdoored encoder: SSL checkpoint / backbone folder or Hub id")
    dataset: str = _help("the (poisoned) training data: folder or Hub id")
    output_dir: str = _help("where the report, scores and the filtered variant go")
    dataset_config: str | None = _help(
        "dataset configuration, e.g. the poisoned variant's name", default=None
    )
    split: str = _help("the split to filter", default="train")
    variant_name: str | None = _help(
        "name of the filtered variant (default: <dataset_config>_patchsearch-seed-<seed>)", default=None
    )
    write_variant: bool = _help(
        "write the filtered dataset as a variant under output_dir/filtered", default=True
    )
    overwrite: bool = _help("replace an existing filtered variant of the same name", default=False)


def run_defense(
    arguments: PatchSearchArguments, config: PatchSearchConfig, progress: bool = True
) -> dict[str, Any]:
    """Load the data, run PatchSearch, save the report (``output_dir/patchsearch.json`` ...) and the
    filtered variant (``output_dir/filtered/<name>``). Returns the report plus the paths."""
    from ...data import load_image_dataset
    from ...variants import VariantNotFoundError, load_variant_info
    from .filtering import write_filtered_variant

    loaded = load_image_dataset(arguments.dataset, arguments.dataset_config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({arguments.split: loaded})
    if arguments.split not in loaded:
        raise ValueError(f"no split {arguments.split!r} in {arguments.dataset}; it has {list(loaded)}")
    result = run_patchsearch(arguments.model, loaded[arguments.split], config, progress=progress)
    out = result.save(arguments.output_dir)
    summary = result.report()
    summary.pop("search_history")  # in the report file; too long for a console summary
    summary["report"] = str(out / REPORT_NAME)
    if arguments.write_variant:
        try:
            record = load_variant_info(arguments.dataset, arguments.dataset_config or "")
        except (VariantNotFoundError, FileNotFoundError, OSError, ValueError):
            record = None  # not a variant made by hf_sslbd: the card says less
        splits = {"train": loaded[arguments.split].select(result.rows.tolist())}
        splits.update({s: d for s, d in loaded.items() if s in ("test", "test_patched")})
        name = (
            arguments.variant_name or f"{arguments.dataset_config or 'data'}_patchsearch-seed-{config.seed}"
        )
        defense = {
            "method": "patchsearch",
            "source": {
                "dataset": arguments.dataset,
                "config": arguments.dataset_config,
                "split": arguments.split,
            },
            "detection": _jsonable(result.metrics) or None,
            "config": config.to_dict(),
        }
        folder = write_filtered_variant(
            datasets.DatasetDict(splits),
            result.flagged.numpy(),
            out / "filtered",
            name,
            defense,
            source_record=record,
            source_root=arguments.dataset if os.path.isdir(arguments.dataset) else None,
            overwrite=arguments.overwrite,
        )
        summary["filtered_variant"] = {"dataset": str(folder.parent), "config": name}
    return summary


__all__ = [
    "ImageSizeMismatchError",
    "PatchSearchArguments",
    "PatchSearchConfig",
    "PatchSearchResult",
    "check_data_matches_model",
    "run_defense",
    "run_patchsearch",
]
