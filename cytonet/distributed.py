"""The one module of cytonet that touches ``torch.distributed``.

Everything else asks this module for collectives; with world size 1 every helper is the identity (no process
group is created), so single-process runs take the same code path as multi-process ones.

Entry points:

- :class:`DistEnv`: who this process is (rank, local rank, world size, rendezvous address). It is built outside
  cytonet (``hpc.env.detect().dist()`` from the launcher's variables, or directly in tests) and passed in;
  nothing here reads launcher environment variables.
- :func:`init_distributed` / :func:`destroy_distributed`: create / tear down the process group (nccl on CUDA,
  gloo on CPU, with a timeout) and return the device of this rank.
- :func:`all_gather_sizes`, :func:`gather_with_grad` (embeddings: gradients flow back to the rank that produced
  each row), :func:`all_gather_nograd` (labels, coordinates). Both gathers accept unequal row counts per rank.
- :func:`all_reduce_sum`, :func:`all_reduce_min`, :func:`all_reduce_max`,
  :func:`any_true`, :func:`all_true`, :func:`barrier`: reductions for collective decisions (a stop requested on
  one rank is agreed on by all before anyone acts); :func:`all_gather_object` (small picklable things such as
  RNG states) and :func:`replicas_differ` (bitwise check that DDP replicas agree).
- :class:`SyncBatchNorm` (cytonet's synchronised BatchNorm for CPU/gloo; ``torch.nn.SyncBatchNorm`` refuses CPU
  tensors) and :func:`convert_sync_batchnorm`, which picks torch's on CUDA, cytonet's on CPU and apex's when
  configured.

Why gathers need care (PLATFORM.md): plain ``dist.all_gather`` returns tensors detached from the other ranks'
graphs, so a contrastive loss whose negatives come from other ranks silently loses those ranks' gradient
contributions. :func:`gather_with_grad` is an autograd function whose backward sums every rank's gradient for a
row on the row's owner (a reduce-scatter on nccl; on gloo an all-reduce, which its reduce-scatter emulates anyway).
Every collective here is synchronous and a plain one (all_gather, all_reduce, reduce_scatter). Not torch's
functional collectives: on gloo they run as *coalesced* all-gathers and reduce-scatters, and one of those
corrupted the heap of a 2-rank CPU run (a core dump showed "ALLGATHER_COALESCED" written into freed memory; see
pytorch#65231 for the same path crashing torch's own tests).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from cytonet.config import DistConfig
from cytonet.errors import ConfigError

log = logging.getLogger(__name__)

BackendName = Literal["nccl", "gloo"]


@dataclass(frozen=True)
class DistEnv:
    """Identity of this process in the job; plain values handed in by the launcher side (``hpc/``)."""

    rank: int = 0
    """Global rank, 0 .. world_size - 1."""
    local_rank: int = 0
    """Rank on this node; selects the GPU (``cuda:local_rank``)."""
    world_size: int = 1
    """Number of processes in the job."""
    master_addr: str = "127.0.0.1"
    """Host of rank 0 (the rendezvous TCP store)."""
    master_port: int = 29500
    """Port of the rendezvous TCP store on ``master_addr``."""
    local_world_size: int = 1
    """Processes on this node."""
    node_rank: int = 0
    """Index of this node."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"DistEnv.world_size={self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistEnv.rank={self.rank} is outside 0..{self.world_size - 1}")
        if self.local_rank < 0:
            raise ValueError(f"DistEnv.local_rank={self.local_rank} must be >= 0")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"DistEnv.master_port={self.master_port} is not a TCP port")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs at INFO and writes shared outputs)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        """``tcp://host:port`` URL of the rendezvous (IPv6 hosts bracketed)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


# ----------------------------------------------------------------------------------------------------------
# Set-up


def resolve_backend(cfg: DistConfig, cuda_available: bool | None = None) -> BackendName:
    """The process-group backend: ``dist.backend``, or for ``auto`` nccl when CUDA is available, else gloo."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cfg.backend == "auto":
        return "nccl" if cuda_available else "gloo"
    if cfg.backend == "nccl" and not cuda_available:
        raise ConfigError("dist.backend='nccl' is invalid: CUDA is not available here; use dist.backend=gloo or auto")
    return cfg.backend


def device_for(env: DistEnv, cfg: DistConfig) -> torch.device:
    """The device of this rank: ``cuda:local_rank`` for nccl, the CPU for gloo."""
    if resolve_backend(cfg) == "nccl":
        # A process that sees one GPU only (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank) owns
        # it whatever its local rank; otherwise local rank i takes GPU i.
        return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else env.local_rank)
    return torch.device("cpu")


def init_distributed(env: DistEnv, cfg: DistConfig) -> torch.device:
    """Create the default process group for ``env`` (when ``world_size > 1``) and return this rank's device.

    The rendezvous is a TCP store at ``env.master_addr:env.master_port``; every collective fails after
    ``cfg.timeout_s`` instead of hanging forever when a peer died. With world size 1 no group is created and
    every helper in this module is the identity.
    """
    backend = resolve_backend(cfg)
    device = device_for(env, cfg)
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {env.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                f"launch at most that many processes per node"
            )
        if torch.cuda.device_count() == 1 and env.local_world_size > 1:
            # Right when each rank was given its own GPU (srun --gpus-per-task=1); otherwise NCCL will refuse
            # the ranks sharing it ("Duplicate GPU detected").
            log.warning(
                "local rank %d of %d sees a single GPU and uses it: launch at most one process per GPU",
                env.local_rank,
                env.local_world_size,
            )
        torch.cuda.set_device(device)
    if not env.is_distributed:
        log.info("single process on %s (no process group)", device)
        return device
    if dist.is_initialized():
        raise RuntimeError("init_distributed called twice: the default process group already exists")
    dist.init_process_group(
        backend=backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=cfg.timeout_s),
        # nccl: bind the communicator to this rank's GPU at once (eager init, no guessing of the device).
        device_id=device if device.type == "cuda" else None,
    )
    log.info(
        "process group up: backend %s, rank %d/%d, local rank %d, %s",
        backend,
        env.rank,
        env.world_size,
        env.local_rank,
        env.init_method,
    )
    return device


def destroy_distributed() -> None:
    """Tear down the default process group if there is one (safe to call in single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Size of the default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """Rank in the default process group, 0 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _collective_device(like: torch.Tensor | None = None) -> torch.device:
    """Device on which small bookkeeping tensors must live for the backend (CUDA for nccl, CPU for gloo)."""
    if like is not None:
        return like.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# Gathers


def all_gather_sizes(n: int, device: torch.device | None = None) -> list[int]:
    """Row counts of every rank, in rank order (``[n]`` without a process group).

    One small all_gather plus a device-to-host copy: a CPU-GPU sync point, so call it once per step and pass
    the result to :func:`gather_with_grad` / :func:`all_gather_nograd`.
    """
    if world_size() == 1:
        return [n]
    dev = device if device is not None else _collective_device()
    mine = torch.tensor([n], dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names remain, deprecated);
# clusters run older torch too (setup.cfg allows >= 2.1), where only the old names exist.
_all_gather_single: Any = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single: Any = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized (rows, ...) blocks along dim 0, in rank order; backward sums the gradient of this
    rank's block over all ranks. Both directions are synchronous plain collectives (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        if dist.get_backend() == "nccl":
            _all_gather_single(out, x)  # one flat buffer, no per-rank copies
        else:  # gloo, every torch version: one plain all_gather into the per-rank views of ``out``
            dist.all_gather(list(out.view(world_size(), *x.shape).unbind(0)), x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        rows = grad.shape[0] // world_size()
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((rows, *grad.shape[1:]))
            _reduce_scatter_single(mine, grad)
            return mine
        total = grad.clone()
        dist.all_reduce(total)
        return total[rank() * rows : (rank() + 1) * rows]


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` in rank order, differentiably.

    Args:
        x: (B_r, ...) rows of this rank; B_r may differ between ranks (rows are padded to the largest for the
            collective, then the padding is cut off).
        sizes: the B_r of every rank from :func:`all_gather_sizes` (gathered here when None).

    Returns:
        (sum_r B_r, ...). Its backward sends the gradient of every row to the rank that owns it, summed over
        the ranks that used it: a loss over the gathered batch gets the same gradient as on one process.
    """
    if world_size() == 1:
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device)
    rows = max(sizes)
    gathered = _GatherRows.apply(_pad_rows(x, rows))  # (W * rows, ...)
    if all(n == rows for n in sizes):
        return gathered
    return torch.cat([gathered[r * rows : r * rows + n] for r, n in enumerate(sizes)], dim=0)


def all_gather_nograd(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (B_r, ...) in rank order without autograd: labels, coordinates.

    Bool tensors travel as uint8 (gloo has no bool all_gather). Returns (sum_r B_r, ...).
    """
    if world_size() == 1:
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device)
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x
    padded = _pad_rows(wire.detach(), max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
    return out.to(torch.bool) if x.dtype == torch.bool else out


def rank_offset(sizes: list[int], rank_: int | None = None) -> int:
    """Index of this rank's first row in the gathered batch: ``sum(sizes[:rank])``."""
    r = rank() if rank_ is None else rank_
    return sum(sizes[:r])


# ----------------------------------------------------------------------------------------------------------
# Reductions


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor, no autograd); ``x`` itself without a process group."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _reduce_scalar(value: float, op: Any) -> float:
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_min(value: float) -> float:
    """Minimum of a host number over ranks (e.g. a loss: non-finite on any rank -> every rank sees it)."""
    return _reduce_scalar(value, dist.ReduceOp.MIN)


def all_reduce_max(value: float) -> float:
    """Maximum of a host number over ranks."""
    return _reduce_scalar(value, dist.ReduceOp.MAX)


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective stop decisions)."""
    return all_reduce_max(1.0 if flag else 0.0) > 0.5


def all_true(flag: bool) -> bool:
    """True on every rank only when ``flag`` is true on all of them."""
    return all_reduce_min(1.0 if flag else 0.0) > 0.5


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if world_size() > 1:
        dist.barrier()


def replicas_differ(module: nn.Module) -> list[int]:
    """Ranks whose parameters and buffers differ bitwise from rank 0's (empty: all replicas identical).

    Each rank reduces its state to an exact integer checksum of the raw bytes (no float rounding), and the
    checksums are gathered: one small collective, a CPU-GPU sync point. A debugging aid (``dist.check_replicas``).
    """
    total = torch.zeros((), dtype=torch.int64)
    chunk = 1 << 22  # bytes per step: int64 temporaries of 32 MiB, not 8x the model size
    for i, t in enumerate(module.state_dict().values()):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), chunk):
            part = raw[start : start + chunk].to(torch.int64)
            weights = torch.arange(start + 1, start + part.numel() + 1, dtype=torch.int64) % 65521 + i
            total += (part * weights).sum()
    sums = all_gather_nograd(total.reshape(1).to(_collective_device()))
    return [r for r in range(sums.shape[0]) if int(sums[r]) != int(sums[0])]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics); a no-op in one process."""
    if world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group.

    Pickles through the process group: for small things only (RNG states, counters), never tensors of data.
    """
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------
# Synchronised batch norm


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks (any device).

    For input (N_r, C, *) on rank r, each rank computes per channel its count n_r, mean m_r and centred sum of
    squares M2_r; one differentiable all_gather of the (W, 2C + 1) table gives every rank the global
    statistics through Chan's parallel formula, mean = sum_r n_r m_r / n and
    M2 = sum_r [M2_r + n_r (m_r - mean)^2], var = M2 / n (biased, used to normalise; the running variance gets
    the unbiased M2 / (n - 1)). This is numerically stable (no E[x^2] - E[x]^2 cancellation) and its gradients
    flow through the gather, so output, input gradient, parameter gradients (summed over ranks) and running
    statistics equal single-process BatchNorm over the concatenated batch. Statistics are computed in fp32;
    the output has the input's dtype. In eval mode, or without a process group, it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or world_size() == 1:
            return super().forward(input)

        exp_avg = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            exp_avg = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input  # fp64 stays fp64
        n_local = input.numel() // c if c else 0
        count = x.new_full((1,), float(n_local))
        mean_local = x.sum(dim=dims) / max(n_local, 1)
        shape = [1, c] + [1] * (input.dim() - 2)
        m2_local = ((x - mean_local.view(shape)) ** 2).sum(dim=dims)
        stats = torch.cat([count, mean_local, m2_local]).unsqueeze(0)
        table = gather_with_grad(stats, [1] * world_size())  # (W, 2C + 1); one row each: no all_gather_sizes
        counts, means, m2s = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
        n = counts.sum()
        if n.device.type == "cpu" and float(n.detach()) < 2:  # checked on the CPU only: on a GPU it is a sync point
            raise ValueError(f"SyncBatchNorm needs more than 1 value per channel over all ranks, got {int(n)}")
        mean = (counts * means).sum(dim=0) / n
        m2 = (m2s + counts * (means - mean) ** 2).sum(dim=0)
        var = m2 / n
        if self.training and self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.running_mean.mul_(1 - exp_avg).add_(mean.detach().to(self.running_mean.dtype), alpha=exp_avg)
                unbiased = (m2 / (n - 1)).detach().to(self.running_var.dtype)
                self.running_var.mul_(1 - exp_avg).add_(unbiased, alpha=exp_avg)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(y.dtype).view(shape) + self.bias.to(y.dtype).view(shape)
        return y.to(input.dtype)


def _apex_available() -> bool:
    return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.parallel") is not None


def sync_batchnorm_impl(cfg: DistConfig, device: torch.device) -> Literal["torch", "cytonet", "apex"]:
    """Which implementation :func:`convert_sync_batchnorm` uses: ``dist.sync_batchnorm_impl``, or for ``auto``
    torch's on CUDA and cytonet's elsewhere (torch's refuses CPU tensors)."""
    impl = cfg.sync_batchnorm_impl
    if impl == "auto":
        return "torch" if device.type == "cuda" else "cytonet"
    if impl == "torch" and device.type != "cuda":
        raise ConfigError(
            f"dist.sync_batchnorm_impl='torch' is invalid on {device.type}: torch.nn.SyncBatchNorm needs GPU "
            f"tensors; use auto or cytonet"
        )
    if impl == "apex":
        if not _apex_available():
            raise ConfigError("dist.sync_batchnorm_impl='apex' is invalid: NVIDIA apex is not importable; use auto")
        if device.type != "cuda":
            raise ConfigError(f"dist.sync_batchnorm_impl='apex' is invalid on {device.type}: apex needs CUDA")
    return impl


def _to_cytonet_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _to_cytonet_sync(child))
    return out


def convert_sync_batchnorm(model: nn.Module, env: DistEnv, cfg: DistConfig, device: torch.device) -> nn.Module:
    """Replace every BatchNorm of ``model`` by a synchronised one, when ``cfg.sync_batchnorm`` and world > 1.

    Picks the implementation with :func:`sync_batchnorm_impl` (torch's on CUDA, cytonet's
    :class:`SyncBatchNorm` on CPU/gloo, apex's when configured and importable). Parameters and buffers are
    kept (shared, not copied). Call before wrapping in DistributedDataParallel. Returns the converted model
    (the same object unless the root module itself is a BatchNorm).
    """
    if not cfg.sync_batchnorm or not env.is_distributed:
        return model
    impl = sync_batchnorm_impl(cfg, device)
    log.info("synchronised BatchNorm: %s implementation", impl)
    if impl == "torch":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if impl == "apex":  # pragma: no cover - needs apex and CUDA
        from apex.parallel import convert_syncbn_model

        return convert_syncbn_model(model)
    return _to_cytonet_sync(model)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers of ``model`` (plain or synchronised), for tests and diagnostics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


__all__ = [
    "DistEnv",
    "SyncBatchNorm",
    "all_gather_nograd",
    "all_gather_object",
    "all_gather_sizes",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "all_true",
    "any_true",
    "barrier",
    "batchnorm_layers",
    "convert_sync_batchnorm",
    "destroy_distributed",
    "device_for",
    "gather_with_grad",
    "init_distributed",
    "rank",
    "rank_offset",
    "replicas_differ",
    "resolve_backend",
    "sync_batchnorm_impl",
    "world_size",
]
