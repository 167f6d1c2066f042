"""Site profiles: what differs between clusters (account, partition, limits, GPUs, environment set-up), in one
small typed YAML file, so that the sbatch scripts and submitit jobs are never edited by hand.

Entry points: :func:`load_profile` (path -> validated :class:`SiteProfile`), :func:`parse_time_limit` (and
:func:`parse_time_limit_s`).
Loading reuses the config machinery of ``cytonet/config.py``: unknown keys are refused with the list of valid
ones, types are checked, and :meth:`SiteProfile.validate` names the key, the value and the fix. Shipped
profiles: ``configs/sites/example.yaml`` (a GPU cluster, commented) and ``configs/sites/local.yaml`` (the
single-machine test cluster of ``tools/slurm-local``).

Values that end up on ``#SBATCH`` lines are checked to be one plain token (no whitespace, quotes, ``#`` or
control characters), because sbatch parses those lines itself and a newline would start a shell command.
``setup`` lines are shell code by design (``module load``, ``source .venv/bin/activate``): they are the site
administrator's, written verbatim, and are never built from a config value.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cytonet.config import build_dataclass, read_yaml
from cytonet.config import check_value as _check
from cytonet.errors import ConfigError
from hpc.requeue import DEFAULT_MAX_REQUEUES

#: SLURM time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
#: One token on an #SBATCH line: printable, no whitespace, quotes, '#', '\' or shell-significant newlines.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-\[\]()]+$")
_OPTION_RE = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:@%+=/\-\[\]()]+)?$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
#: sbatch options the rendered scripts set (from the profile key named, or themselves): ``extra_sbatch`` may not
#: set them again, where the later line would silently win over the key (or break what the script relies on).
SET_BY_CYTONET = {
    "account": "account",
    "partition": "partition",
    "qos": "qos",
    "time": "time.<kind>",
    "nodes": "pretrain_nodes (probe, scratch and array tasks run on one node)",
    "gpus-per-node": "gpus_per_node and gpu_type",
    "cpus-per-gpu": "cpus_per_gpu",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem or array_mem",
    "signal": "signal_lead_s (training jobs; extract and infer arrays take no signal: USR1 would end them)",
    "array": "array_tasks and array_parallelism",
    **dict.fromkeys(("job-name", "ntasks", "ntasks-per-node", "requeue", "no-requeue", "open-mode", "output",
                     "error", "chdir")),
}  # fmt: skip
#: Job kinds that run the training loop: SLURM signals them ``signal_lead_s`` before their time limit.
TRAIN_KINDS = ("pretrain", "probe", "scratch")
#: Training time a job needs before the preemption signal (start-up, data, the first steps); see
#: :meth:`SiteProfile.validate`.
SIGNAL_MARGIN_S = 60


def parse_time_limit_s(value: str) -> int:
    """Seconds of a SLURM time limit (``"90"``: 90 minutes, ``"01:30:00"``, ``"1-12"``); raises ValueError if
    malformed."""
    m = _TIME_RE.match(value)
    if m is None:
        raise ValueError(value)
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        days, hours, mins, secs = (int(g or 0) for g in m.group(1, 2, 3, 4))
        return ((days * 24 + hours) * 60 + mins) * 60 + secs
    a, b, c = m.group(5, 6, 7)
    if c is not None:  # HH:MM:SS
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # MM


def parse_time_limit(value: str) -> int:
    """Minutes of a SLURM time limit (``"90"``, ``"01:30:00"``, ``"1-12"``), seconds rounded up; raises ValueError
    if malformed."""
    return -(-parse_time_limit_s(value) // 60)


@dataclass
class TimeLimits:
    """Wall-clock limit per job kind, in a SLURM time format (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``)."""

    extract: str = "04:00:00"
    """Each task of the extraction array."""
    pretrain: str = "24:00:00"
    """Contrastive pretraining; longer runs are requeued from their checkpoints."""
    probe: str = "04:00:00"
    """Linear probe."""
    scratch: str = "24:00:00"
    """Scratch baseline."""
    infer: str = "04:00:00"
    """Each task of the inference array."""

    def validate(self, prefix: str) -> None:
        for kind in ("extract", "pretrain", "probe", "scratch", "infer"):
            value = getattr(self, kind)
            try:
                minutes = parse_time_limit(value)
            except ValueError:
                minutes = -1
            _check(minutes >= 1, f"{prefix}.{kind}", value, "use a SLURM time of at least 1 minute, e.g. 04:00:00")


@dataclass
class SiteProfile:
    """Everything site-specific that the sbatch scripts and submitit jobs need."""

    account: str = ""
    """``--account`` to charge (empty: the user's default)."""
    partition: str = ""
    """``--partition`` (empty: the cluster's default)."""
    qos: str = ""
    """``--qos`` (empty: none)."""
    time: TimeLimits = field(default_factory=TimeLimits)
    """Time limit per job kind."""
    pretrain_nodes: int = 1
    """Nodes for pretraining (one torchrun per node); probe and scratch run on one node."""
    gpus_per_node: int = 0
    """GPUs per node, one training process each (0: CPU only, one process per node)."""
    gpu_type: str = ""
    """GPU type for ``--gpus-per-node=TYPE:N`` (empty: any)."""
    cpus_per_gpu: int = 0
    """``--cpus-per-gpu`` for GPU jobs (0: not set)."""
    cpus_per_task: int = 0
    """``--cpus-per-task`` (training: the one task per node; arrays: each task; 0: not set)."""
    mem: str = ""
    """``--mem`` per node of the training jobs (which hold whole nodes), e.g. ``64G`` or ``0`` (all of it);
    empty: not set."""
    array_mem: str = ""
    """``--mem`` of each extract / infer array task (one task, at most one GPU; several share a node, so never
    ``0``), e.g. ``32G``; empty: the cluster's default memory per CPU or GPU."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job's command, verbatim: ``module load ...``, ``source /path/.venv/bin/activate``."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Further sbatch options, one each, e.g. ``--constraint=a100`` or ``--exclusive``."""
    array_tasks: int = 8
    """Default number of tasks of the extraction and inference arrays (``--array N`` overrides)."""
    array_parallelism: int = 4
    """At most this many array tasks run at once (the ``%N`` of ``--array``)."""
    signal_lead_s: int = 300
    """Seconds before the time limit at which SLURM sends USR1 (submitit: USR2): every rank checkpoints and the job
    is requeued. At least 60 s below each training time limit, or the signal would come before training starts;
    slurmctld checks about every 30 s, so allow that plus one checkpoint."""
    python: str = ""
    """Python interpreter of the cytonet installation on the compute nodes (empty: the one rendering the script)."""
    job_name_prefix: str = "cytonet"
    """Job names are ``<prefix>-<kind>``."""
    max_requeues: int = DEFAULT_MAX_REQUEUES
    """How often a job may be requeued after a preemption or time-out checkpoint before it is left to fail
    (submitit: ``max_num_timeout``; sbatch scripts: ``hpc.requeue --max-requeues`` against
    ``$SLURM_RESTART_COUNT``, whose default is this default)."""

    @property
    def nproc_per_node(self) -> int:
        """Training processes per node: one per GPU, or one on a CPU node."""
        return max(self.gpus_per_node, 1)

    @property
    def python_path(self) -> str:
        return self.python or sys.executable

    def minutes(self, kind: str) -> int:
        """Time limit of ``kind`` in minutes."""
        return parse_time_limit(getattr(self.time, kind))

    def validate(self, prefix: str = "") -> None:
        def key(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        for name in ("account", "partition", "qos", "gpu_type", "job_name_prefix"):
            value = getattr(self, name)
            _check(
                value == "" or _TOKEN_RE.match(value) is not None,
                key(name),
                value,
                "use one word of letters, digits and _.,:@%+=/-[]() (no spaces, quotes, '#' or newlines)",
            )
        _check(bool(self.job_name_prefix), key("job_name_prefix"), self.job_name_prefix, "give a name")
        self.time.validate(key("time"))
        _check(self.pretrain_nodes >= 1, key("pretrain_nodes"), self.pretrain_nodes, ">= 1")
        _check(self.gpus_per_node >= 0, key("gpus_per_node"), self.gpus_per_node, ">= 0 (0: CPU only)")
        _check(self.cpus_per_gpu >= 0, key("cpus_per_gpu"), self.cpus_per_gpu, ">= 0 (0: not set)")
        _check(self.cpus_per_task >= 0, key("cpus_per_task"), self.cpus_per_task, ">= 0 (0: not set)")
        _check(
            self.mem == "" or _MEM_RE.match(self.mem) is not None,
            key("mem"),
            self.mem,
            "use a SLURM size such as 64G, 512000M or 0 (all of the node's memory)",
        )
        _check(
            self.array_mem == "" or (_MEM_RE.match(self.array_mem) is not None and self.array_mem != "0"),
            key("array_mem"),
            self.array_mem,
            "use a SLURM size such as 32G or 64000M (not 0: an array task would claim a whole node)",
        )
        for i, line in enumerate(self.setup):
            _check(
                "\n" not in line and "\r" not in line and "\0" not in line,
                f"{key('setup')}[{i}]",
                line,
                "one shell line per list item",
            )
        for i, option in enumerate(self.extra_sbatch):
            _check(
                _OPTION_RE.match(option) is not None,
                f"{key('extra_sbatch')}[{i}]",
                option,
                "one option per item, written --name or --name=value without spaces or quotes",
            )
            # sbatch takes any unambiguous start of an option's name (--partit=big is --partition=big)
            given = option[2:].split("=", 1)[0]
            name = next((n for n in SET_BY_CYTONET if n.startswith(given)), given)
            _check(
                name not in SET_BY_CYTONET,
                f"{key('extra_sbatch')}[{i}]",
                option,
                f"the scripts set --{name} "
                + (
                    f"from the profile's {SET_BY_CYTONET[name]}: set that instead"
                    if SET_BY_CYTONET.get(name)
                    else "themselves"
                ),
            )
        _check(self.array_tasks >= 1, key("array_tasks"), self.array_tasks, ">= 1")
        _check(self.array_parallelism >= 1, key("array_parallelism"), self.array_parallelism, ">= 1")
        _check(self.signal_lead_s >= 1, key("signal_lead_s"), self.signal_lead_s, ">= 1 s (e.g. 300)")
        for kind in TRAIN_KINDS:
            # A signal before the training loop listens ends the job with the requeue status and no progress: it
            # would be requeued again and again (until max_requeues).
            limit = getattr(self.time, kind)
            _check(
                self.signal_lead_s + SIGNAL_MARGIN_S <= parse_time_limit_s(limit),
                key("signal_lead_s"),
                self.signal_lead_s,
                f"the signal would come less than {SIGNAL_MARGIN_S} s after the start of a job with "
                f"{key('time.' + kind)}={limit!r} ({parse_time_limit_s(limit)} s): lower {key('signal_lead_s')} or "
                f"raise {key('time.' + kind)} to at least {key('signal_lead_s')} + {SIGNAL_MARGIN_S} s",
            )
        _check(
            self.python == "" or ("\n" not in self.python and "\0" not in self.python),
            key("python"),
            self.python,
            "give the path of the python executable on the compute nodes",
        )
        _check(self.max_requeues >= 0, key("max_requeues"), self.max_requeues, ">= 0")


def profile_from_dict(data: dict[str, object], where: str = "") -> SiteProfile:
    """Build and validate a :class:`SiteProfile` from a plain dict (``where`` names the source in errors)."""
    try:
        profile = build_dataclass(SiteProfile, data)
        profile.validate()
    except ConfigError as exc:
        raise ConfigError(f"site profile: {exc}{f' (in {where})' if where else ''}") from None
    return profile


def load_profile(path: str | Path) -> SiteProfile:
    """Load and validate the site profile at ``path``."""
    return profile_from_dict(read_yaml(path, "site profile"), str(path))
