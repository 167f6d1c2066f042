"""Contrastive loss forward+backward time and peak memory per rank, global batch spread over 1, 2 and 4 ranks.

Each rank holds B_local = B_global / W anchors and gathers all B_global candidates, so its loss tensors are
O(B_local x B_global): the per-rank peak memory should fall roughly as 1 / W. Ranks are real processes
(gloo on 127.0.0.1, or nccl with --device cuda and enough GPUs), started one world size after the other.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set (VmHWM)
above the resident set before the step, after resetting the peak through /proc/self/clear_refs (Linux).
Large allocations are forced to mmap (MALLOC_MMAP_THRESHOLD_) so that freed memory goes back to the OS and
every step is measured alike. On this 2-core machine 4 ranks share 2 cores: compare memory across W, and time
only between W = 1 and 2.

    python benchmarks/bench_loss.py                      # B_global 4096, D 128, W = 1, 2, 4 (~1 min on 2 cores)
    python benchmarks/bench_loss.py --global-batch 8192 --ranks 1 2 4 8 --kind distance
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from cytonet import distributed as D
from cytonet.config import DistConfig, LossConfig
from cytonet.losses import ContrastiveLoss


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    env = D.DistEnv(rank=rank, local_rank=rank, world_size=world, master_port=port, local_world_size=world)
    device = D.init_distributed(env, DistConfig(backend="nccl" if args.device == "cuda" else "gloo"))
    g = torch.Generator().manual_seed(rank)
    b_local = args.global_batch // world + (1 if rank < args.global_batch % world else 0)
    z0 = F.normalize(torch.randn(b_local, args.dim, generator=g), dim=1).to(device)
    labels = torch.randint(0, args.classes, (b_local,), generator=g).to(device)
    coords = (torch.rand(b_local, 3, generator=g) * 50).to(device)
    targets = labels if args.kind == "supcon" else coords
    loss_fn = ContrastiveLoss(LossConfig(kind=args.kind, temperature=0.07, transfer="gaussian", radius_mm=5.0))

    def step() -> float:
        z = z0.clone().requires_grad_(True)
        loss = loss_fn(z, targets)
        loss.backward()
        return float(loss.detach())

    times, peaks = [], []
    for it in range(args.warmup + args.iters):
        D.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _status_kib("VmHWM") * 1024 - base
        dt = time.perf_counter() - t0
        if it >= args.warmup:
            times.append(dt)
            peaks.append(peak)
    # Best time: robust to bursts of foreign load on shared machines; memory: the largest step.
    res: dict[str, Any] = {"b_local": b_local, "time_s": min(times), "peak_bytes": max(peaks)}
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    D.destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=128, help="embedding width D_p (seed 002: 128)")
    p.add_argument("--classes", type=int, default=113, help="label count for SupCon (seed 002: 113 areas)")
    p.add_argument("--kind", choices=["supcon", "distance"], default="supcon")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--iters", type=int, default=5, help="timed steps (the fastest is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    # Big allocations via mmap: freed memory returns to the OS, so each step's peak RSS is measured afresh.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    b, d = args.global_batch, args.dim
    print(f"loss {args.kind}: global batch {b}, D {d}, device {args.device}, {args.threads} threads in total")
    print(
        f"{'ranks':>5} {'B_local':>8} {'fwd+bwd ms':>11} {'peak MiB/rank':>14} {'mem ratio':>10} {'B_l*B_g*4 MiB':>14}"
    )
    first_peak = None
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            res = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
        peak = max(r["peak_bytes"] for r in res)
        t = max(r["time_s"] for r in res)
        first_peak = first_peak or peak
        one_matrix = res[0]["b_local"] * b * 4 / 2**20
        print(
            f"{world:>5} {res[0]['b_local']:>8} {t * 1e3:>11.1f} {peak / 2**20:>14.1f} "
            f"{peak / first_peak:>10.2f} {one_matrix:>14.1f}"
        )


if __name__ == "__main__":
    main()
