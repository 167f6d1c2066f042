"""Whole-section inference: dense against per-patch evaluation, and end-to-end overhead over the pure trunk.

Two measurements, side by side in one run, on one synthetic section and one model (random weights with
non-trivial BatchNorm statistics: speed and exactness do not depend on training):

1. Dense vs per-patch: the same tile evaluated by :class:`DenseEncoder` (trunk once, a trous after the split
   point) and by :class:`PerPatchEncoder` (one encoder call per grid point, batched) at a stride of about 1/16
   of the patch; prints both times, the speedup (goal >= 50x) and the largest feature difference.
2. End to end: ``run_infer`` over the whole section (plan, read, tissue mask and region of interest (the
   demo's ``infer.roi=centerline``; ``--set infer.roi=tissue`` leaves it out), dense trunk, classifier,
   pyramid, compressed OME-Zarr writes, done markers) against the pure forward pass (dense trunk +
   classifier) over the same blocks already in memory as float tensors; prints megapixels per second
   (section pixels) and the overhead (goal <= 15%). Best of --repeats, the two sides interleaved; and, as
   the best times of the two sides may come from different moments of a shared machine's load, the median
   and range of the overheads of each run against the pure pass just before it. Measured
   twice: with all cores to the model (torch's default), where reading and writing take CPU time from the
   model, and with one core left to them (--threads), the layout of a node where the model runs on an
   accelerator and the cores are free for I/O. And twice more: with one section per run, where the run's own
   costs (loading the model, starting threads, the first read, the last write) count in full, and with four
   (--sections), as when a worker maps its share of a brain's sections in one run (the copies are hard links
   of the one section, under other section numbers). All runs share one process, as a worker mapping section
   after section does: the heap and inference's input buffers (cytonet.hostmem) are warm from the second run
   on, for both sides; a fresh process first maps the memory of its inputs and its activations alike.

    python benchmarks/bench_infer.py                  # cases demo, medium, paper (~4 min on 2 cores)
    python benchmarks/bench_infer.py --cases medium --repeats 5 --work /tmp/bench-infer
    python benchmarks/bench_infer.py --device cuda --precision bf16 --threads 16

Cases (encoder blocks / patch / stride / model pixel): demo 3 / 121 px / 8 / 16 um (the CPU demo's model),
medium 4 / 265 px / 16 / 8 um, paper 6 / 1129 px / 64 / 4 um (seed 002's encoder at about patch / 16), all on
the same 4 um section, read from its image levels x4 and x2 and at full resolution.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cytonet.config import Config, config_to_dict, load_config
from cytonet.data.sections import open_section
from cytonet.data.synth import generate_section
from cytonet.distributed import DistEnv
from cytonet.infer.dense import DenseEncoder, PerPatchEncoder, dense_classifier_logits
from cytonet.infer.run import BlockEvaluator, BlockReader, Classifier, load_classifier, run_infer, select_sections
from cytonet.models.build import MODEL_FILE, MODEL_FORMAT, build_encoder
from cytonet.models.heads import LinearClassifier
from cytonet.precision import ieee_fp32


def make_model(cfg: object, path: Path, n_areas: int, pixel_um: float) -> None:
    torch.manual_seed(0)
    enc = build_encoder(cfg.model)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    head = LinearClassifier(enc.out_dim, n_areas)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": MODEL_FORMAT,
            "encoder": enc.state_dict(),
            "classifier": head.state_dict(),
            "area_ids": list(range(2, 2 + n_areas)),
            "area_names": [f"A{i:02d}" for i in range(n_areas)],
            "patch_pixel_size_um": pixel_um,
            "sections": [],
            "config": config_to_dict(cfg),  # type: ignore[arg-type]
        },
        path / MODEL_FILE,
    )


def sync() -> None:
    """Wait for queued GPU work: CUDA calls return before their kernels finish (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


#: case -> (n_blocks, patch px, stride px, section px per model px, tile edge for part 1, chunk px)
CASES = {
    "demo": (3, 121, 8, 4, 640, 128),
    "medium": (4, 265, 16, 2, 768, 128),
    "paper": (6, 1129, 64, 1, 1129 + 15 * 64, 128),
}
#: Pixel size and extent of the synthetic section: 4 um and 64 x 48 mm (a macaque-sized section) give
#: 16000 x 12000 px (192 MP), stored with image levels x2 to x16 as `cytonet synth` and `import` store them.
#: The per-run costs (starting threads, loading the model, creating the volume) then weigh about as much as
#: they do on a real section; a 24 x 18 mm section (--section-mm 24 18) shows them at their worst.
SECTION_UM = 4.0
SECTION_MM = (64.0, 48.0)
#: torch's default thread count: the cores this process may use.
CORES = torch.get_num_threads()


def section_config(args: argparse.Namespace, work: Path, *overrides: str) -> Config:
    w, h = args.section_mm
    return load_config(
        None,
        [
            f"run.root_dir={work}",
            f"synth.pixel_size_um={args.section_um}",
            f"synth.brain_width_mm={w}",
            f"synth.brain_height_mm={h}",
            "extract.sections_dir=sections",
            *overrides,
        ],
    )


def make_sections(args: argparse.Namespace, work: Path) -> list[str]:
    """The synthetic section every case maps (generated once; kept when --work names a folder holding it), with
    the ``sections.*`` settings of --set (e.g. ``sections.compression=none``), and copies of it as further
    sections of the brain (hard links, but for their metadata), for runs that map several; returns their names."""
    store_settings = sorted(s for s in args.set if s.startswith("sections."))
    cfg = section_config(args, work, *store_settings)
    path = work / "sections" / "B00_s0000.zarr"
    made_as = [*args.section_mm, args.section_um, *store_settings]
    if not (path.exists() and open_section(path).meta.extra.get("bench") == made_as):
        t0 = time.perf_counter()
        generate_section(
            cfg.synth,
            0,
            0,
            path,
            chunk_px=cfg.sections.chunk_px,
            compression=cfg.sections.compression,
            image_levels=cfg.sections.image_levels,
            overwrite=True,
            extra_attrs={"bench": made_as},
        )
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s")
    names = ["B00_s0000"]
    for k in range(1, max(args.sections)):
        copy = path.with_name(f"B00_s{k:04d}.zarr")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy, copy_function=os.link)
        meta = json.loads((copy / "zarr.json").read_text())
        meta["attributes"]["section_index"] = k
        (copy / "zarr.json").unlink()  # a link to the original's: replaced, not written through
        (copy / "zarr.json").write_text(json.dumps(meta))
        names.append(f"B00_s{k:04d}")
    return names


def run_case(name: str, args: argparse.Namespace, work: Path, device: torch.device, sections: list[str]) -> None:
    n_blocks, patch, stride, factor, tile_px, chunk = CASES[name]
    chunk = args.chunk or chunk
    case = [
        f"model.n_blocks={n_blocks}",
        f"model.patch_size_px={patch}",
        "infer.splits=[]",
        f"infer.stride_px={stride}",
        f"infer.chunk_px={chunk}",
        f"infer.precision={args.precision}",
        f"infer.model_from={name}/probe",
        f"infer.sections_dir={work / 'sections'}",
        "infer.cleanup=none",
        "infer.roi=centerline",  # as the demo maps: the cortex's centre band, looked up in the depth layer
        *args.set,
    ]
    cfg = section_config(args, work, *case, "infer.sections=[B00_s0000]")
    make_model(cfg, work / name / "probe", cfg.synth.n_areas, args.section_um * factor)
    work = work / name
    clf = load_classifier(work / "probe")
    enc = clf.encoder.to(device)
    print(
        f"\n== {name}: {n_blocks}-block encoder, patch {patch} px, stride {stride} px (patch/{patch / stride:.1f}), "
        f"model pixel {args.section_um * factor:g} um, {args.device} {args.precision}"
    )

    # 1. dense vs per-patch on one tile from the middle of the section
    with open_section(work.parent / "sections" / "B00_s0000.zarr") as r:
        h, w = r.shape
        y0 = max(0, (h // factor - tile_px) // 2)
        x0 = max(0, (w // factor - tile_px) // 2)
        tile = r.read_image(factor, y0, y0 + tile_px, x0, x0 + tile_px)
    if args.precision == "fp32":
        ieee_fp32(device)  # as inference does: TF32 convolutions would differ from per-patch by ~1e-3
    x = torch.from_numpy(tile).float().div(255.0)[None, None].to(device)
    dense = DenseEncoder(enc, patch, stride, channels_last=cfg.infer.channels_last).to(device).eval()
    per_patch = PerPatchEncoder(enc, patch, stride, batch_size=16 if patch > 512 else 64).eval()
    with torch.no_grad():
        fd = dense(x)
        t_dense = timed(lambda: dense(x), args.repeats)
        sync()
        t0 = time.perf_counter()
        fp = per_patch(x)
        sync()
        t_patch = time.perf_counter() - t0
    n_pts = fd.shape[-2] * fd.shape[-1]
    print(f"1. dense vs per-patch, tile {tile_px}^2 px, {n_pts} grid points")
    print(f"   per-patch {t_patch:8.3f} s ({n_pts / t_patch:8.0f} points/s)")
    print(f"   dense     {t_dense:8.3f} s ({n_pts / t_dense:8.0f} points/s)")
    print(f"   speedup {t_patch / t_dense:.1f}x; largest feature difference {(fd - fp).abs().max().item():.2e}")

    # 2. end to end vs the pure forward pass over the same blocks (of the section and its copies)
    jobs = select_sections(cfg, clf)
    evaluator = BlockEvaluator(cfg, clf, device)
    blocks = [(job, b) for job in jobs for b in job.grid.blocks()]
    stage1 = BlockReader(cfg, device)
    with open_section(jobs[0].path) as r:
        read = [stage1.read(r, job, b) for job, b in blocks]
    tissue = [x is not None for x, _ in read]
    inputs = [x.to(device).float().div(255.0) if x.dtype == torch.uint8 else x for x, _ in read if x is not None]

    print(
        f"2. end to end: section {h}x{w} px ({h * w / 1e6:.1f} MP), {len(blocks)} blocks of {chunk}^2 output px, "
        f"{sum(tissue)} with tissue; best of {args.repeats}, interleaved"
    )
    for n_sections in args.sections:
        cfg = section_config(args, work.parent, *case, f"infer.sections=[{','.join(sections[:n_sections])}]")
        end_to_end(cfg, args, work, device, n_sections, h * w / 1e6, lambda: pure(evaluator, clf, inputs))


def pure(evaluator: BlockEvaluator, clf: Classifier, inputs: list[torch.Tensor]) -> None:
    """The model alone: trunk, classifier and softmax of blocks in memory, results copied to the host."""
    device = evaluator.device
    with torch.no_grad(), torch.autocast(device.type, dtype=evaluator.dtype, enabled=evaluator.dtype is not None):
        for xb in inputs:
            torch.softmax(dense_classifier_logits(evaluator.net(xb).float(), clf.head.fc), dim=1).cpu()


def end_to_end(
    cfg: Config,
    args: argparse.Namespace,
    work: Path,
    device: torch.device,
    n_sections: int,
    section_mpix: float,
    pure_one: Callable[[], None],
) -> None:
    """``run_infer`` over ``n_sections`` copies of the section against ``pure_one`` (one section's blocks)
    as often, for each of ``args.threads``."""
    mpix = n_sections * section_mpix
    print(f"   {n_sections} section(s) in one run ({mpix:.0f} MP):")

    def pure_all() -> None:
        for _ in range(n_sections):
            pure_one()

    for threads in args.threads:
        torch.set_num_threads(threads)
        # Interleaved, best of N each: the machine's load drifts during a run, and both sides see the same drift.
        t_pure_runs, e2e, stages = [], [], []
        for rep in range(args.repeats):
            t_pure_runs.append(timed(pure_all, 1))
            shutil.rmtree(work / f"out-{rep}", ignore_errors=True)  # a kept --work folder: map everything again
            t0 = time.perf_counter()
            result = run_infer(cfg, DistEnv(), work / f"out-{rep}", device=device)
            e2e.append(time.perf_counter() - t0)
            stages.append(result.stage_seconds)
        t_pure, t_e2e = min(t_pure_runs), min(e2e)
        spent = stages[e2e.index(t_e2e)]
        left = CORES - threads
        print(f"     model on {threads} thread(s), {left} core(s) left to reading and writing:")
        print(f"       pure forward (trunk + classifier, blocks in memory) {t_pure:7.3f} s  {mpix / t_pure:7.2f} MP/s")
        print(f"       cytonet infer (read, evaluate, write, markers)     {t_e2e:7.3f} s  {mpix / t_e2e:7.2f} MP/s")
        paired = sorted(100 * (e / p - 1) for e, p in zip(e2e, t_pure_runs))
        print(
            f"       overhead {100 * (t_e2e / t_pure - 1):.1f}% (goal <= 15%); run by run (each run against the pure "
            f"pass just before it) median {statistics.median(paired):.1f}%, range {paired[0]:.1f}% to {paired[-1]:.1f}%"
        )
        print(
            f"       where it goes: model {spent['evaluate']:.3f} s (pure {t_pure:.3f} s; the rest is the model slowed "
            f"by the I/O threads), waits for reads (the first one included) and write slots {spent['wait']:.3f} s, "
            f"run set-up and the last write {t_e2e - spent['evaluate'] - spent['wait']:.3f} s; the I/O threads spent "
            f"{spent['read']:.3f} s reading and {spent['write']:.3f} s writing, overlapped"
        )
    torch.set_num_threads(CORES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--section-um", type=float, default=SECTION_UM, help="pixel size of the synthetic section")
    ap.add_argument("--section-mm", type=float, nargs=2, default=SECTION_MM, metavar=("W", "H"), help="its extent")
    ap.add_argument("--chunk", type=int, default=0, help="output chunk (= block) edge in px; 0: the case's")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. infer.*")
    ap.add_argument(
        "--sections",
        type=int,
        nargs="+",
        default=[1, 4],
        help="sections per run to measure part 2 with (copies of the one section; a worker maps its share of a "
        "brain's sections in one run, so the per-run costs spread over them); default: 1 and 4",
    )
    ap.add_argument("--work", type=Path, help="folder for the section and outputs (kept; the section is reused)")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[CORES, CORES - 1] if CORES > 1 else [1],
        help="model (torch) threads to measure part 2 with; default: all cores, and all but one",
    )
    ap.add_argument("--prepare", action="store_true", help="only generate the section into --work, then exit")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-infer-"))
    sections = make_sections(args, work)
    if args.prepare:
        print(f"section ready in {work}")
        return
    for name in args.cases:
        run_case(name, args, work, torch.device(args.device), sections)
    print(f"\n(outputs in {work})")


if __name__ == "__main__":
    main()
