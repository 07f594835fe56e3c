"""lightly's side of ``bench_vs_lightly.py``: one (method, setting) row, timed in this process.

Runs with lightly's own interpreter (lightly needs torchvision, which the main environment must
not have), e.g. ``/work/venvs/lightly/bin/python benchmarks/lightly_side.py --method byol ...``;
``bench_vs_lightly.py`` starts it and reads the one JSON line it prints. It imports nothing from
hf_sslbd. The models follow lightly's own examples (``examples/pytorch/*.py``): lightly's heads,
losses, ``update_momentum``, ``cosine_schedule``, ``batch_shuffle``, one backbone call per view,
and lightly's torchvision transforms applied per image in the DataLoader, as lightly runs them.
Head widths are set to hf_sslbd's defaults so that both sides compute the same network.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import resource
import sys
import time

import torch
import torchvision
from bench_pretrain import matmul_flops_per_second  # same directory; stdlib + torch only
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import heads
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    MoCoV2Transform,
    SimCLRTransform,
    SimSiamTransform,
)
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import nn


def rss_mb(peak: bool) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def backbone_for(setting: str) -> tuple[nn.Module, int]:
    """torchvision backbones returning pooled features, as in lightly's examples."""
    if setting == "cifar-resnet18":  # lightly's CIFAR benchmark stem: 3x3 stride 1, no max-pool
        model = torchvision.models.resnet18()
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        model.fc = nn.Identity()
        return model, 512
    if setting == "resnet18-224":
        model = torchvision.models.resnet18()
        model.fc = nn.Identity()
        return model, 512
    if setting == "vit-small-224":  # ViT-S/16: torchvision's class with ViT-S sizes, [CLS] out
        model = torchvision.models.VisionTransformer(
            image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536
        )
        model.heads = nn.Identity()
        return model, 384
    raise ValueError(f"unknown setting {setting!r}")


def transform_for(method: str, size: int):
    small = size < 64  # CIFAR: no blur, crop scale 0.2, as hf_sslbd's small-image presets
    blur = {} if not small else {"gaussian_blur": 0.0}
    if method == "simclr":
        extra = {"min_scale": 0.2, "cj_strength": 0.5} if small else {}
        return SimCLRTransform(input_size=size, **blur, **extra)
    if method == "mocov2":
        return MoCoV2Transform(input_size=size, **blur)
    if method == "simsiam":
        return SimSiamTransform(input_size=size, **blur)
    if method == "byol":
        scale = {"min_scale": 0.2} if small else {}
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=size, **scale, **blur),
            view_2_transform=BYOLView2Transform(input_size=size, **scale, **blur),
        )
    raise ValueError(f"lightly has no {method!r} here")


class Model(nn.Module):
    """lightly's example models in one class: ``step`` returns the loss of one batch of views."""

    def __init__(self, method: str, backbone: nn.Module, dim: int, steps: int) -> None:
        super().__init__()
        self.method, self.backbone, self.steps = method, backbone, steps
        if method == "simclr":
            self.projection_head = heads.SimCLRProjectionHead(dim, 512, 128)
            self.criterion = NTXentLoss(temperature=0.2)
        elif method == "mocov2":
            self.projection_head = heads.MoCoProjectionHead(dim, 2048, 128)
            self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
        elif method == "byol":
            self.projection_head = heads.BYOLProjectionHead(dim, 1024, 256)
            self.prediction_head = heads.BYOLPredictionHead(256, 1024, 256)
            self.criterion = NegativeCosineSimilarity()
        elif method == "simsiam":
            self.projection_head = heads.SimSiamProjectionHead(dim, 2048, 2048)
            self.prediction_head = heads.SimSiamPredictionHead(2048, 512, 2048)
            self.criterion = NegativeCosineSimilarity()
        else:
            raise ValueError(f"lightly has no {method!r} here")
        if method in ("mocov2", "byol"):
            self.backbone_momentum = copy.deepcopy(backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(start_dim=1)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def step(self, views: list[torch.Tensor], index: int) -> torch.Tensor:
        x0, x1 = views
        if self.method == "simclr":
            return self.criterion(
                self.projection_head(self.features(x0)), self.projection_head(self.features(x1))
            )
        if self.method == "simsiam":
            z0, z1 = self.projection_head(self.features(x0)), self.projection_head(self.features(x1))
            p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
            return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        if self.method == "mocov2":  # lightly's moco example + the batch shuffle of its benchmarks
            update_momentum(self.backbone, self.backbone_momentum, m=0.99)
            update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
            query = self.projection_head(self.features(x0))
            with torch.no_grad():
                shuffled, shuffle = batch_shuffle(x1)
                key = batch_unshuffle(self.forward_momentum(shuffled), shuffle)
            return self.criterion(query, key)
        # byol, lightly's example
        momentum = cosine_schedule(index, self.steps, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        p0 = self.prediction_head(self.projection_head(self.features(x0)))
        z0 = self.forward_momentum(x0)
        p1 = self.prediction_head(self.projection_head(self.features(x1)))
        z1 = self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class JpegRows(torch.utils.data.Dataset):
    """The benchmark's rows (JPEG bytes written by the driver), decoded with PIL and transformed."""

    def __init__(self, path: str, transform) -> None:
        with open(path + ".json") as handle:
            lengths = json.load(handle)
        blob = open(path, "rb").read()
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        self.items = [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.transform(Image.open(io.BytesIO(self.items[index])).convert("RGB"))


def wait_turn(lockstep: bool) -> None:
    """In lockstep mode the driver alternates the two sides step by step: say the last step is
    done, then wait for the go."""
    if lockstep:
        print("turn", flush=True)
        sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True)
    parser.add_argument("--setting", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", required=True, help="JPEG bytes file written by bench_vs_lightly.py")
    parser.add_argument("--channels_last", action="store_true", help="not in lightly's examples")
    parser.add_argument("--lockstep", action="store_true", help="wait for a line on stdin before each step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    baseline = rss_mb(peak=False)

    from torch.utils.flop_counter import FlopCounterMode

    backbone, dim = backbone_for(args.setting)
    model = Model(args.method, backbone, dim, args.warmup + args.steps).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    vit = args.setting.startswith("vit")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.05)
        if vit
        else torch.optim.SGD(trainable, lr=0.06, momentum=0.9, weight_decay=5e-4)
    )
    rows = JpegRows(args.data, transform_for(args.method, args.size))
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=False, drop_last=True)
    iterator = iter(loader)
    data_times, model_times, flops = [], [], None
    for index in range(args.warmup + args.steps):
        wait_turn(args.lockstep)
        start = time.perf_counter()
        views = next(iterator)  # decode + lightly's transforms, per image, in this process
        fetched = time.perf_counter()
        if args.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        counter = FlopCounterMode(display=False) if index == 0 else None
        if counter is not None:  # the first (warm-up) step is not timed: count its FLOPs
            counter.__enter__()
        loss = model.step(views, index)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if counter is not None:
            counter.__exit__(None, None, None)
            flops = counter.get_total_flops()
        end = time.perf_counter()
        if index >= args.warmup:
            data_times.append(fetched - start)
            model_times.append(end - fetched)
    wait_turn(args.lockstep)
    bound = matmul_flops_per_second()
    print(
        json.dumps(
            {
                "side": "lightly",
                "torch": torch.__version__,
                "data_seconds": data_times,
                "views_seconds": [0.0] * len(data_times),  # lightly augments inside the loader
                "model_seconds": model_times,
                "flops_per_step": flops,
                "matmul_flops_per_second": bound,
                "peak_rss_mb": rss_mb(peak=True),
                "baseline_rss_mb": baseline,
                "channels_last": args.channels_last,
            }
        )
    )


if __name__ == "__main__":
    main()
