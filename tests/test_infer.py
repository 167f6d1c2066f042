"""Whole-section inference: dense = per-patch, block layout, work split, crash and resume, formats, clean-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import procs
import pytest
import torch
from ringdata import make_sections

from cytonet.config import Config, config_to_dict, layer_overrides, load_config, save_config
from cytonet.data.chunks import open_chunked
from cytonet.data.sections import SectionMeta, create_section, open_section
from cytonet.distributed import DistEnv
from cytonet.errors import ConfigError, InputError
from cytonet.infer import writers
from cytonet.infer.blocks import Block, Grid, assign, pyramid_mean
from cytonet.infer.cleanup import grid_axes, knn_cleanup, seed_mask, stack_cleanup
from cytonet.infer.dense import DenseEncoder, PerPatchEncoder
from cytonet.infer.run import BlockReader, _smallest_first, load_classifier, run_infer, select_sections
from cytonet.models.build import MODEL_FILE, MODEL_FORMAT, build_encoder
from cytonet.models.heads import LinearClassifier
from cytonet.models.paper_encoder import PaperEncoder

CYTONET = str(Path(sys.executable).with_name("cytonet"))
AREAS = [2, 3, 4, 5]


def randomise_batchnorm(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so that eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def base_config(root: Path, *overrides: str) -> Config:
    return load_config(
        None,
        layer_overrides(
            [
                f"run.root_dir={root}",
                "model.n_blocks=3",
                "model.patch_size_px=121",
                "extract.sections_dir=sections",
                "infer.splits=[]",
                "infer.stride_px=8",
                "infer.chunk_px=8",
                "infer.pyramid_levels=2",
            ],
            overrides,
        ),
    )


def write_model(cfg: Config, run_dir: Path, pixel_um: float = 8.0, seed: int = 0) -> Path:
    """A model.pt as probe writes it, with random weights (inference must be exact for any weights)."""
    torch.manual_seed(seed)
    enc = build_encoder(cfg.model)
    randomise_batchnorm(enc, seed)
    head = LinearClassifier(enc.out_dim, len(AREAS))
    torch.nn.init.normal_(head.fc.weight, std=2.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MODEL_FILE
    torch.save(
        {
            "format": MODEL_FORMAT,
            "encoder": enc.state_dict(),
            "classifier": head.state_dict(),
            "area_ids": AREAS,
            "area_names": ["big", "mid", "small", "tiny"],
            "patch_pixel_size_um": pixel_um,
            "sections": [],
            "config": config_to_dict(cfg),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("infer")
    make_sections(root / "sections", {"B00": 2, "B01": 1})
    cfg = base_config(root)
    write_model(cfg, root / "probe")
    save_config(cfg, root, name="infer.yaml")
    return root


def read_volume(path: Path) -> dict[str, np.ndarray]:
    """Every array of an output volume, by name."""
    import zarr

    out = {}
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path) as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if hasattr(obj, "shape") else None)
        return out
    g = zarr.open_group(str(path), mode="r")
    for name, arr in g.arrays():
        out[name] = arr[...]
    for lname in ("argmax", "cleaned"):
        if f"labels/{lname}" in g:
            for name, arr in g[f"labels/{lname}"].arrays():
                out[f"labels/{lname}/{name}"] = arr[...]
    return out


def assert_same_outputs(a: Path, b: Path, atol: float = 0.0) -> None:
    """Same volumes with the same arrays: bitwise, or probabilities within ``atol`` (runs with other thread
    counts, e.g. torchrun's OMP_NUM_THREADS=1, sum convolutions in another order)."""
    vols = sorted(p.name for p in a.iterdir() if p.name.endswith((".ome.zarr", ".h5")))
    assert vols == sorted(p.name for p in b.iterdir() if p.name.endswith((".ome.zarr", ".h5")))
    assert vols
    for name in vols:
        va, vb = read_volume(a / name), read_volume(b / name)
        assert va.keys() == vb.keys()
        for key in va:
            if atol and va[key].dtype.kind == "f":
                np.testing.assert_allclose(va[key], vb[key], rtol=0, atol=atol, err_msg=f"{name}/{key}")
            else:
                np.testing.assert_array_equal(va[key], vb[key], err_msg=f"{name}/{key}")


# ---------------------------------------------------------------------------------------------------------
# Dense evaluation


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("n_blocks", "patch", "stride"), [(3, 121, 8), (3, 121, 16), (3, 121, 24), (3, 137, 4), (4, 265, 16), (2, 57, 3)]
)
def test_dense_equals_per_patch(n_blocks: int, patch: int, stride: int, channels_last: bool) -> None:
    torch.manual_seed(n_blocks + stride)
    enc = PaperEncoder(n_blocks).eval()
    randomise_batchnorm(enc, stride)
    x = torch.rand(2, 1, patch + 5 * stride + 1, patch + 3 * stride)
    with torch.no_grad():
        net = DenseEncoder(enc, patch, stride, channels_last=channels_last).eval()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # folded
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())  # the encoder keeps its own
        dense = net(x)
        ref = PerPatchEncoder(enc, patch, stride)(x)
        # and against the plain encoder on one cut-out patch
        i, j = 4, 2
        single = enc(x[1:2, :, i * stride : i * stride + patch, j * stride : j * stride + patch])[0]
    assert dense.shape == ref.shape == (2, enc.out_dim, 6, 4)
    assert (dense - ref).abs().max().item() < 1e-4
    assert (dense[1, :, i, j] - single).abs().max().item() < 1e-4


def test_fold_batchnorm_equals_eval_mode() -> None:
    from torch import nn

    from cytonet.infer.dense import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 3, 3, dilation=2), nn.BatchNorm2d(3)),  # nested, with a conv bias
        nn.BatchNorm2d(3, track_running_stats=False),  # no running statistics: not an affine map, kept
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
            assert m.running_mean is not None
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.rand(2, 1, 20, 17)
    with torch.no_grad():
        ref = net(x)
        fold_batchnorm(net)
        out = net(x)
    kinds = [type(m).__name__ for m in net.modules()]
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("Identity") == 2
    assert (out - ref).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in net[0].parameters())


def test_dense_refuses_same_padding_and_resnets() -> None:
    from cytonet.infer.dense import DenseError

    with pytest.raises(DenseError, match="padding=valid"):
        DenseEncoder(PaperEncoder(3, padding="same"), 121, 8)
    with pytest.raises(DenseError, match="per_patch"):
        DenseEncoder(build_encoder(load_config(None, ["model.encoder=resnet50"]).model), 224, 8)


def test_pyramid_mean_of_blocks_equals_pyramid_of_whole() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 21, 13)).astype(np.float32)
    whole = pyramid_mean(a, 3)
    part = pyramid_mean(a[:, 8:, 4:], 3)  # a block starting at multiples of 4
    for lvl in range(3):
        f = 2**lvl
        np.testing.assert_allclose(part[lvl], whole[lvl][:, 8 // f :, 4 // f :], rtol=1e-6)
    assert whole[2].shape == (3, 6, 4)
    for lvl in (1, 2):  # each pixel: the mean of the pixels of its window that lie inside the array
        f = 2**lvl
        ref = [
            [a[:, i * f : (i + 1) * f, j * f : (j + 1) * f].mean(axis=(1, 2)) for j in range(-(-13 // f))]
            for i in range(-(-21 // f))
        ]
        np.testing.assert_allclose(whole[lvl], np.array(ref).transpose(2, 0, 1), rtol=1e-6)


@pytest.mark.parametrize(("n_units", "n_workers"), [(23, 7), (7200, 64), (5, 8), (1000, 3)])
def test_assign_covers_every_unit_once_evenly_in_a_few_stretches(n_units: int, n_workers: int) -> None:
    """Every unit has one owner; the shares differ by at most a unit a run; and a worker of a large array takes
    a few stretches of neighbouring units: 800 sections of 9 blocks over 64 tasks, it touches at most 4 runs x
    (29 blocks: 5 sections), where dealing the units one by one touched 108 sections."""
    from cytonet.infer.blocks import RUNS_PER_WORKER

    shares = [assign(n_units, w, n_workers) for w in range(n_workers)]
    assert sorted(i for share in shares for i in share) == list(range(n_units))
    assert max(map(len, shares)) - min(map(len, shares)) <= RUNS_PER_WORKER
    stretches = [sum(1 for a, b in zip([-2, *share], share) if b != a + 1) for share in shares]
    assert max(stretches) <= RUNS_PER_WORKER
    if n_units == 7200:
        assert max(len({i // 9 for i in share}) for share in shares) <= RUNS_PER_WORKER * 5


# ---------------------------------------------------------------------------------------------------------
# run_infer


def run(root: Path, out: Path, *overrides: str, **kw: object) -> object:
    cfg = base_config(root, *overrides)
    return run_infer(cfg, DistEnv(), out, **kw)  # type: ignore[arg-type]


def test_progress_counts_blocks_megapixels_and_time_left() -> None:
    from cytonet.infer.progress import BlockProgress

    now = [100.0]
    p = BlockProgress(4, 8.0, bar=False, clock=lambda: now[0])
    now[0] = 101.0
    p.done(2.0)
    now[0] = 102.0
    p.done(2.0)
    assert p.line() == "2/4 blocks (50%), 2.0 MP/s, about 2 s left"
    now[0] = 400.0  # slower from here: 4 MP in 300 s
    assert p.line() == "2/4 blocks (50%), 0.0 MP/s, about 5 min left"
    p.done(4.0)
    assert p.line().startswith("3/4 blocks (75%)") and "left" not in p.line()  # every megapixel is done


def test_infer_logs_progress(root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import re

    from cytonet.infer import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="cytonet.infer.run"):
        run(root, root / "out-progress", "infer.cleanup=none")
    done = [int(m.group(1)) for m in re.finditer(r"infer: (\d+)/27 blocks \(", caplog.text)]
    assert done == list(range(1, 27))  # one line per block at EVERY_S=0, none after the last
    assert re.search(r"wrote 27 blocks \([\d.]+ MP of sections, [\d.]+ MP/s\)", caplog.text)


def test_a_rerun_lists_each_sections_markers_once_not_once_a_block(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun of a finished output (a requeued task) skips every block after one listing of each section's
    markers to plan, and one to see that it is complete: a listing per block made resuming quadratic (14 s for
    a paper-size section's 4366 blocks)."""
    out = root / "out-listings"
    run(root, out, "infer.cleanup=none")
    listed: list[str] = []
    real = writers.DoneMarkers.done_ids
    monkeypatch.setattr(writers.DoneMarkers, "done_ids", lambda self: listed.append(self.dir.parent.name) or real(self))
    again = run(root, out, "infer.cleanup=none")
    assert again.complete and again.written == 0 and again.skipped == 3 * 9  # type: ignore[attr-defined]
    assert sorted(listed) == sorted(2 * ["B00_s0000", "B00_s0001", "B01_s0000"]), listed


def test_grid_points_equal_per_patch_evaluation(root: Path) -> None:
    out = root / "out-basic"
    result = run(root, out)
    assert result.complete and result.written == 3 * 9  # 3 sections, 20 x 20 grid in 8 x 8 blocks
    assert set(result.stage_seconds) == {"read", "evaluate", "write", "wait"}
    assert all(result.stage_seconds[k] > 0 for k in ("read", "evaluate", "write"))
    cfg = base_config(root)
    clf = load_classifier(root / "probe")
    vol = out / "B00_s0001.ome.zarr"
    probs = read_volume(vol)["0"]
    labels = read_volume(vol)["labels/argmax/0"]
    assert probs.shape == (4, 20, 20) and labels.shape == (20, 20)
    reader = open_section(root / "sections/B00/B00_s0001.zarr")
    grid = Grid("B00_s0001", (160, 160), 8, 121, 8)
    rng = np.random.default_rng(1)
    points = [(0, 0), (19, 19), (7, 8), *[tuple(rng.integers(0, 20, 2)) for _ in range(12)]]
    worst = 0.0
    for i, j in points:
        y0, x0 = grid.first_patch_corner(int(i)), grid.first_patch_corner(int(j))
        patch = reader.read_image(1, y0, y0 + 121, x0, x0 + 121)
        x = torch.from_numpy(patch).float().div(255.0)[None, None]
        with torch.no_grad():
            p = torch.softmax(clf.head(clf.encoder(x)), dim=1)[0].numpy()
        worst = max(worst, float(np.abs(p - probs[:, i, j]).max()))
        assert labels[i, j] == AREAS[int(np.argmax(p))]
    assert worst < 1e-4, worst
    assert cfg.infer.format == "ome-zarr"


def test_provenance_and_ngff_metadata(root: Path) -> None:
    out = root / "out-basic"
    if not out.exists():
        run(root, out)
    meta = json.loads((out / "B00_s0000.ome.zarr" / "zarr.json").read_text())["attributes"]
    prov = meta["cytonet"]
    clf = load_classifier(root / "probe")
    assert prov["checkpoint"]["sha256"] == clf.sha256
    assert prov["stride_px"] == 8 and prov["pixel_size_um"] == 64.0
    assert prov["cytonet_version"] and prov["config"]["infer"]["stride_px"] == 8
    ms = meta["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 128.0, 128.0]
    # output pixel 0 lies at its patch centre, section pixel 4 (of 8 um): 32 um; level 1 between pixels 0 and 1
    assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == [0.0, 32.0, 32.0]
    assert ms["datasets"][1]["coordinateTransformations"][1]["translation"] == [0.0, 64.0, 64.0]
    assert prov["origin_um"] == 32.0
    # blosc-lz4 by default, in arrays whose chunks the writer encodes itself (cytonet.data.chunks)
    for name in ("0", "1", "labels/argmax/0"):
        arr = json.loads((out / "B00_s0000.ome.zarr" / name / "zarr.json").read_text())
        assert arr["codecs"][1]["configuration"]["cname"] == "lz4"
        assert open_chunked(out / "B00_s0000.ome.zarr" / name) is not None


@pytest.mark.parametrize(("patch", "stride", "factor"), [(121, 8, 1), (120, 6, 2), (9, 3, 3), (10, 1, 4)])
def test_ngff_coordinates_put_predictions_at_their_patch_centres(
    tmp_path: Path, patch: int, stride: int, factor: int
) -> None:
    """NGFF places pixel i at i * scale + translation (its centre). In the section's frame (section pixel j at
    j * its pixel size), level-0 pixel i lies at the mean position of the section pixels of the patch it was
    predicted from, and a level-l pixel at the mean position of the level-0 pixels it averages; the label
    images lie where the probabilities do."""
    section_um = 2.0
    model_um = section_um * factor
    grid = Grid("S", (50, 44), stride, patch, 8)
    spec = {
        "format": "ome-zarr", "pyramid_levels": 3, "area_ids": [2, 3], "area_names": ["a", "b"],
        "compression": "none", "output_pixel_size_um": model_um * stride, "model_pixel_size_um": model_um,
        "section_factor": factor, "chunk_px": 8, "shard_chunks": 0, "label_images": ["argmax", "cleaned"],
    }  # fmt: skip
    vol = writers.open_volume(tmp_path, grid, spec, {"settings": spec})
    image = json.loads((vol.path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    labels = json.loads((vol.path / "labels/cleaned/zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]

    def position(ms: dict, level: int, i: int, axis: int) -> float:  # type: ignore[type-arg]
        scale, shift = ms["datasets"][level]["coordinateTransformations"]
        return i * scale["scale"][axis] + shift["translation"][axis]

    for axis in (-2, -1):
        for i in (0, 1, 5):
            c = grid.first_patch_corner(i)
            under = np.arange(c * factor, (c + patch) * factor) * section_um  # the patch's section pixels
            assert position(image, 0, i, axis) == pytest.approx(under.mean())
        if patch % 2 and factor % 2:  # the patch has a middle section pixel: the grid point of masks and truth
            assert position(image, 0, 0, axis) == pytest.approx(grid.centre_section_px(0, 1, factor)[0] * section_um)
        for lvl in (1, 2):
            f = 2**lvl
            for j in (0, 3):
                window = [position(image, 0, i, axis) for i in range(j * f, (j + 1) * f)]
                assert position(image, lvl, j, axis) == pytest.approx(np.mean(window))
                assert position(labels, lvl, j, axis) == pytest.approx(position(image, lvl, j, axis))


def test_readable_by_ome_zarr_readers(root: Path) -> None:
    pytest.importorskip("ome_zarr")
    out = root / "out-basic"
    if not out.exists():
        run(root, out)
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(out / "B00_s0000.ome.zarr")))())
    image = nodes[0]
    assert [d.shape for d in image.data] == [(4, 20, 20), (4, 10, 10)]
    np.testing.assert_array_equal(np.asarray(image.data[0]), read_volume(out / "B00_s0000.ome.zarr")["0"])
    models = pytest.importorskip("ome_zarr_models")
    import zarr
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(str(out / "B00_s0000.ome.zarr"), mode="r"))
    assert models


def test_array_tasks_cover_every_block_once_and_match(root: Path) -> None:
    ref = root / "out-basic"
    if not ref.exists():
        run(root, ref)
    out = root / "out-tasks"
    for task in (2, 0, 1):
        run(root, out, task_id=task, num_tasks=3)
    assert_same_outputs(ref, out)
    writers_seen = {}
    for marker in (out / ".cytonet").glob("*/blocks/*.json"):
        info = json.loads(marker.read_text())
        writers_seen[f"{marker.parent.parent.name}/{marker.stem}"] = info["worker"]
    assert len(writers_seen) == 27 and set(writers_seen.values()) == {0, 1, 2}


def test_crash_then_rerun_gives_identical_output(root: Path) -> None:
    ref = root / "out-basic"
    if not ref.exists():
        run(root, ref)
    for phase in ("before", "after"):
        out = root / f"out-crash-{phase}"
        cmd = [CYTONET, "infer", str(root / "infer.yaml"), "--out", str(out)]
        env = dict(os.environ, CYTONET_INFER_CRASH=f"5:{phase}")
        crashed = procs.run(cmd, 300, env=env)
        assert crashed.returncode == 3, procs.tail(crashed.stderr)
        done = list((out / ".cytonet").glob("*/blocks/*.json"))
        assert len(done) == 5
        rerun = procs.run(cmd, 300)
        assert rerun.returncode == 0, procs.tail(rerun.stderr)
        assert "skipped 5 done" in rerun.stderr
        assert_same_outputs(ref, out)


def test_torchrun_two_ranks_match_one_process(root: Path) -> None:
    ref = root / "out-basic"
    if not ref.exists():
        run(root, ref)
    out = root / "out-torchrun"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
        CYTONET, "infer", str(root / "infer.yaml"), "--out", str(out),
    ]  # fmt: skip
    r = procs.run(cmd, 300)
    assert r.returncode == 0, procs.tail(r.stderr)
    assert_same_outputs(ref, out, atol=1e-6)
    ranks = {json.loads(m.read_text())["rank"] for m in (out / ".cytonet").glob("*/blocks/*.json")}
    assert ranks == {0, 1}


@pytest.mark.parametrize("fmt", ["ome-zarr", "hdf5"])
def test_several_io_threads_give_the_same_output(root: Path, fmt: str) -> None:
    """Three reader and three writer threads (blocks read four ahead, written out of order) write the same
    bytes as one of each; HDF5 keeps one writer per file."""
    one, three = root / f"out-io1-{fmt}", root / f"out-io3-{fmt}"
    switch_interval = sys.getswitchinterval()
    run(root, one, f"infer.format={fmt}", "infer.io_threads=1")
    result = run(root, three, f"infer.format={fmt}", "infer.io_threads=3")
    assert result.complete and result.written == 3 * 9  # type: ignore[attr-defined]
    assert_same_outputs(one, three)
    assert sys.getswitchinterval() == switch_interval  # shortened while the threads ran, then restored


def test_readers_run_ahead_across_sections_and_close_none_under_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three readers, small blocks most of which are off the region of interest (so the readers' callbacks
    submit most reads, running ahead into the next sections), HDF5 section stores: the same bytes as one
    reader, and no section reader is closed while a read of it is going on (a reader is closed once no read
    of its section is going on, not once the model has taken its last read)."""
    from threading import Lock

    from cytonet.data.sections import SectionReader

    make_sections(tmp_path / "sections", {"B00": 3}, backend="hdf5")
    busy: dict[int, int] = {}  # id of a section reader -> reads of it going on
    closed_busy: list[str] = []
    guard = Lock()

    read = BlockReader.read

    def counted_read(self: BlockReader, reader: SectionReader, *a: object) -> object:
        with guard:
            busy[id(reader)] = busy.get(id(reader), 0) + 1
        try:
            return read(self, reader, *a)  # type: ignore[arg-type]
        finally:
            with guard:
                busy[id(reader)] -= 1

    close = SectionReader.close

    def checked_close(self: SectionReader) -> None:
        with guard:
            if busy.get(id(self), 0):
                closed_busy.append(self.path.name)
        close(self)

    monkeypatch.setattr(BlockReader, "read", counted_read)
    monkeypatch.setattr(SectionReader, "close", checked_close)
    overrides = ("infer.chunk_px=4", "infer.roi=centerline")
    write_model(base_config(tmp_path, *overrides), tmp_path / "probe")
    outs = []
    for n_io in (1, 3):
        out = tmp_path / f"out-io{n_io}"
        result = run_infer(base_config(tmp_path, *overrides, f"infer.io_threads={n_io}"), DistEnv(), out)
        assert result.complete and result.written == 3 * 25
        outs.append(out)
    assert_same_outputs(*outs)
    assert closed_busy == []


def test_a_section_store_failing_to_open_mid_run_fails_the_run_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second section's store fails to open when its first block is read (reads are then submitted from
    the readers' callbacks): the run fails with the store's error, which no callback swallows into a log
    line, and a rerun finishes the job."""
    import cytonet.infer.run as infer_run

    make_sections(tmp_path / "sections", {"B00": 2})
    overrides = ("infer.chunk_px=4", "infer.roi=centerline", "infer.io_threads=2")
    write_model(base_config(tmp_path, *overrides), tmp_path / "probe")
    open_section_ = infer_run.open_section
    opened: list[str] = []

    def failing(path: str | Path) -> object:
        opened.append(Path(path).stem)
        if opened.count("B00_s0001") > 1:  # planning opened it; reading it is what fails
            raise InputError(f"cannot open section store {path}: damaged")
        return open_section_(path)

    monkeypatch.setattr(infer_run, "open_section", failing)
    with pytest.raises(InputError, match=r"s0001.*damaged"):
        run_infer(base_config(tmp_path, *overrides), DistEnv(), tmp_path / "out")
    monkeypatch.undo()
    assert "exception calling callback" not in caplog.text
    result = run_infer(base_config(tmp_path, *overrides), DistEnv(), tmp_path / "out")  # the store is back
    assert result.complete and result.skipped > 0  # what the failed run had written stays done


@pytest.mark.parametrize("fmt", ["hdf5", "sharded"])
def test_hdf5_and_sharded_zarr_equal_plain_zarr(root: Path, fmt: str) -> None:
    ref = root / "out-basic"
    if not ref.exists():
        run(root, ref)
    out = root / f"out-{fmt}"
    if fmt == "hdf5":
        run(root, out, "infer.format=hdf5", task_id=1, num_tasks=2)
        run(root, out, "infer.format=hdf5", task_id=0, num_tasks=2)
        for name in ("B00_s0000", "B01_s0000"):
            a, b = read_volume(ref / f"{name}.ome.zarr"), read_volume(out / f"{name}.h5")
            np.testing.assert_array_equal(a["0"], b["probabilities/0"])
            np.testing.assert_array_equal(a["labels/cleaned/1"], b["labels/cleaned/1"])
    else:
        run(root, out, "infer.chunk_px=4", "infer.shard_chunks=2")
        a, b = read_volume(ref / "B00_s0000.ome.zarr"), read_volume(out / "B00_s0000.ome.zarr")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_reads_into_reused_memory_equal_fresh_conversions(root: Path) -> None:
    """BlockReader converts into buffers given back by earlier blocks (larger or smaller read boxes): the input
    is the box's bytes / 255 exactly, as a fresh conversion gives it."""
    cfg = base_config(root)
    job = select_sections(cfg, load_classifier(root / "probe"))[0]
    stage1 = BlockReader(cfg, torch.device("cpu"), 2)
    blocks = list(job.grid.blocks())
    boxes = {job.grid.read_box(b) for b in blocks}
    assert len({(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes}) > 1  # the edge blocks are smaller
    with open_section(job.path) as reader:
        for block in [*blocks, *reversed(blocks)]:
            x, mask = stage1.read(reader, job, block)
            assert x is not None and mask.any()
            fresh = torch.from_numpy(reader.read_image(job.factor, *job.grid.read_box(block))).float() / 255.0
            assert torch.equal(x[0, 0], fresh)
            stage1.give_back(x)


def test_runs_reuse_the_process_input_buffers_and_a_failed_run_returns_them(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With host memory reused (the default), a run reserves its float inputs in the process's pool, as large
    as its largest read box, and the next run takes the same buffers instead of mapping new ones; a run that
    fails with reads queued gives them back all the same."""
    from cytonet.hostmem import process_pool
    from cytonet.infer.run import BlockEvaluator

    pool = process_pool(torch.float32, 1)

    def held() -> set[int]:
        return {b.data_ptr() for b in pool._free}

    run(root, tmp_path / "a")
    first = held()
    assert first and not pool._lent
    run(root, tmp_path / "b")
    assert held() == first  # the same memory: nothing dropped, nothing new

    forward = BlockEvaluator.forward
    calls = []

    def failing(self: BlockEvaluator, data: tuple[torch.Tensor | None, np.ndarray]) -> np.ndarray | None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the model failed")
        return forward(self, data)

    monkeypatch.setattr(BlockEvaluator, "forward", failing)
    with pytest.raises(RuntimeError, match="the model failed"):
        run(root, tmp_path / "c")
    assert not pool._lent and held() == first


def test_smallest_read_box_of_the_first_section_goes_first(root: Path) -> None:
    jobs = select_sections(base_config(root), load_classifier(root / "probe"))
    todo = [(job, b) for job in jobs for b in job.grid.blocks()]

    def area(item: tuple[object, Block]) -> int:
        y0, y1, x0, x1 = jobs[0].grid.read_box(item[1])
        return (y1 - y0) * (x1 - x0)

    ordered = _smallest_first(todo)
    assert ordered[0][0] is jobs[0] and area(ordered[0]) == min(area(t) for t in todo if t[0] is jobs[0])
    assert area(ordered[0]) < area(todo[0])
    assert ordered[1:] == [t for t in todo if t is not ordered[0]]  # the rest in its order
    assert _smallest_first([]) == []


def test_empty_blocks_free_their_read_and_write_slots(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one reader and one writer: while the model is on a block, the readers go past the empty blocks
    after it (they hold no input) to the next block with tissue; and the model goes past empty blocks while
    a write of probabilities is still in flight (theirs hold none). Before, both waited: a run of empty
    blocks left the readers idle, and every block waited for the write slot."""
    from threading import Event

    from cytonet.infer.run import BlockEvaluator, _process

    cfg = base_config(
        root, "infer.io_threads=1", "infer.chunk_px=4", "infer.roi=centerline"
    )  # blocks off the band are empty
    clf = load_classifier(root / "probe")
    job = select_sections(cfg, clf)[0]
    probe = BlockReader(cfg, torch.device("cpu"))
    with open_section(job.path) as reader:
        empty = {b.id: probe.read(reader, job, b)[0] is None for b in job.grid.blocks()}
    full = [b for b in job.grid.blocks() if not empty[b.id]]
    gap = [b for b in job.grid.blocks() if empty[b.id]][:4]
    assert len(full) >= 2 and len(gap) == 4
    todo = [(job, full[0]), *((job, b) for b in gap), (job, full[1])]  # tissue, 4 empty, tissue
    first, last = full[0].id, full[1].id

    read_done = {b.id: Event() for _, b in todo}

    class Reader(BlockReader):
        def read(self, *args: object, **kw: object) -> tuple[torch.Tensor | None, np.ndarray]:
            out = super().read(*args, **kw)  # type: ignore[arg-type]
            read_done[args[2].id].set()  # type: ignore[attr-defined]
            return out

    model_on: dict[int, Event] = {b.id: Event() for _, b in todo}

    class Evaluator(BlockEvaluator):
        def forward(self, data: tuple[torch.Tensor | None, np.ndarray]) -> np.ndarray | None:
            n = sum(e.is_set() for e in model_on.values())
            block = todo[n][1]
            model_on[block.id].set()
            if block.id == first:  # the last block is read while the model is still on the first
                assert read_done[last].wait(30), "the reads stopped at the empty blocks"
            return super().forward(data)

    release = Event()
    write_block = writers.ZarrVolume.write_block

    def slow_write(self: writers.ZarrVolume, block: Block, *a: object) -> None:
        if block.id == first:  # the first block's write lasts until the model is on the last block
            assert release.wait(30), "the model waited for a write slot at an empty block"
        write_block(self, block, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(writers.ZarrVolume, "write_block", slow_write)
    original = Evaluator.forward

    def forward(self: Evaluator, data: tuple[torch.Tensor | None, np.ndarray]) -> np.ndarray | None:
        out = original(self, data)
        if model_on[last].is_set():
            release.set()
        return out

    monkeypatch.setattr(Evaluator, "forward", forward)
    who = {"worker": 0, "n_workers": 1, "task_id": 0, "rank": 0}
    written, _, _ = _process(
        cfg,
        clf,
        tmp_path,
        todo,
        Reader(cfg, torch.device("cpu"), 3),
        lambda: Evaluator(cfg, clf, torch.device("cpu")),
        who,
        1,
    )
    assert written == len(todo) and release.is_set()
    markers = writers.DoneMarkers(tmp_path, job.name)
    assert all(markers.is_done(b) for _, b in todo)


def test_settings_mismatch_and_bad_model_are_refused(root: Path, tmp_path: Path) -> None:
    out = root / "out-basic"
    if not out.exists():
        run(root, out)
    before = read_volume(out / "B00_s0000.ome.zarr")
    assert load_config(out / "infer.config.yaml", []).infer.stride_px == 8  # the run that wrote the outputs
    with pytest.raises(InputError, match="stride_px"):
        run(root, out, "infer.stride_px=16")
    np.testing.assert_array_equal(before["0"], read_volume(out / "B00_s0000.ome.zarr")["0"])
    assert load_config(out / "infer.config.yaml", []).infer.stride_px == 8  # not the refused run's
    bad = tmp_path / "probe"
    bad.mkdir()
    (bad / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot load the model"):
        run(root, tmp_path / "o", f"infer.model_from={bad}")
    r = subprocess.run(
        [CYTONET, "infer", str(root / "infer.yaml"), "infer.model_from=/nonexistent", "--out", str(tmp_path / "o2")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "/nonexistent/model.pt does not exist" in r.stderr
    # fp16 needs CUDA: refused before --overwrite removes anything
    with pytest.raises(ConfigError, match=r"infer\.precision='fp16' is invalid on cpu"):
        run(root, out, "infer.precision=fp16", overwrite=True)
    np.testing.assert_array_equal(before["0"], read_volume(out / "B00_s0000.ome.zarr")["0"])


def test_stride_larger_than_the_patch_is_refused_before_overwrite_removes_anything(tmp_path: Path) -> None:
    """An output pixel's tissue footprint must lie in its patch's read box: stride_px <= the patch size. A
    larger one is a ConfigError naming infer.stride_px, raised before --overwrite removes the outputs (it was
    a broadcasting ValueError, after them)."""
    make_sections(tmp_path / "sections", {"B00": 1})
    write_model(base_config(tmp_path), tmp_path / "probe")
    out = tmp_path / "out"
    assert run_infer(base_config(tmp_path, "infer.stride_px=121"), DistEnv(), out).complete  # the largest stride
    before = read_volume(out / "B00_s0000.ome.zarr")
    with pytest.raises(ConfigError, match=r"infer\.stride_px=122 .* \(121 px\)"):
        run_infer(base_config(tmp_path, "infer.stride_px=122"), DistEnv(), out, overwrite=True)
    after = read_volume(out / "B00_s0000.ome.zarr")
    assert after.keys() == before.keys()
    np.testing.assert_array_equal(before["0"], after["0"])
    assert list((out / ".cytonet/B00_s0000/blocks").glob("*.json"))


def test_dense_mode_for_an_encoder_it_cannot_run_is_refused_before_overwrite(tmp_path: Path) -> None:
    """infer.mode=dense with a 'same'-padding encoder: a config error naming infer.mode (exit 2, not
    'unexpected'), raised before --overwrite removes the per-patch run's outputs."""
    from cytonet.errors import CytonetError
    from cytonet.infer.dense import DenseError

    make_sections(tmp_path / "sections", {"B00": 1})
    write_model(base_config(tmp_path, "model.padding=same"), tmp_path / "probe")
    out = tmp_path / "out"
    cheap = ("infer.stride_px=40", "infer.cleanup=none")
    assert run_infer(base_config(tmp_path, *cheap, "infer.mode=per_patch"), DistEnv(), out).complete
    before = read_volume(out / "B00_s0000.ome.zarr")
    with pytest.raises(ConfigError, match=r"infer\.mode=dense .*padding=valid.*infer\.mode=per_patch") as exc:
        run_infer(base_config(tmp_path, *cheap), DistEnv(), out, overwrite=True)
    assert isinstance(exc.value, DenseError) and isinstance(exc.value, CytonetError | ValueError)
    np.testing.assert_array_equal(before["0"], read_volume(out / "B00_s0000.ome.zarr")["0"])
    save_config(base_config(tmp_path, *cheap), tmp_path, name="dense.yaml")
    r = subprocess.run(
        [CYTONET, "infer", str(tmp_path / "dense.yaml"), "--out", str(out), "--overwrite"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "infer.mode=dense" in r.stderr and "unexpected" not in r.stderr, r.stderr
    np.testing.assert_array_equal(before["0"], read_volume(out / "B00_s0000.ome.zarr")["0"])


def test_overwrite_removes_only_inference_volumes_of_its_format(tmp_path: Path) -> None:
    """--overwrite replaces a cytonet HDF5 volume, never a file of the same name in another folder."""
    from cytonet.errors import OutputExistsError

    store = make_sections(tmp_path / "sections", {"B00": 1}, backend="hdf5")[0]
    cheap = ("infer.stride_px=40", "infer.cleanup=none")
    write_model(base_config(tmp_path, *cheap), tmp_path / "probe")
    hdf5 = base_config(tmp_path, *cheap, "infer.format=hdf5")
    out = tmp_path / "out"
    assert run_infer(hdf5, DistEnv(), out).written == 1
    again = run_infer(hdf5, DistEnv(), out, overwrite=True)
    assert again.written == 1 and again.skipped == 0  # the inference volume was removed and written again
    volume = out / "B00_s0000.h5"
    volume.write_bytes(volume.read_bytes()[: volume.stat().st_size // 2])  # a writer killed mid-flush
    with pytest.raises(InputError, match=r"cannot read the output volume .*rerun with --overwrite"):
        run_infer(hdf5, DistEnv(), out)
    assert run_infer(hdf5, DistEnv(), out, overwrite=True).written == 1  # still ours (its state folder): replaced
    # Someone's file under a volume's name, in a folder inference never wrote; the folder of HDF5 section
    # stores (hdf5 output: the store is where the volume would be; zarr output: beside them): refused, also with
    # --overwrite, nothing deleted.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "B00_s0000.h5").write_text("mine")
    data = store.read_bytes()
    for cfg, folder in (
        (hdf5, tmp_path / "theirs"),
        (hdf5, store.parent),
        (base_config(tmp_path, *cheap), store.parent),
    ):
        for overwrite in (False, True):
            with pytest.raises(OutputExistsError, match=rf"{folder} holds B00_s0000.h5 but no inference outputs"):
                run_infer(cfg, DistEnv(), folder, overwrite=overwrite)
    assert (tmp_path / "theirs" / "B00_s0000.h5").read_text() == "mine"
    assert store.read_bytes() == data and sorted(p.name for p in store.parent.iterdir()) == ["B00_s0000.h5"]


def test_an_output_folder_of_anything_but_inference_is_refused_also_with_overwrite(root: Path, tmp_path: Path) -> None:
    """--out at a training run, the sections folder, one section, a folder of the user's files or a file: refused
    before anything is written there, also with --overwrite (it removes only the sections' volumes); an
    earlier inference's folder, and one whose state is gone but whose config is there, are taken."""
    from cytonet.errors import OutputExistsError

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    (tmp_path / "file").write_text("mine\n")
    section = next((root / "sections").iterdir())
    for out in (root / "probe", root / "sections", section, notes, tmp_path / "file"):
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else None
        for overwrite in (False, True):
            with pytest.raises(OutputExistsError, match=rf"infer: output (folder )?{out} (holds|exists and is not)"):
                run(root, out, "infer.sections=[B01_s0000]", overwrite=overwrite)
        assert (sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else None) == before
    assert (tmp_path / "file").read_text() == "mine\n"
    out = tmp_path / "out"
    run(root, out, "infer.sections=[B01_s0000]", "infer.cleanup=none")
    run(root, out, "infer.sections=[B01_s0000]", "infer.cleanup=none")  # its own folder: a rerun
    shutil.rmtree(out / writers.STATE_DIR)
    run(root, out, "infer.sections=[B01_s0000]", "infer.cleanup=none", overwrite=True)
    assert (out / writers.STATE_DIR).is_dir()


def test_sections_of_the_splits_missing_below_sections_dir_are_refused(root: Path, tmp_path: Path) -> None:
    """With infer.splits (the demo's held-out sections), every section the model records in those splits must
    be there: a partial copy used to give a partial map without a word. Naming sections still maps a subset."""
    state = torch.load(root / "probe" / MODEL_FILE, weights_only=True)
    state["sections"] = [
        {"name": "B00_s0000", "split": "test"},
        {"name": "B00_s0001", "split": "unseen"},
        {"name": "B01_s0000", "split": "unseen"},
        {"name": "B01_s0001", "split": "unseen"},  # not below sections/
    ]
    (tmp_path / "probe").mkdir()
    torch.save(state, tmp_path / "probe" / MODEL_FILE)
    common = (f"infer.model_from={tmp_path / 'probe'}", f"infer.sections_dir={root / 'sections'}", "infer.stride_px=40")
    with pytest.raises(
        InputError, match=r"1 of the 3 sections of the splits \['unseen'\] .* are not below .*B01_s0001"
    ):
        run(root, tmp_path / "out", *common, "infer.splits=[unseen]")
    assert not (tmp_path / "out").exists()
    done = run(root, tmp_path / "out", *common, "infer.splits=[test]")
    assert done.complete and sorted(p.name for p in (tmp_path / "out").glob("*.ome.zarr")) == ["B00_s0000.ome.zarr"]  # type: ignore[attr-defined]
    assert run(root, tmp_path / "out2", *common, "infer.sections=[B00_s0001]").complete  # type: ignore[attr-defined]


def test_hdf5_output_that_may_not_fit_is_refused_before_hdf5_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HDF5 block write that fails for want of space leaves HDF5 to crash the interpreter at exit (exit
    139): a block that may not fit is refused with ENOSPC naming the volume, before HDF5 writes it."""
    import errno
    import shutil
    from collections import namedtuple

    make_sections(tmp_path / "sections", {"B00": 1})
    cfg = base_config(tmp_path, "infer.stride_px=40", "infer.cleanup=none", "infer.format=hdf5")
    write_model(cfg, tmp_path / "probe")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**19, 2**19))
    with pytest.raises(OSError) as info:
        run_infer(cfg, DistEnv(), tmp_path / "out")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "out" / "B00_s0000.h5")
    assert "a block needs up to" in str(info.value)


def test_a_finished_map_on_a_read_only_mount_is_skipped(root: Path, tmp_path: Path) -> None:
    """A rerun over finished outputs on a read-only mount writes nothing (its config file, the clean-up's lock)
    and succeeds. Needs root for the bind mount."""
    from procs import read_only_view

    out = tmp_path / "out"
    assert run(root, out, "infer.stride_px=40", "infer.cleanup=knn2d").complete  # type: ignore[attr-defined]
    with read_only_view(out, tmp_path / "ro") as ro:
        again = run(root, ro, "infer.stride_px=40", "infer.cleanup=knn2d")
        assert again.complete and again.written == 0 and again.cleaned == []  # type: ignore[attr-defined]


def test_named_sections_open_only_their_stores(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer.sections opens the stores with those file names, not every store beside them; a store under
    another file name is still found (by opening the rest), and two stores of one section are refused."""
    import shutil

    from cytonet.infer import run as infer_run

    shutil.copytree(root / "sections", tmp_path / "sections")
    opened: list[str] = []
    real_open = infer_run.open_section

    def counting_open(path: Path) -> object:
        opened.append(Path(path).name)
        return real_open(path)

    monkeypatch.setattr(infer_run, "open_section", counting_open)
    clf = load_classifier(root / "probe")

    def select(*overrides: str) -> list[str]:
        opened.clear()
        cfg = base_config(tmp_path, f"infer.sections_dir={tmp_path / 'sections'}", *overrides)
        return [job.name for job in select_sections(cfg, clf)]

    assert select("infer.sections=[B00_s0001]") == ["B00_s0001"] and opened == ["B00_s0001.zarr"]
    assert select() == ["B00_s0000", "B00_s0001", "B01_s0000"] and len(opened) == 3
    stores = {p.name: p for p in (tmp_path / "sections").rglob("*.zarr")}
    stores["B00_s0001.zarr"].rename(stores["B00_s0001.zarr"].with_name("renamed.zarr"))
    assert select("infer.sections=[B00_s0001]") == ["B00_s0001"] and len(opened) == 3
    shutil.copytree(stores["B01_s0000.zarr"], stores["B01_s0000.zarr"].with_name("copy.zarr"))
    with pytest.raises(InputError, match=r"two section stores hold section B01_s0000: .*B01_s0000\.zarr and .*copy"):
        select("infer.sections=[B00_s0001]")


def test_image_levels_give_the_same_maps_without_reading_the_full_resolution(tmp_path: Path) -> None:
    """A model at twice the section's pixel size reads the stored level x2: same maps as averaging the full
    resolution, and the full resolution is not read (zeroed here, it would change every probability)."""
    import zarr

    for name, levels in (("plain", ()), ("levels", (2, 4))):
        make_sections(tmp_path / name / "sections", {"B00": 1}, size=176, image_levels=levels)
        cfg = base_config(tmp_path / name)
        write_model(cfg, tmp_path / name / "probe", pixel_um=16.0)
        if levels:
            zarr.open_array(str(tmp_path / name / "sections/B00/B00_s0000.zarr/image"), mode="r+")[...] = 0
        assert run_infer(cfg, DistEnv(), tmp_path / name / "out").complete
    assert_same_outputs(tmp_path / "plain/out", tmp_path / "levels/out")
    assert read_volume(tmp_path / "plain/out/B00_s0000.ome.zarr")["0"].shape == (4, 11, 11)


def test_blocks_without_tissue_are_skipped_and_background(tmp_path: Path) -> None:
    """A section whose right half is bare slide: those blocks are written as zeros without evaluation."""
    size = 160
    meta = SectionMeta(brain="B09", section_index=0, z_mm=0.0, pixel_size_um=8.0, shape=(size, size))
    img = np.full((size, size), 245, np.uint8)
    img[:, :64] = np.random.default_rng(0).integers(0, 200, (size, 64), dtype=np.uint8)
    with create_section(tmp_path / "sections/B09_s0000.zarr", meta, chunk_px=64, compression="none") as w:
        w.write("image", 0, 0, img)
    cfg = base_config(tmp_path)
    write_model(cfg, tmp_path / "probe")
    result = run_infer(cfg, DistEnv(), tmp_path / "out")
    assert result.complete
    vol = read_volume(tmp_path / "out/B09_s0000.ome.zarr")
    assert (vol["labels/argmax/0"][:, 8:] == 0).all() and (vol["0"][:, :, 8:] == 0).all()
    assert (vol["labels/argmax/0"][:, :8] > 0).all()
    np.testing.assert_allclose(vol["0"][:, :, :8].sum(axis=0), 1.0, rtol=1e-5)
    tissue = [json.loads(m.read_text())["tissue_px"] for m in (tmp_path / "out/.cytonet").glob("*/blocks/*.json")]
    assert sorted(tissue) == [0, 0, 0, 64, 64, 64] or 0 in tissue


def test_truth_at_grid_reads_the_labels_at_patch_centres(root: Path) -> None:
    from cytonet.infer.evaluate import truth_at_grid
    from cytonet.infer.run import SectionJob

    path = str(root / "sections/B01/B01_s0000.zarr")
    grid = Grid("B01_s0000", (170, 170), 8, 121, 8)  # a grid reaching past the 160 px section: truth 0 there
    truth = truth_at_grid(path, SectionJob("B01_s0000", path, "B01", 0.0, 1, grid))
    centres = grid.centre_section_px(0, grid.shape[0], 1)
    assert truth.shape == (22, 22) and centres[-1] >= 160
    with open_section(path) as r:
        labels = r.read("labels")
    inside = centres < 160
    np.testing.assert_array_equal(truth[np.ix_(inside, inside)], labels[np.ix_(centres[inside], centres[inside])])
    assert (truth[~inside] == 0).all() and (truth[:, ~inside] == 0).all() and (truth > 0).any()


def test_roi_cortex_predicts_only_inside_the_labelled_cortex(root: Path) -> None:
    out = root / "out-roi"
    run(root, out, "infer.roi=cortex", "infer.cleanup=none")
    labels = read_volume(out / "B01_s0000.ome.zarr")["labels/argmax/0"]
    grid = Grid("B01_s0000", (160, 160), 8, 121, 8)
    centres = np.array([grid.centre_px(i) for i in range(20)])
    with open_section(root / "sections/B01/B01_s0000.zarr") as r:
        truth = r.read("labels")[np.ix_(centres, centres)]
    assert ((labels > 0) == (truth >= 2)).all()
    assert (truth >= 2).sum() > 50


# ---------------------------------------------------------------------------------------------------------
# Clean-up (seed 001)


def test_knn_cleanup_relabels_small_islands_from_seeds() -> None:
    lab = np.zeros((30, 30), np.uint16)
    lab[:, :15] = 2
    lab[:, 15:] = 3
    lab[5:8, 3:6] = 3  # island of 3 inside area 2
    lab[20, 25] = 2  # single pixel of 2 inside area 3
    lab[0:2, 0:2] = 0  # unlabelled stays unlabelled
    seeds = seed_mask(lab, 1)
    assert not seeds[5:8, 3:6].any() and not seeds[20, 25] and seeds[15, 3]
    out = knn_cleanup(lab, grid_axes(lab.shape, 1.0), k=5, components=1)
    assert (out[:, 2:15] == 2).all() and (out[:, 15:] == 3).all() and (out[0:2, 0:2] == 0).all()
    # with two components kept per area the island of 3 survives
    out2 = knn_cleanup(lab, grid_axes(lab.shape, 1.0), k=5, components=2)
    assert (out2[5:8, 3:6] == 3).all()


def test_cleanup_keeps_m_i_components_per_area() -> None:
    """Seed 001's m_i: one m per area. Area 3 in two true pieces keeps both with m_3 = 2, while area 2's stray
    piece is still relabelled with m_2 = 1; one m for both could not do either without the other."""
    lab = np.full((30, 40), 2, np.uint16)
    lab[2:12, 28:38] = 3
    lab[18:28, 28:38] = 3  # area 3: two pieces of 100 px
    lab[4:6, 4:6] = 4
    lab[20:28, 2:10] = 4  # area 4: a piece of 64 px and a stray one of 4 px
    pos = grid_axes(lab.shape, 1.0)
    out = knn_cleanup(lab, pos, k=5, components=1, per_area={3: 2})
    assert (out == 3).sum() == 200 and (out[4:6, 4:6] == 2).all() and (out[20:28, 2:10] == 4).all()
    one = knn_cleanup(lab, pos, k=5, components=1)
    assert (one == 3).sum() == 100  # m = 1 loses a piece of area 3
    two = knn_cleanup(lab, pos, k=5, components=2)
    assert (two[4:6, 4:6] == 4).all()  # m = 2 keeps area 4's stray piece
    np.testing.assert_array_equal(
        stack_cleanup([lab], [0.0], 1.0, k=5, components=1, per_area={3: 2})[0],
        knn_cleanup(lab, grid_axes(lab.shape, 1.0), k=5, components=1, per_area={3: 2}),
    )


def _cleanup_by_the_formula(labels: np.ndarray, positions: np.ndarray, k: int, components: int) -> np.ndarray:
    """Seed 001's relabelling spelt out in full: every point's position, one query, a (points, k, areas) vote."""
    from scipy.spatial import cKDTree

    seeds = seed_mask(labels, components)
    out = labels.copy()
    todo = (labels != 0) & ~seeds
    _, idx = cKDTree(positions[seeds]).query(positions[todo], k=k)
    votes = labels[seeds][idx]
    areas = np.unique(labels[seeds])
    out[todo] = areas[np.argmax((votes[:, :, None] == areas).sum(axis=1), axis=1)]
    return out


@pytest.mark.parametrize("batch", [1, 7, 1 << 18])
def test_batched_cleanup_equals_the_formula_over_the_whole_grid(batch: int) -> None:
    """The clean-up relabels a few points at a time from their indices (a section's whole grid of positions
    would take 16-24 bytes an output pixel): the same labels, ties included, as one query over all positions."""
    rng = np.random.default_rng(3)
    lab = np.repeat(np.repeat(rng.integers(1, 7, (12, 16)), 4, axis=0), 4, axis=1).astype(np.uint16)
    noisy = rng.random(lab.shape) < 0.3
    lab[noisy] = rng.integers(0, 7, int(noisy.sum()))
    yy, xx = np.meshgrid(np.arange(48) * 2.5, np.arange(64) * 2.5, indexing="ij")
    want = _cleanup_by_the_formula(lab, np.stack([yy, xx], axis=-1), k=6, components=2)
    got = knn_cleanup(lab, grid_axes(lab.shape, 2.5), k=6, components=2, batch=batch)
    assert (got != lab).sum() > 100  # the noise was relabelled
    np.testing.assert_array_equal(got, want)
    z = np.array([0.0, 30.0, 10.0])
    vol = np.stack([lab, np.roll(lab, 5, axis=1), lab[::-1]])
    pos = np.stack(np.broadcast_arrays(z[:, None, None], yy[None], xx[None]), axis=-1)
    np.testing.assert_array_equal(
        knn_cleanup(vol, [z, *grid_axes(lab.shape, 2.5)], k=6, components=2, batch=batch),
        _cleanup_by_the_formula(vol, pos, k=6, components=2),
    )


def test_label_pyramid_takes_the_most_frequent_label_of_each_window() -> None:
    """Level l of the cleaned map: per 2^l window, its most frequent non-zero label (the smallest id among
    ties; 0 where the window has none), at the edges over the part of the window inside the map."""
    from cytonet.infer.run import label_pyramid

    class Grid:
        def level_shape(self, lvl: int) -> tuple[int, int]:
            return (-(-lab.shape[0] // 2**lvl), -(-lab.shape[1] // 2**lvl))

    class Vol:
        levels, grid = 3, Grid()

    rng = np.random.default_rng(0)
    lab = np.repeat(np.repeat(rng.integers(0, 7, (5, 5)), 5, axis=0), 3, axis=1)[:21, :14].astype(np.uint16)
    lab[rng.random(lab.shape) < 0.2] = 5  # an area everywhere, the others in boxes of their own
    lab[:8, :8] = 0
    lab[20, 13] = 9  # one pixel, in the last (partial) window
    levels = label_pyramid(Vol(), lab)  # type: ignore[arg-type]
    assert [lv.shape for lv in levels] == [(21, 14), (11, 7), (6, 4)]
    for lvl in (1, 2):
        f = 2**lvl
        for y, x in np.ndindex(levels[lvl].shape):
            window = lab[y * f : (y + 1) * f, x * f : (x + 1) * f]
            counts = np.bincount(window[window > 0].ravel(), minlength=10)
            assert levels[lvl][y, x] == (counts.argmax() if counts.any() else 0), (lvl, y, x)


def test_cleanup_components_per_area_by_name(root: Path) -> None:
    """infer.cleanup_components_per_area names the model's areas; an unknown name is refused before anything is
    written, naming the key and the model's areas; the setting is part of the volume's settings."""
    out = root / "out-per-area"
    with pytest.raises(ConfigError, match=r"infer\.cleanup_components_per_area names \['hOc9'\].*big, mid"):
        run(root, out, "infer.cleanup_components_per_area={hOc9: 2}", "infer.sections=[B00_s0000]")
    assert not out.exists()
    run(root, out, "infer.cleanup_components_per_area={small: 3}", "infer.sections=[B00_s0000]")
    attrs = writers.ZarrVolume.stored_attrs(out / "B00_s0000.ome.zarr")
    assert attrs["settings"]["cleanup_components_per_area"] == {"4": 3}


def test_3d_cleanup_uses_neighbouring_sections() -> None:
    """A blob that is the only piece of its area in its own section (kept by the 2D clean-up) is a small
    second piece of that area in the stack (relabelled by the 3D clean-up)."""
    side = np.full((10, 10), 2, np.uint16)
    side[:, 6:] = 3
    middle = np.full((10, 10), 2, np.uint16)
    middle[4:6, 1:3] = 3
    flat = knn_cleanup(middle, grid_axes(middle.shape, 10.0), k=3, components=1)
    assert (flat[4:6, 1:3] == 3).all()
    out = stack_cleanup([middle, side, side.copy()], [40.0, 0.0, 20.0], pixel_um=10.0, k=3, components=1)
    assert (out[0] == 2).all()
    np.testing.assert_array_equal(out[1], side)
    np.testing.assert_array_equal(out[2], side)


def test_3d_cleanup_of_a_brain_that_gained_a_section_equals_one_run(root: Path) -> None:
    """knn3d into one folder: a run over one of B00's sections, then a run over both, cleans the brain again
    as a whole (the markers name the sections cleaned together): the same outputs as one run over both. Before,
    the second run saw the first section's marker and skipped the brain, leaving the new one uncleaned."""
    both = ("infer.cleanup=knn3d", "infer.sections=[B00_s0000, B00_s0001]")
    ref, out = root / "out-knn3d-one-run", root / "out-knn3d-grown"
    run(root, ref, *both)
    first = run(root, out, "infer.cleanup=knn3d", "infer.sections=[B00_s0000]")
    assert first.cleaned == ["B00_s0000"]  # type: ignore[attr-defined]
    second = run(root, out, *both)
    assert second.cleaned == ["B00_s0000", "B00_s0001"]  # type: ignore[attr-defined]
    assert (read_volume(out / "B00_s0001.ome.zarr")["labels/cleaned/0"] > 0).any()
    assert_same_outputs(ref, out)
    marker = json.loads((writers.state_dir(out, "B00_s0001") / "cleaned.json").read_text())
    assert marker == {"group": "B00", "members": ["B00_s0000", "B00_s0001"]}
    assert run(root, out, *both).cleaned == []  # type: ignore[attr-defined]
    # A later run over one of them keeps its brain-wide clean-up (not redone from that section alone).
    assert run(root, out, "infer.cleanup=knn3d", "infer.sections=[B00_s0000]").cleaned == []  # type: ignore[attr-defined]
    assert_same_outputs(ref, out)


def test_volume_lock_creates_once(tmp_path: Path) -> None:
    grid = Grid("S", (40, 40), 4, 9, 4)
    spec = {
        "format": "ome-zarr", "pyramid_levels": 2, "area_ids": [2, 3], "area_names": ["a", "b"],
        "compression": "none", "output_pixel_size_um": 4.0, "model_pixel_size_um": 1.0, "section_factor": 1,
        "chunk_px": 4, "shard_chunks": 0, "label_images": ["argmax"],
    }  # fmt: skip
    v1 = writers.open_volume(tmp_path, grid, spec, {"settings": spec})
    v2 = writers.open_volume(tmp_path, grid, spec, {"settings": spec})
    assert v1.path == v2.path and not list(tmp_path.glob(".*partial"))


def test_automatic_io_threads_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sizing rule of infer.io_threads=0 on nodes this machine is not (16 and 64 cores, bound or not)."""
    import os

    from cytonet.infer.run import io_threads

    cfg = load_config(None, [])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read: no GPU needed
    assert io_threads(load_config(None, ["infer.io_threads=5"]), cuda) == 5
    assert io_threads(load_config(None, ["infer.io_threads=5"]), cpu) == 5
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert io_threads(cfg, cpu) == 1  # a laptop, or this machine
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert io_threads(cfg, cuda) == 14  # one GPU worker on a 16-core node
    assert io_threads(cfg, cpu) == 4  # one CPU worker: a quarter of the cores read, the model has the rest
    assert io_threads(cfg, cuda, local_world_size=4) == 2  # four unbound ranks share the node
    assert io_threads(cfg, cpu, local_world_size=4) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert io_threads(cfg, cuda, local_world_size=4) == 14  # a 64-core node bound to 16 cores per rank (srun)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert io_threads(cfg, cuda) == 32  # at most MAX_AUTO_IO_THREADS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert io_threads(cfg, cuda) == 1
