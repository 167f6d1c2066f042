"""Training step throughput: real loader against the same batches from memory, and 2 ranks against 1.

Uses the demo's patch store (run ``cytonet demo`` first, or pass ``--root`` of any run with a patch store and
``config.resolved.yaml``). Prints images/s measured side by side in one run and their ratios:

- loader overhead: pretraining steps fed by the real loader (read + decompress + augment) / the same steps fed
  from batches held in memory (augmentation still applied, reading removed);
- scaling: ``cytonet pretrain`` under torchrun with 2 processes / 1 process, same global batch.

    .venv/bin/python benchmarks/bench_train.py [--root runs/demo] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cytonet.config import load_config
from cytonet.data.loader import PatchLoader
from cytonet.data.patches import PatchStore
from cytonet.losses.contrastive import build_loss
from cytonet.models.build import build_contrastive_model
from cytonet.optim.build import build_optimizer
from cytonet.pipeline import torchrun_command


def steps_per_s(cfg_path: Path, steps: int, from_memory: bool) -> float:
    cfg = load_config(cfg_path)
    store = PatchStore(cfg.resolve_path(cfg.extract.out_dir))
    batch = cfg.pretrain.global_batch_size
    loader = PatchLoader(
        store,
        "train",
        loader_cfg=cfg.loader,
        augment_cfg=cfg.augment,
        crop_px=cfg.model.patch_size_px,
        batch_size_per_rank=batch,
    )
    torch.manual_seed(0)
    model = build_contrastive_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, batch)
    loss_fn = build_loss(cfg.loss)

    def batches():  # type: ignore[no-untyped-def]
        while True:
            loader.set_epoch(0)
            yield from loader

    if from_memory:
        # Raw uint8 batches read once; the timed loop only augments and trains.
        raw = []
        for patches, labels, _coords, index in loader.raw_batches():
            raw.append((patches, labels, index))
            if len(raw) >= 8:
                break

        def memory():  # type: ignore[no-untyped-def]
            i = 0
            while True:
                patches, labels, index = raw[i % len(raw)]
                i += 1
                yield loader.augmenter(patches, index, 0), labels

        source = memory()
    else:
        source = ((b.images, b.labels) for b in batches())
    for k, (images, labels) in enumerate(source):
        if k == 3:
            t0 = time.perf_counter()  # after warm-up (worker start, allocator)
        opt.zero_grad()
        loss_fn(model(images), labels).backward()
        opt.step()
        if k == 3 + steps:
            break
    return steps / (time.perf_counter() - t0)


def torchrun_rate(cfg_path: Path, nproc: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = torchrun_command(
            cfg_path,
            "pretrain",
            nproc,
            [f"pretrain.max_steps={steps}", f"pretrain.checkpoint_every_steps={steps}", "--out", tmp],
        )
        threads = str(max(1, (os.cpu_count() or 2) // nproc))
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        rows = (Path(tmp) / "train-log.csv").read_text().splitlines()[1:]
        # images/s over the second half of the run (excludes start-up and warm-up)
        half = rows[len(rows) // 2 :]
        t = [float(r.split(",")[4]) for r in half]
        return sum(t) / len(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/demo", help="run folder holding config.resolved.yaml and patches/")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    cfg_path = Path(args.root) / "config.resolved.yaml"
    if not cfg_path.is_file():
        sys.exit(f"{cfg_path} not found: run `cytonet demo` first or pass --root")
    batch = load_config(cfg_path).pretrain.global_batch_size
    print(f"pretraining steps, global batch {batch}, {args.steps} timed steps each")
    mem = steps_per_s(cfg_path, args.steps, from_memory=True)
    real = steps_per_s(cfg_path, args.steps, from_memory=False)
    mem2 = steps_per_s(cfg_path, args.steps, from_memory=True)
    mem = (mem + mem2) / 2  # bracket the loader run to even out machine drift
    print(f"  from memory : {mem * batch:7.1f} img/s")
    print(f"  real loader : {real * batch:7.1f} img/s")
    print(f"  loader / memory ratio: {real / mem:.2f}  (1.0 = the loader costs nothing)")
    one = torchrun_rate(cfg_path, 1, args.steps)
    two = torchrun_rate(cfg_path, 2, args.steps)
    print(f"  torchrun 1 rank : {one:7.1f} img/s")
    print(f"  torchrun 2 ranks: {two:7.1f} img/s")
    print(f"  scaling 2 / 1 ranks: {two / one:.2f}  (2.0 = linear; both share this machine's cores)")


if __name__ == "__main__":
    main()
