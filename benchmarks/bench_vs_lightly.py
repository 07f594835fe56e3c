"""Pretraining speed of hf_sslbd against lightly, measured in the same run, run by hand.

    python benchmarks/bench_vs_lightly.py                                 # every row (~20 min)
    python benchmarks/bench_vs_lightly.py --settings cifar-resnet18 --methods byol --steps 3

lightly runs from its own virtual environment (it needs torchvision; the main environment must
not have it), made once with::

    python -m venv /work/venvs/lightly
    /work/venvs/lightly/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly

For every (setting, method) row the two sides run one after the other, each in a fresh process
(its peak RSS its own), the order alternating from row to row so that a drift in the machine's
load does not favour one side; the machine is shared, so compare the *ratio* ours / lightly of a
row rather than absolute figures across rows. Each process: one thread, the same real CIFAR-10
rows (the first ``batch * (warmup + steps)`` of the train split), ``--warmup`` untimed steps (the
first one counts FLOPs with ``torch.utils.flop_counter``) then ``--steps`` timed steps, each split
into

- ``data``: waiting for the DataLoader (ours: JPEG decode + resize to uint8; lightly: decode and
  its torchvision transforms, per image: lightly augments in the loader);
- ``views``: ours only: the kornia views, batched (lightly's are inside ``data``);
- ``model``: forward, backward, optimiser step, momentum update.

Columns: ``aug img/s`` = batch / median(data + views + model) (the whole training step);
``no-aug img/s`` = batch / median(model) (the same steps without augmentation and data: what the
method itself costs); ``data %`` = data / step (ours: decode only; lightly: decode + transforms);
``of bound`` = the model part's FLOP/s over what a 2048^2 fp32 matmul reaches in the same process
right after the timed steps; ``peak MB`` = peak RSS of the process (lightly's torch is a CUDA
build: its imports alone take more).

Settings: ``cifar-resnet18`` (32 px, batch 256; ours ``resnet18-cifar``, lightly's torchvision
ResNet-18 with a 3x3 stride-1 stem and no max-pool), ``resnet18-224`` and ``vit-small-224``
(224 px, batch 32, ViT-S/16; CIFAR upscaled). Methods: mocov2, byol, simclr, simsiam (lightly
has no MSF). Head widths follow hf_sslbd's defaults on both sides; SimSiam uses lightly's
3-layer projector on both sides. ours runs as hf_sslbd trains (channels_last for CNNs on CPU);
lightly as its examples do (contiguous NCHW) unless ``--lightly_channels_last``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from bench_pretrain import matmul_flops_per_second  # same directory; stdlib + torch only

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR10 = os.path.join(HERE, "..", "..", "shared", "datasets", "cifar10")
LIGHTLY_PYTHON = "/work/venvs/lightly/bin/python"
#: setting -> (our backbone preset, image size, default batch)
SETTINGS = {
    "cifar-resnet18": ("resnet18-cifar", 32, 256),
    "resnet18-224": ("resnet18", 224, 32),
    "vit-small-224": ("vit-small", 224, 32),
}
METHODS = ("mocov2", "byol", "simclr", "simsiam")
#: method config overrides that make both sides compute the same network
SAME_AS_LIGHTLY = {"simsiam": {"num_layers": 3}}


def rss_mb(peak: bool) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def ours(args: argparse.Namespace, method: str, setting: str) -> dict:
    """Our side of one row: the library's data path, method and optimiser, as ``train`` runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    from hf_sslbd.preprocessing import Preprocessing
    from hf_sslbd.training import (
        ImageRows,
        PretrainArguments,
        build_model,
        identity_collate,
        load_train_data,
        make_optimizer,
        optimization_defaults,
        parameter_groups,
        resolve_method_config,
    )

    baseline = rss_mb(peak=False)
    backbone, size, _ = SETTINGS[setting]
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        pretrain = PretrainArguments(
            dataset=args.dataset, output_dir=out, method=method, backbone=backbone, image_size=size,
            per_device_train_batch_size=args.batch_for[setting],
            method_config=SAME_AS_LIGHTLY.get(method), torch_compile=args.torch_compile,
        )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(pretrain, resolve_method_config(pretrain)).train()
    cnn = not backbone.startswith("vit")
    if cnn:  # as train() does on CPU
        model = model.to(memory_format=torch.channels_last)
    if args.torch_compile:
        model.backbone.forward = torch.compile(model.backbone.forward)
    name, lr, wd = optimization_defaults(pretrain, model.config.backbone())
    optimizer = make_optimizer(name, parameter_groups(model, wd), lr * args.batch_for[setting] / 256, 0.9)
    dataset, column, _ = load_train_data(pretrain)
    dataset = dataset.select(range(args.batch_for[setting] * total))  # the rows lightly's side reads
    rows = ImageRows(dataset, column, Preprocessing(image_size=size, resize_size=size))
    loader = torch.utils.data.DataLoader(
        rows, batch_size=args.batch_for[setting], shuffle=False, drop_last=True, collate_fn=identity_collate
    )
    method_module, backbone_module = model.method, model.backbone
    iterator = iter(loader)
    data_times, view_times, model_times, flops = [], [], [], None
    for index in range(total):
        wait_turn(args.lockstep)
        start = time.perf_counter()
        images = next(iterator)
        fetched = time.perf_counter()
        views = method_module.make_views(images)
        viewed = time.perf_counter()
        counter = FlopCounterMode(display=False) if index == 0 else None
        if counter is not None:  # the first (warm-up) step is not timed: count its FLOPs
            counter.__enter__()
        loss = method_module.forward_views(backbone_module, views)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method_module.on_optimizer_step(backbone_module, (index + 1) / total)
        if counter is not None:
            counter.__exit__(None, None, None)
            flops = counter.get_total_flops()
        end = time.perf_counter()
        if index >= args.warmup:
            data_times.append(fetched - start)
            view_times.append(viewed - fetched)
            model_times.append(end - viewed)
    wait_turn(args.lockstep)
    bound = matmul_flops_per_second()
    return {
        "side": "ours",
        "torch": torch.__version__,
        "data_seconds": data_times,
        "views_seconds": view_times,
        "model_seconds": model_times,
        "flops_per_step": flops,
        "matmul_flops_per_second": bound,
        "peak_rss_mb": rss_mb(peak=True),
        "baseline_rss_mb": baseline,
        "channels_last": cnn,
    }


def wait_turn(lockstep: bool) -> None:
    """In lockstep mode the driver alternates the two sides step by step: say the last step is
    done, then wait for the go."""
    if lockstep:
        print("turn", flush=True)
        sys.stdin.readline()


def write_rows(dataset: str, count: int, path: str) -> None:
    """The first ``count`` JPEGs of the train split, for lightly's side (which has no ``datasets``)."""
    import datasets

    from hf_sslbd.data import find_image_column, load_image_dataset

    rows = load_image_dataset(dataset, None, split="train")
    column = find_image_column(rows.features, None)
    rows = rows.select(range(count)).cast_column(column, datasets.Image(decode=False))
    blobs = [item["bytes"] for item in rows[column]]
    with open(path, "wb") as handle:
        for blob in blobs:
            handle.write(blob)
    with open(path + ".json", "w") as handle:
        json.dump([len(blob) for blob in blobs], handle)


def summarise(result: dict, batch: int) -> dict:
    data, views, model = result["data_seconds"], result["views_seconds"], result["model_seconds"]
    step = [d + v + m for d, v, m in zip(data, views, model, strict=True)]
    model_seconds = statistics.median(model)
    flops = result["flops_per_step"] or float("nan")
    return {
        "aug_images_per_second": batch / statistics.median(step),
        "no_aug_images_per_second": batch / model_seconds,
        "data_fraction": statistics.median(d / s for d, s in zip(data, step, strict=True)),
        "views_fraction": statistics.median(v / s for v, s in zip(views, step, strict=True)),
        "bound_fraction": flops / model_seconds / result["matmul_flops_per_second"],
        "gflop_per_image": flops / batch / 1e9,
    }


def side_command(side: str, args: argparse.Namespace, method: str, setting: str, data_path: str) -> list[str]:
    batch = args.batch_for[setting]
    common = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    if side == "ours":
        command = [sys.executable, __file__, "--_child", f"{setting}:{method}", "--dataset", args.dataset,
                   "--batch_for", json.dumps(args.batch_for), *common]  # fmt: skip
        if args.torch_compile:
            command.append("--torch_compile")
    else:
        size = SETTINGS[setting][1]
        command = [args.lightly_python, os.path.join(HERE, "lightly_side.py"), "--method", method,
                   "--setting", setting, "--size", str(size), "--batch", str(batch), "--data", data_path, *common]  # fmt: skip
        if args.lightly_channels_last:
            command.append("--channels_last")
    return command + (["--lockstep"] if args.lockstep else [])


def child_env(args: argparse.Namespace) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}


def run_side(side: str, args: argparse.Namespace, method: str, setting: str, data_path: str) -> dict:
    """One side of a row, alone."""
    command = side_command(side, args, method, setting, data_path)
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(args))
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{side} {setting} {method} failed: {lines[-1]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | summarise(result, args.batch_for[setting])


def run_lockstep(
    sides: tuple[str, str], args: argparse.Namespace, method: str, setting: str, data_path: str
) -> dict[str, dict]:
    """Both sides of a row alive at once, taking turns step by step (one computes while the other
    waits), so that a change in the machine's load hits both alike."""
    processes, logs = {}, {}
    for side in sides:
        logs[side] = tempfile.TemporaryFile(mode="w+")
        processes[side] = subprocess.Popen(
            side_command(side, args, method, setting, data_path), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=logs[side], text=True, env=child_env(args),
        )  # fmt: skip

    def await_turn(side: str) -> bool:
        while line := processes[side].stdout.readline():  # skips anything a library prints
            if line.strip() == "turn":
                return True
        return False  # the process ended (its error is read below)

    try:
        ready = {side: await_turn(side) for side in sides}  # built and loaded, waiting for step 1
        for turn in range(args.warmup + args.steps + 1):  # the last turn: the matmul bound
            order = sides if turn % 2 == 0 else sides[::-1]
            for side in order:
                if not ready[side]:
                    continue
                processes[side].stdin.write("go\n")
                processes[side].stdin.flush()
                if turn < args.warmup + args.steps:
                    ready[side] = await_turn(side)
        results = {}
        for side in sides:
            output, _ = processes[side].communicate()
            if processes[side].returncode != 0:
                logs[side].seek(0)
                lines = logs[side].read().strip().splitlines() or ["(no output)"]
                raise RuntimeError(f"{side} {setting} {method} failed: {lines[-1]}")
            result = json.loads(output.strip().splitlines()[-1])
            results[side] = result | summarise(result, args.batch_for[setting])
        return results
    finally:
        for side in sides:
            if processes[side].poll() is None:
                processes[side].kill()
            logs[side].close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated of " + ", ".join(METHODS)
    )
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated of " + ", ".join(SETTINGS)
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (the first counts FLOPs)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side and row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch_for", type=json.loads, default={k: v[2] for k, v in SETTINGS.items()},
                        help="JSON {setting: batch}")  # fmt: skip
    parser.add_argument("--dataset", default=os.path.abspath(CIFAR10))
    parser.add_argument("--lightly_python", default=LIGHTLY_PYTHON, help="python of lightly's venv")
    parser.add_argument("--lightly_channels_last", action="store_true", help="lightly in channels_last too")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile our backbone's forward")
    parser.add_argument(
        "--lockstep", action="store_true",
        help="run both sides of a row at once, alternating step by step (robust to load changes)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="append one JSON line per side and row to this file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args._child:  # our side of one row, in this process
        setting, method = args._child.split(":")
        print(json.dumps(ours(args, method, setting)))
        return

    settings, methods = args.settings.split(","), args.methods.split(",")
    for name in settings:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {list(SETTINGS)}")
    for name in methods:
        if name not in METHODS:
            raise ValueError(
                f"unknown method {name!r}; lightly's side has {list(METHODS)} (no MSF in lightly)"
            )
    print(f"{args.threads} thread(s), {args.warmup} warm-up + {args.steps} timed steps per side and row")
    print(
        f"{'setting':15} {'method':8} {'side':7} {'aug img/s':>9} {'no-aug img/s':>12} {'data %':>6} "
        f"{'views %':>7} {'GFLOP/img':>9} {'of bound':>8} {'peak MB':>7}"
    )
    rows_needed = max(args.batch_for[s] for s in settings) * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "rows.jpeg")
        write_rows(args.dataset, rows_needed, data_path)
        order = 0
        for setting in settings:
            for method in methods:
                sides = ("ours", "lightly") if order % 2 == 0 else ("lightly", "ours")
                order += 1
                results = {}
                if args.lockstep:
                    try:
                        results = run_lockstep(sides, args, method, setting, data_path)
                    except RuntimeError as error:
                        print(f"{setting:15} {method:8} FAILED: {error}", flush=True)
                for side in sides:
                    if not args.lockstep:
                        try:
                            results[side] = run_side(side, args, method, setting, data_path)
                        except RuntimeError as error:
                            print(f"{setting:15} {method:8} {side:7} FAILED: {error}", flush=True)
                            continue
                    if side not in results:
                        continue
                    r = results[side]
                    print(
                        f"{setting:15} {method:8} {side:7} {r['aug_images_per_second']:9.2f} "
                        f"{r['no_aug_images_per_second']:12.2f} {100 * r['data_fraction']:5.1f}% "
                        f"{100 * r['views_fraction']:6.1f}% {r['gflop_per_image']:9.2f} {r['bound_fraction']:8.2f} "
                        f"{r['peak_rss_mb']:7.0f}",
                        flush=True,
                    )
                    if args.json:
                        with open(args.json, "a") as handle:
                            handle.write(json.dumps({"setting": setting, "method": method} | r) + "\n")
                if len(results) == 2:
                    a, b = results["ours"], results["lightly"]
                    print(
                        f"{setting:15} {method:8} {'ratio':7} {a['aug_images_per_second'] / b['aug_images_per_second']:9.2f}x "
                        f"{a['no_aug_images_per_second'] / b['no_aug_images_per_second']:11.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
