"""Rendezvous for torch.distributed when the processes were started by ``mpiexec`` / ``mpirun``.

torch has no MPI backend (PLATFORM.md): MPI only tells each process its rank and the world size (read by
:func:`hpc.env.detect`); the collectives run on gloo or nccl, whose process group needs every rank to know
one ``host:port`` where rank 0 listens (the TCP store). torchrun and SLURM give that through MASTER_ADDR /
the node list; ``mpiexec`` gives nothing, so it is settled here:

- ``MASTER_ADDR`` and ``MASTER_PORT`` both exported: used as they are (the user's choice wins).
- mpi4py importable (``pip install 'cytonet[mpi]'``): the ranks exchange host names over ``COMM_WORLD``; rank 0
  picks its address (127.0.0.1 when every rank shares its host, else an address of its host that is not a
  loopback one, or ``MASTER_ADDR`` when exported) and a free TCP port (or ``MASTER_PORT``), and broadcasts
  them, so the rendezvous works across hosts.
- Without mpi4py: ``MASTER_ADDR`` or 127.0.0.1, and ``MASTER_PORT`` or a port derived from an identifier that
  all ranks of this launch share (the PMIx namespace of Open MPI, the SLURM job and step, or the launcher's
  process id). That is right on a single host only; it is refused when the launcher says the ranks span
  several hosts, and a warning says so otherwise.

Entry point: :func:`rendezvous` (called by :func:`hpc.launch.dist_env`). mpi4py is imported here and nowhere in
``cytonet/``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import zlib
from collections.abc import Mapping
from typing import Any

from hpc.env import PORT_BASE, PORT_SPAN, LaunchEnv, LaunchEnvError

log = logging.getLogger(__name__)

#: Variables naming this launch, shared by all its ranks, in order of preference (for the port without mpi4py).
_LAUNCH_ID_VARS = ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid")


def rendezvous(launch: LaunchEnv, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(address, port) of rank 0's TCP store for an MPI launch; collective over ``COMM_WORLD`` with mpi4py.

    Every rank of the launch must call it (with mpi4py, rank 0 broadcasts its choice; the others wait for it).
    Raises :class:`hpc.env.LaunchEnvError` when no working address can be found, naming what to set.
    """
    e: Mapping[str, str] = os.environ if environ is None else environ
    addr_set, port_set = e.get("MASTER_ADDR") or None, e.get("MASTER_PORT") or None
    if addr_set and port_set:
        log.debug("MPI rendezvous: MASTER_ADDR/MASTER_PORT from the environment: %s:%s", addr_set, port_set)
        return launch.master_addr, launch.master_port
    comm = _world_comm(launch)
    if comm is None:
        return _without_mpi4py(launch, e, addr_set, port_set)
    hosts: list[str] = comm.allgather(socket.gethostname())
    choice: tuple[str, int, str | None] = ("", 0, None)
    if launch.rank == 0:
        try:
            addr = addr_set or ("127.0.0.1" if len(set(hosts)) == 1 else reachable_address(hosts[0]))
            port = int(port_set) if port_set else free_port()
            choice = (addr, port, None)
        except (OSError, LaunchEnvError) as exc:
            choice = ("", 0, str(exc))  # broadcast the failure too, so that no rank waits for a store that never comes
    addr, port, error = comm.bcast(choice, root=0)
    if error is not None:
        raise LaunchEnvError(f"MPI rendezvous failed on rank 0: {error}")
    if launch.rank == 0:
        log.info("MPI rendezvous (mpi4py): rank 0 listens on %s:%d for %d ranks", addr, port, launch.world_size)
    return addr, port


def _world_comm(launch: LaunchEnv) -> Any | None:
    """mpi4py's COMM_WORLD (initialising MPI), or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    except (RuntimeError, OSError) as exc:  # mpi4py >= 4 finds no MPI library to load
        raise LaunchEnvError(
            f"mpi4py is installed but cannot load an MPI library ({exc}); load the MPI of your mpiexec (module load "
            "...) or point MPI4PY_LIBMPI at its libmpi.so"
        ) from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if (rank, size) != (launch.rank, launch.world_size):
        # Typical cause: mpi4py loaded another MPI library than the one of the mpiexec that started us, and
        # initialised as a singleton (rank 0 of 1) in every process.
        raise LaunchEnvError(
            f"mpi4py sees rank {rank} of {size}, but the launcher's variables say rank {launch.rank} of "
            f"{launch.world_size}: mpi4py uses another MPI library than the mpiexec that started this process "
            f"(check `python -m mpi4py --mpi-lib-version`; MPI4PY_LIBMPI selects the library)"
        )
    return comm


def _without_mpi4py(
    launch: LaunchEnv, e: Mapping[str, str], addr_set: str | None, port_set: str | None
) -> tuple[str, int]:
    if addr_set is None and launch.local_world_size < launch.world_size:
        raise LaunchEnvError(
            f"MPI launch of {launch.world_size} ranks over several hosts ({launch.local_world_size} on this one) "
            "needs mpi4py to agree on rank 0's address: install the mpi extra (pip install -c .venv/constraints.txt -e '.[mpi]'), or export MASTER_ADDR (a host "
            "name or IP of rank 0's host) and MASTER_PORT to every rank (mpiexec -x MASTER_ADDR -x MASTER_PORT)"
        )
    addr = addr_set or "127.0.0.1"
    if port_set:
        port, source = launch.master_port, "MASTER_PORT"
    else:
        port, source = launch_port(e)
    if launch.rank == 0 and addr_set is None:
        log.warning(
            "MPI rendezvous without mpi4py: rank 0 listens on 127.0.0.1:%d (port from %s). This works only when "
            "all %d ranks run on this host and that port is free; ranks on other hosts cannot reach it and the "
            "start fails after dist.timeout_s. For several hosts: install the mpi extra (pip install -c .venv/constraints.txt -e '.[mpi]'), or export "
            "MASTER_ADDR and MASTER_PORT to every rank",
            port,
            source,
            launch.world_size,
        )
    return addr, port


def launch_port(environ: Mapping[str, str]) -> tuple[int, str]:
    """(port, what it was derived from): the same on every rank of one launch on one host, different between
    launches (PORT_BASE .. PORT_BASE + PORT_SPAN - 1).

    Prefers a launch identifier (Open MPI's PMIx namespace), then the SLURM job and step, then the parent
    process id (MPICH's hydra exports no launch id): on one host every rank is a child of the same launcher
    process (``prterun`` for Open MPI 5, ``hydra_pmi_proxy`` for MPICH; both checked).
    """
    key, source = None, ""
    for name in _LAUNCH_ID_VARS:
        if environ.get(name):
            key, source = environ[name], name
            break
    if key is None and environ.get("SLURM_JOB_ID"):
        key = f"{environ['SLURM_JOB_ID']}.{environ.get('SLURM_STEP_ID', '')}"
        source = "SLURM_JOB_ID/SLURM_STEP_ID"
    if key is None:
        key, source = f"ppid-{os.getppid()}", "the launcher's process id"
    return PORT_BASE + zlib.crc32(key.encode()) % PORT_SPAN, source


def free_port() -> int:
    """A TCP port free on every interface of this host right now (the OS picks it).

    The socket is closed before torch binds the port, so another program could take it in between; the
    window is milliseconds and the ephemeral range is large.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _usable(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def reachable_address(hostname: str) -> str:
    """An address of this host that other hosts can connect to: what ``hostname`` resolves to (IPv4 first),
    else the source address of this host's default route; never a loopback one (Debian maps the host name to
    127.0.1.1 in /etc/hosts). Raises :class:`LaunchEnvError` when there is none.
    """
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    found = [str(info[4][0]) for info in infos]
    found.sort(key=lambda a: ":" in a)  # IPv4 before IPv6
    for addr in found:
        if _usable(addr):
            return addr
    # No packet is sent: connecting a UDP socket only asks the kernel which source address it would use.
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                addr = str(s.getsockname()[0])
        except OSError:
            continue
        if _usable(addr):
            return addr
    raise LaunchEnvError(
        f"host name {hostname!r} of rank 0 resolves only to loopback addresses ({', '.join(found) or 'none'}) "
        "and there is no default route: ranks on other hosts cannot reach it; export MASTER_ADDR (an address of "
        "rank 0's host that the other hosts reach) to every rank"
    )
