"""Flag the training set by matching the found trigger windows against every image.

Once the search has found the trigger (its top-ranked windows), a poisoned image is one that
contains it. The match score of an image is the largest normalised cross-correlation (Pearson
correlation of the mean-centred pixels, over the three channels) between any of the windows and
any same-sized patch of the image: ``conv2d`` with the centred, unit-norm windows as filters,
divided by each patch's own centred norm (from box sums of the image and its square). A pasted
trigger scores near 1 wherever it is; clean patches rarely correlate with a textured pattern.
By default the correlation is weighted by how well the patch's contrast (centred norm) matches
the window's, min(r, 1/r): correlation alone ignores gain, so a faint natural edge would match
the border of a flat-colour trigger as well as the trigger does.

Partial misalignment: a window that the saliency placed a few pixels off the trigger still holds
a shifted piece of it. With ``subwindow`` the windows are cut into ``subwindow``-sized crops (every
``stride`` px) and the best crop counts, so the part of the window that lies on the trigger can
match on its own. Small crops also match natural texture closely, so their scores bunch near the
top: they rank a misaligned trigger's images first, but the z rule below separates them less
well than whole windows (use a larger ``z`` or an explicit threshold with them).

Threshold: the scores of a poisoned set are two modes, clean rows (most of the data) and the
poisons. The rule is robust to the poisons: centre = median of all scores, scale = median minus
the 15.87% quantile (one standard deviation of a normal distribution, measured on the *lower*
half, which the poisons do not reach while they are under half of the data); a row is flagged
when its score exceeds centre + ``z`` x scale (or an explicit ``threshold``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .saliency import check_window

#: the normal distribution's one-sigma quantile below the median
_LOWER_SIGMA_QUANTILE = 0.15865525393145707


@dataclass
class MatchResult:
    """Per row: ``scores`` (best correlation with a window, in [-1, 1]), ``flagged`` and
    ``best_window`` (index of the window that matched best); the ``threshold`` used and the robust
    ``center`` / ``scale`` of the scores it came from."""

    scores: Tensor
    flagged: Tensor
    best_window: Tensor
    threshold: float
    center: float
    scale: float


def match_filters(
    windows: Sequence[Tensor] | Tensor, subwindow: int | None = None, stride: int = 2
) -> Tensor:
    """The windows (uint8 or [0, 1] float (3, w, w)) as centred, unit-norm filters (K, 3, s, s):
    the windows themselves, or with ``subwindow`` every ``subwindow``-sized crop at ``stride`` px
    steps (plus the crop flush with the far edges). Flat windows (no pattern) are dropped."""
    return centred_filters(windows, subwindow, stride)[0]


def centred_filters(
    windows: Sequence[Tensor] | Tensor, subwindow: int | None = None, stride: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`match_filters`, the centred norm (contrast) of each filter before scaling, and the
    index of the window each filter comes from."""
    if len(windows) == 0:
        raise ValueError("no windows to match: the search found no candidate trigger")
    stack = torch.stack([torch.as_tensor(w) for w in windows]) if not isinstance(windows, Tensor) else windows
    if stack.dim() != 4 or stack.shape[-1] != stack.shape[-2]:
        raise ValueError(f"windows must be square (K, C, w, w) images, got shape {tuple(stack.shape)}")
    stack = stack.float() / 255.0 if stack.dtype == torch.uint8 else stack.float()
    size = int(stack.shape[-1])
    source = torch.arange(len(stack))
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"match stride must be a positive integer, got {stride!r}")
    if subwindow is not None:
        if isinstance(subwindow, bool) or not isinstance(subwindow, int) or not 2 <= subwindow <= size:
            raise ValueError(
                f"match subwindow must be an integer from 2 to the window size ({size}) px, got {subwindow!r}"
            )
        offsets = sorted(set(range(0, size - subwindow + 1, stride)) | {size - subwindow})
        stack = torch.cat(
            [stack[:, :, y : y + subwindow, x : x + subwindow] for y in offsets for x in offsets]
        )
        source = source.repeat(len(offsets) ** 2)  # crops are stacked offset-major
    centred = stack - stack.mean(dim=(1, 2, 3), keepdim=True)
    norms = centred.flatten(1).norm(dim=1)
    keep = norms > 1e-6
    if not bool(keep.any()):
        raise ValueError("every window is flat (one colour): there is no pattern to match")
    return centred[keep] / norms[keep, None, None, None], norms[keep], source[keep]


def correlation_map(images: Tensor, filters: Tensor, contrasts: Tensor | None = None) -> Tensor:
    """Normalised cross-correlation (B, K, H - s + 1, W - s + 1) of [0, 1] ``images`` (B, C, H, W)
    with centred unit-norm ``filters`` (K, C, s, s); flat image patches correlate 0.

    With ``contrasts`` (K,: each window's centred norm) the correlation is multiplied by
    min(r, 1 / r), r = the patch's centred norm / the window's: a pasted trigger keeps its pixel
    values and so its contrast, while a faint natural edge that happens to have the same shape
    (e.g. the border of a flat-colour trigger) does not."""
    size = int(filters.shape[-1])
    check_window(size, min(int(images.shape[-1]), int(images.shape[-2])))
    count = images.shape[1] * size * size
    numerator = F.conv2d(images, filters)  # the filters are centred: equals the centred patches' dot
    sums = F.avg_pool2d(images.sum(1, keepdim=True), size, stride=1) * (size * size)
    squares = F.avg_pool2d(images.square().sum(1, keepdim=True), size, stride=1) * (size * size)
    patch_norm = (squares - sums.square() / count).clamp_min(0).sqrt()
    # the small floor keeps near-flat patches (noise only) from scoring high by dividing by ~0
    correlation = numerator / patch_norm.clamp_min(1e-2)
    if contrasts is None:
        return correlation
    ratio = patch_norm / contrasts.view(1, -1, 1, 1).clamp_min(1e-6)
    return correlation * torch.minimum(ratio, 1.0 / ratio.clamp_min(1e-6))


def match_scores(
    load_images: Callable[[list[int]], Tensor],
    num_rows: int,
    windows: Sequence[Tensor] | Tensor,
    subwindow: int | None = None,
    stride: int = 2,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
    contrast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Best correlation of every row with any window (float64 (N,)) and the index of that window
    (int64 (N,), into ``windows``). ``load_images(rows)`` returns uint8 (B, 3, H, W) images."""
    filters, norms, source = centred_filters(windows, subwindow, stride)
    filters, contrasts = filters.to(device), (norms.to(device) if contrast else None)
    scores = torch.empty(num_rows, dtype=torch.float64)
    best = torch.empty(num_rows, dtype=torch.int64)
    with torch.inference_mode():
        for start in tqdm(range(0, num_rows, batch_size), desc="matching windows", disable=not progress):
            rows = list(range(start, min(start + batch_size, num_rows)))
            images = load_images(rows).to(device).float() / 255.0
            peak = correlation_map(images, filters, contrasts).amax(dim=(2, 3))
            value, index = peak.max(1)
            scores[start : start + len(rows)] = value.double().cpu()
            best[start : start + len(rows)] = source[index.cpu()]
    return scores, best


def robust_threshold(scores: Tensor, z: float) -> tuple[float, float, float]:
    """``(threshold, center, scale)``: center = median, scale = median - 15.87% quantile (the
    lower half's sigma, which poisons under half of the data do not move), threshold = center +
    z x scale."""
    if not z > 0:
        raise ValueError(f"match_z must be positive, got {z!r}")
    values = scores[~torch.isnan(scores)].double()
    if len(values) < 2:
        raise ValueError(f"need at least 2 scored rows to set a threshold, got {len(values)}")
    center = float(values.median())
    scale = max(center - float(torch.quantile(values, _LOWER_SIGMA_QUANTILE)), 1e-6)
    return center + z * scale, center, scale


def flag_by_matching(
    load_images: Callable[[list[int]], Tensor],
    num_rows: int,
    windows: Sequence[Tensor] | Tensor,
    z: float = 4.5,
    threshold: float | None = None,
    subwindow: int | None = None,
    stride: int = 2,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
    contrast: bool = True,
) -> MatchResult:
    """Match the windows against every row and flag the rows above the threshold (explicit, or the
    robust rule of :func:`robust_threshold` with ``z``)."""
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"match_threshold must be a correlation in [-1, 1] or None, got {threshold!r}")
    if not z > 0:
        raise ValueError(f"match_z must be positive, got {z!r}")
    scores, best = match_scores(
        load_images, num_rows, windows, subwindow, stride, batch_size, device, progress, contrast
    )
    rule, center, scale = robust_threshold(scores, z)
    cut = rule if threshold is None else float(threshold)
    return MatchResult(scores, scores > cut, best, cut, center, scale)
