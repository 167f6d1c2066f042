"""Dense forward pass on the CPU: what reusing host memory and the folded channels_last trunk each give.

Three variants of the same :class:`DenseEncoder` forward over one tile, each in a fresh interpreter (the host
memory settings are process-wide and cannot be undone), side by side in one run:

- ``malloc default``: the C library's malloc, contiguous trunk (cytonet before ``run.reuse_host_memory``);
- ``reuse``: :func:`cytonet.hostmem.reuse_freed_memory`, contiguous trunk (``infer.channels_last=false``);
- ``reuse + channels_last``: both, as ``cytonet infer`` runs by default.

Prints the best of --repeats forward times, the minor page faults per forward, and the speedups against the
first variant. Random weights with non-trivial BatchNorm statistics; the tile is the one a 128-px output block
reads at the case's stride (block plus receptive-field context).

    python benchmarks/bench_dense_cpu.py                 # cases demo, medium, paper (~1 min on 2 cores)
    python benchmarks/bench_dense_cpu.py --cases paper --repeats 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: case -> (n_blocks, patch px, stride px)
CASES = {"demo": (3, 121, 8), "medium": (4, 265, 16), "paper": (6, 1129, 64)}
VARIANTS = {
    "malloc default": (False, False),
    "reuse": (True, False),
    "reuse + channels_last": (True, True),
}
#: Output pixels per block edge (infer.chunk_px's default).
BLOCK_PX = 128

CHILD = """
import json, resource, sys, time
import torch
from cytonet.config import load_config
from cytonet.hostmem import reuse_freed_memory
from cytonet.infer.dense import DenseEncoder
from cytonet.models.build import build_encoder

n_blocks, patch, stride, reuse, channels_last, repeats, block = json.loads(sys.argv[1])
if reuse:
    assert reuse_freed_memory(), "the host memory settings did not apply (not glibc?)"
torch.manual_seed(0)
enc = build_encoder(load_config(None, [f"model.n_blocks={n_blocks}", f"model.patch_size_px={patch}"]).model)
g = torch.Generator().manual_seed(0)
for m in enc.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
net = DenseEncoder(enc.eval(), patch, stride, channels_last=channels_last).eval()
side = block * stride + patch - 1
x = torch.rand(1, 1, side, side)
times, faults = [], []
with torch.no_grad():
    net(x)  # warm-up: oneDNN primitives, the heap's first growth
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        net(x)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"seconds": min(times), "faults": sorted(faults)[len(faults) // 2], "side": side}))
"""


def measure(case: str, variant: str, repeats: int) -> dict[str, float]:
    n_blocks, patch, stride = CASES[case]
    reuse, channels_last = VARIANTS[variant]
    arg = json.dumps([n_blocks, patch, stride, reuse, channels_last, repeats, BLOCK_PX])
    env_run = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, check=False)
    if env_run.returncode != 0:
        raise SystemExit(f"{case} / {variant} failed:\n{env_run.stderr}")
    return json.loads(env_run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for case in args.cases:
        results = {v: measure(case, v, args.repeats) for v in VARIANTS}
        base = results["malloc default"]["seconds"]
        side = int(results["malloc default"]["side"])
        print(f"== {case}: {CASES[case][0]}-block encoder, stride {CASES[case][2]} px, tile {side}^2 px")
        for variant, r in results.items():
            print(
                f"   {variant:22s} {r['seconds']:8.3f} s  {base / r['seconds']:5.2f}x   "
                f"{int(r['faults']):8d} page faults per forward"
            )


if __name__ == "__main__":
    main()
