"""cytonet.distributed: DistEnv, init, gathers with gradients, synced BatchNorm and reductions.

The multi-process tests start 2 real gloo ranks on 127.0.0.1 once per module (torch.multiprocessing.spawn);
each rank writes its results to a file and the tests compare them with a single-process run on the
concatenated batch, in float64 so that the comparison is tight. Ranks get unequal batches (5 and 3 samples),
because an equal split hides scaling bugs (lightly once shipped gradients scaled by 1/world_size).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cytonet import distributed as D
from cytonet.config import DistConfig, LossConfig, ModelConfig
from cytonet.errors import ConfigError
from cytonet.losses import ContrastiveLoss, distance_weighted, supcon
from cytonet.losses.siamese import SiameseLoss, siamese_distance
from cytonet.models import build_contrastive_model
from cytonet.models.build import build_siamese_model

WORLD = 2
SIZES = [5, 3]  # unequal samples per rank
MODEL_CFG = ModelConfig(encoder="paper", n_blocks=2, patch_size_px=57, proj_hidden_dim=16, proj_dim=8)
LOSS_CFGS = {
    "supcon": LossConfig(kind="supcon", temperature=0.1),
    "distance": LossConfig(kind="distance", temperature=0.1, transfer="gaussian", radius_mm=1.0),
    "siamese": LossConfig(kind="siamese", scale_mm=2.0),
}
BN_SIZES = [4, 2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def global_batch() -> dict[str, torch.Tensor]:
    """The concatenated batch of all ranks (float64): images, labels, coordinates."""
    g = torch.Generator().manual_seed(123)
    n = sum(SIZES)
    return {
        "x": torch.rand(n, 1, 57, 57, generator=g, dtype=torch.float64),
        "labels": torch.tensor([0, 1, 2, 1, 0, 2, 3, 1]),
        "coords": torch.rand(n, 3, generator=g, dtype=torch.float64) * 3.0,
    }


def bn_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = sum(BN_SIZES)
    return {
        "x2d": torch.randn(n, 3, 5, 4, generator=g, dtype=torch.float64) * 2 + 1,
        "g2d": torch.randn(n, 3, 5, 4, generator=g, dtype=torch.float64),
        "x1d": torch.randn(n, 6, generator=g, dtype=torch.float64) * 3 - 2,
        "g1d": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "weight": torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
        "bias": torch.randn(3, generator=g, dtype=torch.float64),
    }


def rows(sizes: list[int], r: int) -> slice:
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def fresh_model(kind: str = "supcon") -> nn.Module:
    torch.manual_seed(0)
    build = build_siamese_model if kind == "siamese" else build_contrastive_model
    return build(MODEL_CFG).double()


def loss_module(lcfg: LossConfig) -> nn.Module:
    return SiameseLoss(lcfg.scale_mm) if lcfg.kind == "siamese" else ContrastiveLoss(lcfg)


def named_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        out[name.removeprefix("module.")] = p.grad.detach().clone()
    return out


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("module."): v.clone()
        for k, v in model.state_dict().items()
        if "running_" in k or "num_batches" in k
    }


def make_bn(kind: str, data: dict[str, torch.Tensor]) -> nn.Module:
    if kind == "2d":
        bn = nn.BatchNorm2d(3, momentum=0.3).double()
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
        return bn
    return nn.BatchNorm1d(6, momentum=None).double()  # cumulative moving average


def run_bn(bn: nn.Module, x: torch.Tensor, gout: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` forwards (to exercise running statistics), backward of the last one."""
    x = x.clone().requires_grad_(True)
    for _ in range(steps):
        out = bn(x)
    (out * gout).sum().backward()
    res = {"out": out.detach(), "x_grad": x.grad.detach().clone()}  # type: ignore[union-attr]
    for name, p in bn.named_parameters():
        res[f"grad_{name}"] = p.grad.detach().clone()  # type: ignore[union-attr]
    for name, b in bn.named_buffers():
        res[f"buf_{name}"] = b.clone()
    return res


# ----------------------------------------------------------------------------------------------------------
# The worker: one process per rank


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    env = D.DistEnv(rank=rank, local_rank=rank, world_size=WORLD, master_port=port, local_world_size=WORLD)
    dcfg = DistConfig(backend="gloo", timeout_s=60.0, sync_batchnorm=True)
    device = D.init_distributed(env, dcfg)
    res: dict[str, Any] = {"device": str(device), "world": D.world_size(), "rank": D.rank()}
    try:
        # Reductions and gathers without gradients (rank 1 contributes no rows to the 'empty' gather).
        res["any"] = D.any_true(rank == 1)
        res["all"] = D.all_true(rank == 1)
        res["min"] = D.all_reduce_min(rank + 1.0)
        res["max"] = D.all_reduce_max(rank + 1.0)
        res["sum"] = D.all_reduce_sum(torch.tensor([rank + 1.0])).item()
        res["sizes"] = D.all_gather_sizes(SIZES[rank])
        flags = torch.tensor([True, False, True][: 3 - 3 * rank], dtype=torch.bool)  # 3 rows on rank 0, 0 on rank 1
        res["gathered_bool"] = D.all_gather_nograd(flags)
        res["gathered_coords"] = D.all_gather_nograd(global_batch()["coords"][rows(SIZES, rank)])
        res["objects"] = D.all_gather_object({"rank": rank})
        torch.manual_seed(0)
        linear = nn.Linear(3, 2)
        replica = nn.Sequential(linear, nn.BatchNorm1d(2))
        res["replicas_same"] = D.replicas_differ(replica)
        if rank == 1:
            with torch.no_grad():
                linear.weight[0, 0] += 1e-6
        res["replicas_diff"] = D.replicas_differ(replica)
        bn = replica[1]
        bn.running_mean.fill_(rank + 1.0)  # type: ignore[union-attr]
        bn.num_batches_tracked.fill_(rank + 5)  # type: ignore[union-attr]
        D.broadcast_buffers(replica)
        res["broadcast_buffers"] = (bn.running_mean.tolist(), int(bn.num_batches_tracked))  # type: ignore[union-attr]
        D.barrier()

        data = global_batch()
        sl = rows(SIZES, rank)
        for kind, lcfg in LOSS_CFGS.items():
            targets = data["labels" if kind == "supcon" else "coords"][sl]
            # (a) plain model, gradients summed over ranks by hand: shares must sum to the full loss/gradient.
            model = D.convert_sync_batchnorm(fresh_model(kind), env, dcfg, device)
            res[f"{kind}_bn_types"] = sorted({type(m).__name__ for m in D.batchnorm_layers(model)})
            share = loss_module(lcfg)(model(data["x"][sl]), targets)
            share.backward()
            res[f"{kind}_share"] = share.item()
            res[f"{kind}_loss"] = D.all_reduce_sum(share.detach()).item()
            res[f"{kind}_grads"] = {k: D.all_reduce_sum(g) for k, g in named_grads(model).items()}
            res[f"{kind}_stats"] = bn_stats(model)
            # (b) under DDP, which averages gradients: backward on share * world_size.
            ddp = DDP(D.convert_sync_batchnorm(fresh_model(kind), env, dcfg, device))
            share = loss_module(lcfg)(ddp(data["x"][sl]), targets)
            (share * env.world_size).backward()
            res[f"{kind}_ddp_grads"] = named_grads(ddp)
            if kind == "siamese":
                continue
            # (c) negative control: candidates gathered without gradients lose the other ranks' terms.
            model = D.convert_sync_batchnorm(fresh_model(), env, dcfg, device)
            z = model(data["x"][sl])
            sizes = D.all_gather_sizes(z.shape[0])
            z_all = D.all_gather_nograd(z, sizes)
            z_all = torch.cat([z_all[: D.rank_offset(sizes)], z, z_all[D.rank_offset(sizes) + z.shape[0] :]])
            w_targets = D.all_gather_nograd(targets, sizes)
            loss_fn = ContrastiveLoss(lcfg)
            from cytonet.losses import soft_target_contrastive

            w = loss_fn.weights(targets, w_targets)
            n_valid = D.all_reduce_sum(torch.tensor(float(sum(SIZES))))
            soft_target_contrastive(z, z_all, w, lcfg.temperature, D.rank_offset(sizes), n_valid).backward()
            res[f"{kind}_nograd_grads"] = {k: D.all_reduce_sum(g) for k, g in named_grads(model).items()}

        # Which c10d collectives a differentiable gather and a synced BatchNorm issue, forward and backward.
        from torch.profiler import ProfilerActivity, profile

        bn = D.SyncBatchNorm(4)
        x = torch.randn(BN_SIZES[rank], 4, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            (D.gather_with_grad(bn(x)) ** 2).sum().backward()
        res["c10d_ops"] = sorted({e.name for e in prof.events() if e.name.startswith("c10d::")})

        # Synced BatchNorm alone, 2d (momentum) and 1d (cumulative average, two steps).
        b = bn_batch()
        sl = rows(BN_SIZES, rank)
        for kind, steps in (("2d", 1), ("1d", 2)):
            bn = D.convert_sync_batchnorm(make_bn(kind, b), env, dcfg, device)
            res[f"bn{kind}_type"] = type(bn).__name__
            r = run_bn(bn, b[f"x{kind}"][sl], b[f"g{kind}"][sl], steps)
            for k in list(r):
                if k.startswith("grad_"):
                    r[k] = D.all_reduce_sum(r[k])
            res[f"bn{kind}"] = r
    finally:
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        D.destroy_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------------------------------------
# Single-process references


def reference(kind: str) -> dict[str, Any]:
    data = global_batch()
    model = fresh_model(kind)
    z = model(data["x"])
    lcfg = LOSS_CFGS[kind]
    if kind == "supcon":
        loss = supcon(z, data["labels"], lcfg.temperature)
    elif kind == "siamese":
        loss = siamese_distance(z, data["coords"], lcfg.scale_mm)
    else:
        loss = distance_weighted(z, data["coords"], lcfg.temperature, lcfg.transfer, lcfg.radius_mm)
    loss.backward()
    return {"loss": loss.item(), "grads": named_grads(model), "stats": bn_stats(model)}


def assert_dicts_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    for k in want:
        close(got[k], want[k], k, rtol)


def close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float, atol: float = 1e-12) -> None:
    """assert_close whose message names the tensor."""
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise AssertionError(f"{name}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Multi-process tests


@pytest.mark.distributed
def test_init_and_reductions(results: list[dict[str, Any]]) -> None:
    for r, res in enumerate(results):
        assert (res["device"], res["world"], res["rank"]) == ("cpu", WORLD, r)
        assert res["any"] is True and res["all"] is False
        assert (res["min"], res["max"], res["sum"]) == (1.0, 2.0, 3.0)
        assert res["sizes"] == SIZES
        assert res["gathered_bool"].tolist() == [True, False, True]
        torch.testing.assert_close(res["gathered_coords"], global_batch()["coords"], rtol=0, atol=0)
        assert res["objects"] == [{"rank": 0}, {"rank": 1}]
        assert res["replicas_same"] == [] and res["replicas_diff"] == [1]
        assert res["broadcast_buffers"] == ([1.0, 1.0], 5)  # rank 0's BatchNorm statistics on every rank


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["supcon", "distance", "siamese"])
def test_gathered_loss_and_gradients_equal_single_process(results: list[dict[str, Any]], kind: str) -> None:
    ref = reference(kind)
    for res in results:
        assert res[f"{kind}_bn_types"] == ["SyncBatchNorm"]
        assert res[f"{kind}_loss"] == pytest.approx(ref["loss"], rel=1e-12)
        assert_dicts_close(res[f"{kind}_grads"], ref["grads"])
        assert_dicts_close(res[f"{kind}_ddp_grads"], ref["grads"])
        assert_dicts_close(res[f"{kind}_stats"], ref["stats"])
    # Shares are per rank (unequal batches: unequal shares) and sum to the loss.
    assert sum(r[f"{kind}_share"] for r in results) == pytest.approx(ref["loss"], rel=1e-12)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["supcon", "distance"])
def test_gather_without_grad_is_wrong(results: list[dict[str, Any]], kind: str) -> None:
    # The negative control differs from the reference: the test above can see a dropped-gradient bug.
    ref = reference(kind)["grads"]
    got = results[0][f"{kind}_nograd_grads"]
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) > 1e-4


@pytest.mark.distributed
def test_gathers_use_plain_collectives(results: list[dict[str, Any]]) -> None:
    # torch's functional collectives run as coalesced all-gathers / reduce-scatters on gloo, a path that once
    # corrupted the heap of a 2-rank run (a core dump had "ALLGATHER_COALESCED" written into freed memory).
    for res in results:
        ops = res["c10d_ops"]
        assert "c10d::allreduce_" in ops and any("allgather" in op for op in ops), ops  # the profiler saw them
        assert not [op for op in ops if "coalesced" in op], ops


@pytest.mark.distributed
@pytest.mark.parametrize(("kind", "steps"), [("2d", 1), ("1d", 2)])
def test_sync_batchnorm_matches_full_batch(results: list[dict[str, Any]], kind: str, steps: int) -> None:
    b = bn_batch()
    ref = run_bn(make_bn(kind, b), b[f"x{kind}"], b[f"g{kind}"], steps)
    for r, res in enumerate(results):
        assert res[f"bn{kind}_type"] == "SyncBatchNorm"
        got = res[f"bn{kind}"]
        sl = rows(BN_SIZES, r)
        torch.testing.assert_close(got["out"], ref["out"][sl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["x_grad"], ref["x_grad"][sl], rtol=1e-10, atol=1e-12)
        for k in ref:
            if k.startswith(("grad_", "buf_")):
                close(got[k], ref[k], k, rtol=1e-12)


def _stress_worker(rank: int, port: int, steps: int) -> None:
    """Many tiny differentiable gathers, each between asynchronous all-reduces in flight (as DDP's are during
    backward) and a synchronous all_gather_sizes: gloo's two worker threads run collectives side by side."""
    torch.set_num_threads(1)
    env = D.DistEnv(rank=rank, local_rank=rank, world_size=WORLD, master_port=port, local_world_size=WORLD)
    D.init_distributed(env, DistConfig(backend="gloo", timeout_s=60.0))
    try:
        for step in range(steps):
            pending = [torch.distributed.all_reduce(torch.ones(300), async_op=True)]
            x = torch.randn(1, 17, requires_grad=True)
            y = D.gather_with_grad(x, [1] * WORLD)
            pending.append(torch.distributed.all_reduce(torch.ones(1000), async_op=True))
            assert D.all_gather_sizes(step) == [step] * WORLD
            pending.append(torch.distributed.all_reduce(torch.ones(500), async_op=True))
            (y[:, :1].sum() + (y[:, 1:] ** 2).sum()).backward()
            torch.testing.assert_close(x.grad[:, 1:], 2 * WORLD * x.detach()[:, 1:])
            for work in pending:
                work.wait()
    finally:
        D.destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_gathers_survive_concurrent_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    """With torch's functional all_gather in gather_with_grad, 2 of 3 runs of this (30 000 steps, glibc heap
    checks on) died of heap corruption ("malloc(): unaligned tcache chunk detected") or hung; the plain
    collectives pass 3 of 3. About 4 minutes on 2 cores."""
    monkeypatch.setenv("MALLOC_CHECK_", "3")  # glibc checks its heap on every call: corruption aborts sooner
    monkeypatch.setenv("MALLOC_PERTURB_", "165")  # freed memory is filled: a read after free sees garbage
    ctx = mp.start_processes(_stress_worker, args=(free_port(), 30_000), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 900
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("2-rank gather stress hung for 15 minutes")


# ----------------------------------------------------------------------------------------------------------
# Single-process behaviour (no process group)


def test_world_of_one_is_identity() -> None:
    env = D.DistEnv()
    assert D.init_distributed(env, DistConfig(backend="gloo")) == torch.device("cpu")
    assert D.world_size() == 1 and D.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather_with_grad(x) is x and D.all_gather_nograd(x) is x
    assert D.all_gather_sizes(3) == [3]
    assert D.any_true(True) and not D.all_true(False) and D.all_reduce_min(2.5) == 2.5
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert D.convert_sync_batchnorm(model, env, DistConfig(), torch.device("cpu")) is model
    D.barrier()
    D.destroy_distributed()


def test_dist_env_validation() -> None:
    with pytest.raises(ValueError, match="rank=2"):
        D.DistEnv(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        D.DistEnv(world_size=0)
    with pytest.raises(ValueError, match="master_port"):
        D.DistEnv(master_port=70000)
    assert D.DistEnv(master_addr="::1", master_port=1234).init_method == "tcp://[::1]:1234"
    assert D.DistEnv(rank=1, world_size=2).is_distributed and not D.DistEnv(rank=1, world_size=2).is_main


def test_backend_and_sync_bn_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert D.resolve_backend(DistConfig(backend="auto"), cuda_available=True) == "nccl"
    assert D.resolve_backend(DistConfig(backend="auto"), cuda_available=False) == "gloo"
    with pytest.raises(ConfigError, match=r"dist\.backend"):
        D.resolve_backend(DistConfig(backend="nccl"), cuda_available=False)
    assert D.sync_batchnorm_impl(DistConfig(), cuda) == "torch"
    assert D.sync_batchnorm_impl(DistConfig(), cpu) == "cytonet"
    with pytest.raises(ConfigError, match="sync_batchnorm_impl='torch'"):
        D.sync_batchnorm_impl(DistConfig(sync_batchnorm_impl="torch"), cpu)
    if not D._apex_available():
        with pytest.raises(ConfigError, match="apex"):
            D.sync_batchnorm_impl(DistConfig(sync_batchnorm_impl="apex"), cuda)


def test_conversion_keeps_parameters_and_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4))
    x = torch.randn(5, 1, 6, 6)
    want = model(x)
    params = {id(p) for p in model.parameters()}
    env = D.DistEnv(rank=0, world_size=2)  # converts without a process group; forward is then plain BN
    conv = D.convert_sync_batchnorm(model, env, DistConfig(), torch.device("cpu"))
    assert all(isinstance(m, D.SyncBatchNorm) for m in D.batchnorm_layers(conv))
    assert {id(p) for p in conv.parameters()} == params
    torch.testing.assert_close(conv(x), want)
    assert D.convert_sync_batchnorm(model, env, DistConfig(sync_batchnorm=False), torch.device("cpu")) is model
