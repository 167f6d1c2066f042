"""Does the input pipeline keep up with training? Loader throughput against the training step's compute.

On the demo configuration (265 px crops at 8 um/px, stored 435 px, batch 32, 2 DataLoader workers, class-aware
batches, seed 002 augmentation) this measures, in one run:

1. loader: samples/s of :class:`cytonet.data.loader.PatchLoader` (read + decompress in the workers, augment
   on the device), with nothing else running;
2. compute: samples/s of a training step (forward + backward + optimizer step) of the contrastive model on
   batches already in memory: ``cytonet.models.build_contrastive_model(ModelConfig)`` when it exists, else a
   stand-in with the paper encoder's layers (seed 002: 5x5/4 conv, 3x3 convs, BN, ReLU, 2x2 pools,
   16-32-64-64 channels for 4 blocks, valid padding) plus the projection MLP;
3. both together: the training loop fed by the loader, against compute alone, with the given workers and
   with reading in the training process (``loader.workers=0``).

Prints the ratio loader / compute (>= 1: the loader keeps up) and the combined efficiency. On a CPU-only
machine the workers, the augmentation and the model share the same cores, so (3) is the honest figure there;
on a GPU node the model runs on the GPU and (1) vs (2) is the relevant ratio. On the CPU the augmentation runs
in the training process, so (3) is about 1 / (1 / augment + 1 / compute) whatever the number of workers
(reading a demo batch takes ~10 ms, augmenting it ~40 ms, a training step ~65 ms).

The development machines are shared: other jobs can slow a repeat several-fold; the repeats are interleaved
and medians printed, and ``--verbose`` shows each repeat, so disturbed ones can be recognised.

Usage: ``python benchmarks/bench_loader.py [--codec none|blosc-zstd] [--backend hdf5|zarr] [--batches 12] [--repeats 5] [--verbose]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_patch_reads import texture_patches, write_store
from torch import nn

from cytonet.config import ModelConfig, load_config
from cytonet.data.loader import PatchLoader
from cytonet.data.patches import PatchGeometry


def stand_in_encoder(n_blocks: int = 4) -> nn.Module:
    widths = [16, 32, 64, 64, 128, 128][:n_blocks]
    layers: list[nn.Module] = []
    cin = 1
    for b, w in enumerate(widths):
        first = nn.Conv2d(cin, w, 5, stride=4, bias=False) if b == 0 else nn.Conv2d(cin, w, 3, bias=False)
        layers += [first, nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, bias=False)]
        layers += [nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        if b < n_blocks - 1:
            layers.append(nn.MaxPool2d(2))
        cin = w
    head = [nn.Flatten(), nn.Linear(cin, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Linear(128, 128)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), *head)


def build_model(cfg: ModelConfig) -> tuple[nn.Module, str]:
    """The contrastive model (encoder + projection head) of ``cytonet.models``, or the stand-in."""
    try:
        from cytonet.models import build_contrastive_model

        return build_contrastive_model(cfg), "cytonet.models.build_contrastive_model"
    except ImportError:
        return stand_in_encoder(cfg.n_blocks), "stand-in paper encoder (cytonet.models not available)"


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    out = model(x)
    loss = out.float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="hdf5", choices=["hdf5", "zarr"])
    parser.add_argument("--codec", default="none", choices=["none", "blosc-zstd"])
    parser.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are printed")
    parser.add_argument("--verbose", action="store_true", help="print every repeat")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(None, [f"loader.workers={args.workers}"])  # defaults: 265 px crop, batch 64
    crop, b = cfg.model.patch_size_px, cfg.pretrain.global_batch_size
    geometry = PatchGeometry.for_crop(crop, 8.0, cfg.augment.shift_max_mm, cfg.augment.blur_radius_px)
    n = b * (args.batches + 4)  # class-aware batches over 8 balanced areas: exactly batches + 4 of them
    model, model_name = build_model(cfg.model)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        path = write_store(Path(tmp) / "store", texture_patches(n, geometry.stored_px), args.backend, args.codec, 128)
        os.sync()  # no write-back of the fresh store during the timings
        # Record the demo geometry in the manifest so the augmenter accepts the store.
        manifest_path = path / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["geometry"] = geometry.to_dict()
        manifest_path.write_text(json.dumps(manifest))

        # One loader for all measurements (as in training): its persistent workers start once; a new loader per
        # measurement would leave the previous one's workers competing for the cores.
        loaders = {
            w: PatchLoader(
                path,
                "train",
                loader_cfg=dataclasses.replace(cfg.loader, workers=w),
                augment_cfg=cfg.augment,
                crop_px=crop,
                batch_size_per_rank=b,
                device=device,
            )
            for w in sorted({args.workers, 0})
        }
        epoch = iter(range(10**6))

        print(
            f"device {device}, torch threads {torch.get_num_threads()}, {args.workers} workers, batch {b}, "
            f"crop {crop} px from {geometry.stored_px} px stored, {args.backend}/{args.codec}, model: {model_name}"
        )

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def timed_loader(train: bool, workers: int = args.workers) -> float:
            """Samples/s over ``args.batches`` batches after two warm-up batches (workers started)."""
            ld = loaders[workers]
            ld.set_epoch(next(epoch))
            it = iter(ld)
            for _ in range(2):
                batch = next(it)
                if train:
                    train_step(model, opt, batch.images)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.batches):
                batch = next(it)
                if train:
                    train_step(model, opt, batch.images)
            sync()
            rate = args.batches * b / (time.perf_counter() - t0)
            for _ in it:  # finish the epoch so that no prefetching overlaps the next measurement
                pass
            return rate

        x = next(iter(loaders[0])).images

        def timed_compute() -> float:
            for _ in range(2):
                train_step(model, opt, x)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.batches):
                train_step(model, opt, x)
            sync()
            return args.batches * b / (time.perf_counter() - t0)

        # Interleaved repeats, medians: the machines vary 10-30% from run to run (PLATFORM.md).
        runs = [
            (timed_loader(False), timed_compute(), timed_loader(True), timed_loader(True, 0))
            for _ in range(args.repeats)
        ]
        loader_rate, compute_rate, both_rate, both0_rate = (float(np.median(col)) for col in zip(*runs))
        ratios = [r[0] / r[1] for r in runs]
        if args.verbose:
            for r in runs:
                print(
                    f"repeat: loader {r[0]:.0f}, compute {r[1]:.0f}, fed ({args.workers} workers) {r[2]:.0f}, fed (0) {r[3]:.0f}"
                )

    print(f"loader (read + decompress + augment): {loader_rate:8.0f} samples/s")
    print(f"training step compute:                {compute_rate:8.0f} samples/s")
    print(
        f"loader / compute ratio:               {loader_rate / compute_rate:8.2f}  (>= 1: the loader keeps up; "
        f"per repeat: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(
        f"training fed by the loader:           {both_rate:8.0f} samples/s = {both_rate / compute_rate:.2f} of compute "
        f"({args.workers} workers)"
    )
    print(
        f"training fed by the loader:           {both0_rate:8.0f} samples/s = {both0_rate / compute_rate:.2f} of compute "
        "(0 workers: reading in the training process)"
    )


if __name__ == "__main__":
    main()
