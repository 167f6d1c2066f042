"""Encoder training throughput (images/s, forward + backward) at the demo and paper patch sizes.

Measures, side by side in one run, fp32, bf16 autocast, channels_last fp32 and channels_last + bf16 for
the 4-block paper encoder at 265 px (the CPU demo) and the 6-block encoder at 1129 px (seed 002), in training
mode (BatchNorm with batch statistics), loss = mean of the pooled features. Ratios against fp32 are what to
compare: absolute numbers vary 10-30% between runs on shared machines (PLATFORM.md).

    python benchmarks/bench_encoder.py                         # ~1 min on 2 cores
    python benchmarks/bench_encoder.py --seconds 5 --cases demo paper resnet50   # longer, plus ResNet-50 at 224 px
    python benchmarks/bench_encoder.py --device cuda --modes fp32 bf16 fp16 cl+bf16 cl+fp16
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

from cytonet.config import ModelConfig
from cytonet.models import build_encoder

#: label -> (encoder, n_blocks, patch px, CPU batch)
CASES = {
    "demo": ("paper", 4, 265, 32),
    "paper": ("paper", 6, 1129, 8),
    "resnet50": ("resnet50", 4, 224, 8),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Case:
    """One encoder in one mode (fp32|bf16|fp16, optionally ``cl+`` for channels_last), ready to step."""

    def __init__(self, cfg: ModelConfig, mode: str, batch: int, device: torch.device) -> None:
        channels_last = mode.startswith("cl+")
        self.dtype = DTYPES[mode.removeprefix("cl+")]
        self.device, self.batch = device, batch
        torch.manual_seed(0)
        self.enc = build_encoder(replace(cfg, channels_last=channels_last)).to(device).train()
        self.x = torch.rand(batch, 1, cfg.patch_size_px, cfg.patch_size_px, device=device)
        self.step()  # warm-up: allocator, oneDNN / cuDNN kernel selection

    def step(self) -> None:
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with ctx:
            out = self.enc(self.x)
        out.float().mean().backward()
        self.enc.zero_grad(set_to_none=True)

    def measure(self, seconds: float) -> tuple[float, float]:
        """(images/s, CPU utilisation of this process relative to its threads) over ``seconds``."""
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            self.step()
            n += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and n >= 2:
                util = (time.process_time() - c0) / (elapsed * torch.get_num_threads())
                return n * self.batch / elapsed, util


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all modes; the best round is reported")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "cl+fp32", "cl+bf16"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-scale", type=int, default=1, help="multiply the CPU batch sizes (e.g. 8 on a GPU)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=["demo", "paper"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"encoder forward+backward, images/s on {device} ({torch.get_num_threads()} threads), best of "
        f"{args.rounds} rounds; (ratio vs fp32); * = this process got < 80% of its CPU time (contended machine)"
    )
    print(f"{'case':<9} {'patch':>5} {'batch':>5} " + " ".join(f"{m:>16}" for m in args.modes))
    for label in args.cases:
        encoder, n_blocks, patch, batch = CASES[label]
        cfg = ModelConfig(encoder=encoder, n_blocks=n_blocks, patch_size_px=patch)  # type: ignore[arg-type]
        b = batch * args.batch_scale
        runs = {m: Case(cfg, m, b, device) for m in dict.fromkeys(args.modes)}
        best: dict[str, tuple[float, float]] = {m: (0.0, 0.0) for m in runs}
        for _ in range(args.rounds):  # interleaved, so that a burst of foreign load hits every mode alike
            for m, run in runs.items():
                rate, util = run.measure(args.seconds)
                if rate > best[m][0]:
                    best[m] = (rate, util)
        base = best.get("fp32", next(iter(best.values())))[0]
        cells = " ".join(f"{r:>8.1f} ({r / base:>4.2f}){'*' if u < 0.8 else ' '}" for r, u in best.values())
        print(f"{label:<9} {patch:>5} {b:>5} {cells}", flush=True)
        del runs


if __name__ == "__main__":
    main()
