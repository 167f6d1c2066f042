"""sbatch scripts from the templates in ``slurm/`` and a site profile, and their submission with sbatch.

Entry points: :func:`render` (kind, profile, config -> :class:`RenderedJob`), :func:`write_script`,
:func:`sbatch`, :func:`submit_pipeline` (pretrain -> probe -> infer chained with ``--dependency=afterok``).

Templates hold ``#SBATCH`` lines and one command line with ``{{placeholders}}``; there is no logic in bash.
Training kinds (pretrain, probe, scratch) use ``slurm/train.sbatch``: one task per node running
``hpc.torchrun`` (torchrun with the rendezvous at the first node) under ``hpc.requeue`` (requeues the job when
the step exits 75 after a preemption checkpoint). Array kinds (extract, infer) use ``slurm/array.sbatch``.

Quoting: every value that reaches the shell (interpreter, config path, overrides) goes through
``shlex.quote``, so a config path such as ``x'$(touch /tmp/pwned)'`` arrives as that literal string. Values on
``#SBATCH`` lines (which sbatch parses itself) must be one plain token and are refused otherwise. The profile's
``setup`` lines are shell code by design and written verbatim.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cytonet.config import load_config
from cytonet.errors import ConfigError, CytonetError, UsageError
from hpc.site import _TOKEN_RE, SiteProfile

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
TRAIN_KINDS = ("pretrain", "probe", "scratch")
ARRAY_KINDS = ("extract", "infer")
KINDS = ("extract", "pretrain", "probe", "scratch", "infer")
#: What ``cytonet slurm pipeline`` submits unless told otherwise.
DEFAULT_STAGES = ("pretrain", "probe", "infer")
#: The order of a pipeline's stages: each needs the output of those before it (probe and scratch: either way).
STAGE_ORDER = {"extract": 0, "pretrain": 1, "probe": 2, "scratch": 2, "infer": 3}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
#: How long sbatch may take to answer (a controller under load answers in seconds).
SBATCH_TIMEOUT_S = 120


class SlurmError(CytonetError):
    """sbatch (or another SLURM client) refused or failed; carries its message."""


@dataclass(frozen=True)
class RenderedJob:
    """A rendered sbatch script and where its log files go (the folder must exist before sbatch)."""

    kind: str
    script: str
    log_dir: Path


def _sbatch_value(key: str, value: str) -> str:
    """A value for an ``#SBATCH`` line: one plain token, else a :class:`ConfigError` naming ``key``."""
    if not _TOKEN_RE.match(value):
        raise ConfigError(
            f"{key}={value!r} cannot go on an #SBATCH line: use letters, digits and _.,:@%+=/-[]() only "
            "(no spaces, quotes, '#' or newlines)"
        )
    return value


def _gpus(kind: str, profile: SiteProfile) -> int:
    """GPUs per node of a ``kind`` job: the profile's for training, one per inference array task, else none."""
    if kind in TRAIN_KINDS:
        return profile.gpus_per_node
    return 1 if kind == "infer" and profile.gpus_per_node else 0


def _sets_cpus_per_task(kind: str, profile: SiteProfile) -> bool:
    """Whether the script asks for ``--cpus-per-task`` (GPU jobs with ``cpus_per_gpu`` ask per GPU instead)."""
    return bool(profile.cpus_per_task) and not (_gpus(kind, profile) and profile.cpus_per_gpu)


def _site_sbatch(kind: str, profile: SiteProfile) -> list[str]:
    lines = []
    for name in ("account", "partition", "qos"):
        value = getattr(profile, name)
        if value:
            lines.append(f"--{name}={_sbatch_value(name, value)}")
    gpus = _gpus(kind, profile)
    if gpus:
        lines.append(f"--gpus-per-node={profile.gpu_type + ':' if profile.gpu_type else ''}{gpus}")
    if _sets_cpus_per_task(kind, profile):
        lines.append(f"--cpus-per-task={profile.cpus_per_task}")
    elif gpus and profile.cpus_per_gpu:
        lines.append(f"--cpus-per-gpu={profile.cpus_per_gpu}")
    # ``mem`` is per node (``0``: all of it), meant for training jobs, which hold whole nodes. An array task is
    # one task with at most one GPU: several share a node, so it takes ``array_mem`` or the cluster's default
    # memory per CPU or GPU instead of the node's (with ``--mem=0`` one task would block every other).
    mem = profile.mem if kind in TRAIN_KINDS else profile.array_mem
    if mem:
        lines.append(f"--mem={mem}")
    lines.extend(profile.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def _srun_env(kind: str, profile: SiteProfile) -> str:
    """Shell lines before srun: srun of SLURM 22.05 to 23.02 does not inherit sbatch's ``--cpus-per-task`` (the
    step's tasks would get one CPU each where tasks are bound to CPUs) unless SRUN_CPUS_PER_TASK says it again."""
    if not _sets_cpus_per_task(kind, profile):
        return ""
    return (
        "# srun of SLURM 22.05-23.02 does not inherit --cpus-per-task from sbatch (srun(1)): pass it on\n"
        'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"'
    )


def _fill(template: str, values: dict[str, str], name: str) -> str:
    """Replace ``{{key}}``; a line that is only a placeholder takes a multi-line value or disappears when empty."""
    out = []
    for line in template.splitlines():
        m = _PLACEHOLDER.fullmatch(line.strip())
        if m is not None:
            if m.group(1) not in values:
                raise KeyError(f"template {name}: no value for {{{{{m.group(1)}}}}}")
            if values[m.group(1)]:
                out.append(values[m.group(1)])
            continue

        def sub(match: re.Match[str]) -> str:
            if match.group(1) not in values:
                raise KeyError(f"template {name}: no value for {{{{{match.group(1)}}}}}")
            return values[match.group(1)]

        out.append(_PLACEHOLDER.sub(sub, line))
    return "\n".join(out) + "\n"


def check_array_kind(kind: str, array_tasks: int | None) -> None:
    """Refuse ``--array`` for a kind that is not a job array (it would be ignored)."""
    if array_tasks is not None and kind not in ARRAY_KINDS:
        raise UsageError(f"--array is for {' and '.join(ARRAY_KINDS)}, not {kind}")


def _logical_cwd() -> Path:
    """The current folder as the shell names it (``$PWD``, through symbolic links, which may be the name that
    holds on the compute nodes), else as the kernel does."""
    pwd = os.environ.get("PWD", "")
    try:
        if os.path.isabs(pwd) and os.path.samefile(pwd, "."):
            return Path(pwd)
    except OSError:
        pass
    return Path.cwd()


def render(
    kind: str,
    profile: SiteProfile,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    array_tasks: int | None = None,
) -> RenderedJob:
    """The sbatch script running ``cytonet <kind> CONFIG [overrides]`` under ``profile``.

    The config is loaded (and so validated) here, so that a bad config fails at submission, not in the queue.
    Logs go to ``<run.root_dir>/slurm/`` (``%x-%j.out``; arrays ``%x-%A_%a.out``), appended across requeues.
    The job runs in the current folder, whatever folder it is submitted from: a relative ``run.root_dir`` (as
    the shipped configs have) then names the same run when a failed task is resubmitted from elsewhere.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    config = Path(config_path).resolve()
    cfg = load_config(config, list(overrides))
    log_dir = cfg.resolve_path("slurm").resolve()
    workdir = _logical_cwd()  # what relative paths in the config and overrides are relative to
    if "%" in str(log_dir):  # sbatch would expand it in --output, into a folder nobody created
        raise ConfigError(f"run.root_dir: the log folder {log_dir} holds a '%', which sbatch expands in --output")
    is_array = kind in ARRAY_KINDS
    tasks = profile.array_tasks if array_tasks is None else array_tasks
    if tasks < 1:
        raise UsageError(f"--array={tasks}: an array needs at least 1 task")
    values = {
        "kind": kind,
        "job_name": _sbatch_value("job_name_prefix", f"{profile.job_name_prefix}-{kind}"),
        "time": getattr(profile.time, kind),
        "output": _sbatch_value(
            f"--output (in the log folder below run.root_dir={cfg.run.root_dir!r})",
            str(log_dir / ("%x-%A_%a.out" if is_array else "%x-%j.out")),
        ),
        "workdir": shlex.quote(str(workdir)),
        "site_sbatch": "\n".join(_site_sbatch(kind, profile)),
        "setup": "\n".join(profile.setup),
        "srun_env": _srun_env(kind, profile),
        "python": shlex.quote(profile.python_path),
        "command": " ".join(shlex.quote(arg) for arg in [kind, str(config), *overrides]),
    }
    if is_array:
        values.update(last_task=str(tasks - 1), parallelism=str(profile.array_parallelism), num_tasks=str(tasks))
        name = "array.sbatch"
    else:
        nodes = profile.pretrain_nodes if kind == "pretrain" else 1
        values.update(
            nodes=str(nodes),
            signal_lead_s=str(profile.signal_lead_s),
            nproc_per_node=str(profile.nproc_per_node),
            max_requeues=str(profile.max_requeues),
        )
        name = "train.sbatch"
    script = _fill((TEMPLATE_DIR / name).read_text(), values, name)
    return RenderedJob(kind, script, log_dir)


#: How every script cytonet renders begins: an existing file that does not is never replaced by ``--write``.
SCRIPT_HEAD = "#!/bin/bash\n# cytonet "


def _script_file(path: str | Path) -> Path:
    """``path`` as a script's file name: a folder, or a file other than a script cytonet wrote (a config given
    as ``--write`` by mistake), is refused; an earlier script is replaced."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--write {p}: that is a folder; give the script's file name")
    if p.exists() or p.is_symlink():
        try:
            with open(p, "rb") as f:
                head = f.read(len(SCRIPT_HEAD)).decode("utf-8", "replace")
        except OSError as exc:
            head = f"unreadable: {exc.strerror}"
        if head != SCRIPT_HEAD:
            raise UsageError(
                f"{p} exists and is not a script cytonet wrote: it is not replaced by one; remove it or write the "
                "script elsewhere"
            )
    return p


def write_script(job: RenderedJob, path: str | Path) -> Path:
    """Write the script (mode 0755) and create its log folder; returns the path."""
    p = _script_file(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(job.script)
    tmp.chmod(0o755)
    tmp.replace(p)
    return p


def sbatch(
    script: str | Path, *, after_ok: str | None = None, extra: Sequence[str] = (), text: str | None = None
) -> str:
    """Submit ``script`` with sbatch and return the job id. ``after_ok``: a job id that must finish successfully
    first (``--dependency=afterok``; the job is cancelled if that one fails: ``--kill-on-invalid-dep=yes``).
    ``text``: submit this script on sbatch's stdin instead of the file (``script`` names it in messages)."""
    cmd = ["sbatch", "--parsable"]
    if after_ok is not None:
        cmd += [f"--dependency=afterok:{after_ok}", "--kill-on-invalid-dep=yes"]
    cmd += [*extra] if text is not None else [*extra, str(script)]
    try:
        r = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SlurmError("sbatch is not installed here: submit from a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"`{shlex.join(cmd)}` gave no answer in {SBATCH_TIMEOUT_S} s (a busy controller?): the job may have been "
            "submitted; look with squeue before submitting again"
        ) from None
    if r.returncode != 0:
        said = " / ".join(line.strip() for line in r.stderr.strip().splitlines())  # one line, as CLI errors are
        raise SlurmError(f"`{shlex.join(cmd)}` failed ({r.returncode}): {said}")
    # "<id>" or "<id>;<cluster>" on the last line: a site's sbatch wrapper may print notices before it.
    lines = r.stdout.strip().splitlines()
    job_id = lines[-1].strip().split(";")[0] if lines else ""
    if not job_id.isdigit():
        raise SlurmError(
            f"`{shlex.join(cmd)}` succeeded but printed no job id ({r.stdout.strip()[:200]!r}): the job may have been "
            "submitted; look with squeue before submitting again"
        )
    log.info("submitted %s as job %s%s", script, job_id, f" (after {after_ok})" if after_ok else "")
    return job_id


@dataclass(frozen=True)
class SubmittedStage:
    kind: str
    job_id: str
    script: Path


def check_stages(stages: Sequence[str]) -> None:
    """Refuse a pipeline's stage list that is empty, names an unknown or empty stage, repeats one, or puts a stage
    before one it needs (:data:`STAGE_ORDER`): infer before pretrain would map with the old model."""
    listed = ",".join(stages)
    bad = [s for s in stages if s not in KINDS]
    if bad or not stages:
        raise UsageError(f"--stages {listed}: use a comma-separated list of {', '.join(KINDS)}")
    twice = sorted({s for s in stages if stages.count(s) > 1})
    if twice:
        raise UsageError(f"--stages {listed}: {twice[0]} is listed twice; each stage runs once")
    ranks = [STAGE_ORDER[s] for s in stages]
    if ranks != sorted(ranks):
        raise UsageError(
            f"--stages {listed}: out of order; each stage needs the ones before it: extract, pretrain, "
            "probe and scratch (either way), infer"
        )


def submit_jobs(jobs: Sequence[RenderedJob], script_names: Sequence[Path]) -> list[SubmittedStage]:
    """Submit ``jobs`` in order, each after the previous one succeeded (``--dependency=afterok``), and write
    their scripts to ``script_names`` once every submission went through. A refused submission cancels the
    jobs submitted before it and leaves the scripts already there as they were (a resubmission of failed array
    tasks uses them); :class:`SlurmError` says which jobs were cancelled. Log folders are created first: a job
    whose log folder is missing fails without a word."""
    for path in script_names:  # before anything is submitted
        _script_file(path)
    submitted: list[SubmittedStage] = []
    previous: str | None = None
    try:
        for job, path in zip(jobs, script_names):
            job.log_dir.mkdir(parents=True, exist_ok=True)
            previous = sbatch(path, after_ok=previous, text=job.script)
            submitted.append(SubmittedStage(job.kind, previous, Path(path)))
        for job, stage in zip(jobs, submitted):
            write_script(job, stage.script)
    except (SlurmError, OSError) as exc:
        if not submitted:
            raise
        ids = [s.job_id for s in submitted]
        r = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S, check=False)
        done = "cancelled" if r.returncode == 0 else f"could not cancel them ({r.stderr.strip()}): scancel"
        raise SlurmError(
            f"{exc}; {done} the jobs submitted: " + ", ".join(f"{s.kind} {s.job_id}" for s in submitted)
        ) from None
    return submitted


def submit_pipeline(
    profile: SiteProfile,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    stages: Sequence[str] = DEFAULT_STAGES,
    array_tasks: int | None = None,
) -> list[SubmittedStage]:
    """Render the scripts of ``stages`` into ``<run.root_dir>/slurm/`` and submit them, each after the previous
    one succeeded (``--dependency=afterok``); a failed stage cancels the ones after it (:func:`submit_jobs`)."""
    check_stages(stages)
    jobs = [render(kind, profile, config_path, overrides, array_tasks=array_tasks) for kind in stages]
    return submit_jobs(jobs, [job.log_dir / f"{job.kind}.sbatch" for job in jobs])
