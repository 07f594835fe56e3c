"""PatchSearch's poison classifier: a small CNN trained to spot the found trigger, then run on
every training image.

Training data (as the paper): images from the part of the ranking that looks clean (below the
top ``top_fraction`` and above the bottom ``topk``), augmented (random resized crop, flip), half of
them with one of the top-``topk`` candidate windows pasted at a random place (label 1; at the
window's own size by default, the paper resizes it by 0.33-1.33x: ``paste_scale``),
the other half as they are (label 0); colour jitter and grayscale after the paste. SGD with a
cosine schedule (the paper: batch 32, lr 0.01, up to 2000 steps; the defaults here, batch 64, lr
0.05, 300 steps, gave the better classifier on 32 px CIFAR-10, see RESULTS.md).

Early stop (the paper's): every ``eval_interval`` steps the model labels the top-``topk`` ranked
images (as poisons) and the bottom-``topk`` (as clean); training stops once the F1 of that small
set (in whole percent) has not changed over the last ``patience`` evaluations. The set only decides
when to stop; nothing is selected on the rows that are reported. An ensemble of independently
seeded models averages its probabilities; a row is flagged when the mean probability of "poisoned"
exceeds ``threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...backbones import BACKBONES, build_backbone, feature_dim, pooled_features
from ...preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize


@dataclass
class ClassifierSettings:
    """How the poison classifier is built and trained (see ``PatchSearchConfig`` for the help)."""

    topk: int = 20
    top_fraction: float = 0.10
    ensemble_size: int = 5
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 0.05
    weight_decay: float = 1e-4
    paste_scale: tuple[float, float] = (1.0, 1.0)
    threshold: float = 0.5
    backbone: str = "resnet10-cifar"
    width: int | None = 16
    stem_stride: int | None = 2
    eval_interval: int = 20
    patience: int = 10

    def validate(self, num_rows: int) -> None:
        if self.topk < 1:
            raise ValueError(f"classifier_topk must be positive, got {self.topk}")
        if 2 * self.topk >= num_rows:
            raise ValueError(
                f"classifier_topk={self.topk} needs more than {2 * self.topk} rows (top and bottom sets); "
                f"the dataset has {num_rows}"
            )
        if not 0.0 <= self.top_fraction < 1.0:
            raise ValueError(f"classifier_top_fraction must be in [0, 1), got {self.top_fraction}")
        for name in ("ensemble_size", "steps", "batch_size", "eval_interval", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"classifier_{name} must be positive, got {getattr(self, name)}")
        low, high = self.paste_scale
        if not 0.0 < low <= high:
            raise ValueError(
                f"classifier_paste_scale must be (low, high) with 0 < low <= high, got {self.paste_scale}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"classifier_threshold must be in (0, 1), got {self.threshold}")
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"classifier_backbone must be a preset, one of {sorted(BACKBONES)}; got {self.backbone!r}"
            )


class PoisonClassifier(nn.Module):
    """A preset backbone (random init) + a 2-way linear head on [0, 1] images."""

    def __init__(self, settings: ClassifierSettings, image_size: int) -> None:
        super().__init__()
        resnet = "resnet" in settings.backbone
        self.backbone = build_backbone(
            settings.backbone,
            image_size=image_size,
            width=settings.width if resnet else None,
            stem_stride=settings.stem_stride if settings.backbone.endswith("-cifar") else None,
        )
        self.head = nn.Linear(feature_dim(self.backbone.config), 2)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(pooled_features(self.backbone, normalize(images, IMAGENET_MEAN, IMAGENET_STD)))


def paste_resized(
    images: Tensor, windows: Sequence[Tensor], scale: tuple[float, float], generator: torch.Generator
) -> Tensor:
    """Each [0, 1] image gets a random one of ``windows`` resized by a random factor in ``scale``
    (at least 2 px, at most the image) at a random place; in place, returns ``images``."""
    height, width = images.shape[-2:]
    for index in range(images.shape[0]):
        window = windows[int(torch.randint(len(windows), (1,), generator=generator))]
        factor = scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=generator))
        side = int(min(height, width, max(2, round(window.shape[-1] * factor))))
        patch = F.interpolate(
            window[None].float() / 255.0, size=(side, side), mode="bilinear", antialias=True
        )[0]
        y = int(torch.randint(height - side + 1, (1,), generator=generator))
        x = int(torch.randint(width - side + 1, (1,), generator=generator))
        images[index, :, y : y + side, x : x + side] = patch.clamp(0, 1)
    return images


@dataclass
class ClassifierResult:
    """The ensemble's mean probability of "poisoned" per row, the flags, and diagnostics."""

    probabilities: Tensor
    flagged: Tensor
    validation_accuracy: list[float]
    final_loss: list[float]
    steps_run: list[int] = field(default_factory=list)
    validation_f1: list[list[float]] = field(default_factory=list)


def f1_score(predicted: Tensor, labels: Tensor) -> float:
    """F1 of the positive class (0 when nothing is predicted positive or there is no positive)."""
    predicted, labels = predicted.bool(), labels.bool()
    hits = int((predicted & labels).sum())
    if hits == 0:
        return 0.0
    precision, recall = hits / int(predicted.sum()), hits / int(labels.sum())
    return 2 * precision * recall / (precision + recall)


def should_stop(history: Sequence[float], patience: int) -> bool:
    """The paper's stop: more than ``patience`` evaluations, and the last ``patience`` F1 values
    are equal in whole percent."""
    if len(history) <= patience:
        return False
    return len({int(value * 100) for value in history[-patience:]}) == 1


def train_and_flag(
    load_images: Callable[[list[int]], Tensor],
    ranking: Tensor,
    top_windows: Sequence[Tensor],
    settings: ClassifierSettings,
    seed: int = 0,
    device: torch.device | str = "cpu",
    inference_batch_size: int = 256,
    progress: bool = True,
) -> ClassifierResult:
    """Train the ensemble and flag every row.

    ``ranking``: all row indices, most suspicious first; ``top_windows``: the candidate windows
    (uint8 (3, w, w)) of the top-ranked rows; ``load_images(rows)`` returns uint8 images."""
    n = len(ranking)
    settings.validate(n)
    if not top_windows:
        raise ValueError("no candidate windows to train the poison classifier on")
    pool = ranking[int(settings.top_fraction * n) : n - settings.topk]
    if len(pool) < settings.batch_size:
        raise ValueError(
            f"only {len(pool)} rows left to train the poison classifier on; fewer than its batch of {settings.batch_size}"
        )
    val_rows = torch.cat([ranking[: settings.topk], ranking[-settings.topk :]])
    val_labels = torch.cat([torch.ones(settings.topk), torch.zeros(settings.topk)]).long()
    val_images = load_images(val_rows.tolist())
    image_size = int(val_images.shape[-1])
    geometric = nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=(0.2, 1.0)), K.RandomHorizontalFlip()
    )
    photometric = nn.Sequential(K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2))

    def validate(model: nn.Module) -> Tensor:
        model.eval()
        with torch.inference_mode():
            predicted = model(val_images.to(device).float() / 255.0).argmax(1).cpu()
        return predicted

    models, accuracies, losses, steps_run, f1_histories = [], [], [], [], []
    for member in range(settings.ensemble_size):
        # kornia and the weight init draw from torch's global RNG: seed it, restore it afterwards
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 1000 + member)
            generator = torch.Generator().manual_seed(int(seed) * 1000 + member)
            model = PoisonClassifier(settings, image_size).to(device)
            optimizer = torch.optim.SGD(
                model.parameters(),
                lr=settings.learning_rate,
                momentum=0.9,
                weight_decay=settings.weight_decay,
            )
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
            model.train()
            bar = tqdm(
                range(settings.steps),
                desc=f"poison classifier {member + 1}/{settings.ensemble_size}",
                disable=not progress,
            )
            running, history, done = None, [], 0
            for step in bar:
                rows = pool[torch.randint(len(pool), (settings.batch_size,), generator=generator)]
                images = geometric(load_images(rows.tolist()).float().div_(255.0))
                labels = (torch.rand(settings.batch_size, generator=generator) < 0.5).long()
                positives = labels.nonzero().flatten()
                if len(positives):
                    images[positives] = paste_resized(
                        images[positives], top_windows, settings.paste_scale, generator
                    )
                images = photometric(images)
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                value = float(loss.detach())
                running = value if running is None else 0.9 * running + 0.1 * value
                done = step + 1
                if done % settings.eval_interval == 0:
                    history.append(f1_score(validate(model), val_labels))
                    model.train()
                    bar.set_postfix(loss=running, f1=history[-1])
                    if should_stop(history, settings.patience):
                        break
        bar.close()
        predicted = validate(model)
        accuracies.append(float((predicted == val_labels).float().mean()))
        losses.append(float(running))
        steps_run.append(done)
        f1_histories.append(history)
        models.append(model)

    probabilities = torch.zeros(n, dtype=torch.float64)
    rows = torch.arange(n)
    with torch.inference_mode():
        for start in tqdm(range(0, n, inference_batch_size), desc="flagging", disable=not progress):
            chunk = rows[start : start + inference_batch_size]
            images = load_images(chunk.tolist()).to(device).float() / 255.0
            mean = torch.stack([m(images).softmax(1)[:, 1] for m in models]).mean(0)
            probabilities[chunk] = mean.double().cpu()
    return ClassifierResult(
        probabilities, probabilities > settings.threshold, accuracies, losses, steps_run, f1_histories
    )
