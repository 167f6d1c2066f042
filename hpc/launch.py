"""The DistEnv of this process under any launcher: what the CLI hands to cytonet's distributed commands.

Entry point: :func:`dist_env`. :func:`hpc.env.detect` reads rank and world size from torchrun, an srun step,
Open MPI or MPICH; for an MPI launch of several ranks the rendezvous address is then settled by
:func:`hpc.mpi.rendezvous` (mpiexec, unlike torchrun and SLURM, names no host for rank 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hpc.env import detect

if TYPE_CHECKING:
    from cytonet.distributed import DistEnv


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """``detect(environ).dist()`` with the MPI rendezvous filled in (every MPI rank must call it: collective).

    ``environ`` defaults to ``os.environ``.
    """
    launch = detect(environ)
    if launch.launcher == "mpi" and launch.world_size > 1:
        from hpc.mpi import rendezvous

        addr, port = rendezvous(launch, environ)
        launch = dataclasses.replace(launch, master_addr=addr, master_port=port)
    return launch.dist()
