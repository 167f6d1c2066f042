"""The ``cytonet`` command: ``cytonet <command> CONFIG [section.key=value ...] [--out DIR] [--overwrite]``.

The CLI only parses arguments, loads the config and calls the library; the work lives in the modules.
Exit codes: 0 ok, 2 usage or config error, 1 runtime failure. Errors print one line; ``--debug`` adds
the traceback. Every command that writes saves the resolved config into its output folder.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cytonet import __version__
from cytonet.config import THREADS, Config, config_to_yaml, expand_user, load_config
from cytonet.errors import ConfigError, CytonetError, UsageError
from cytonet.log import setup_logging
from hpc.env import LaunchEnv, LaunchEnvError  # wrong launcher variables: a usage error, like a bad flag

if TYPE_CHECKING:
    import submitit

log = logging.getLogger("cytonet.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def repo_configs_dir() -> Path:
    """The shipped ``configs/`` folder (next to the package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "configs"


def demo_config_path() -> Path:
    path = repo_configs_dir() / "demo.yaml"
    if not path.is_file():
        raise CytonetError(f"the shipped demo config {path} is missing; reinstall cytonet from its source checkout")
    return path


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error takes the same path (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # main() prints "cytonet: error: " before the message: the prog is named only in the help hint.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _CommandParser(_Parser):
    """A command's parser: options may come before, between or after CONFIG and the overrides
    (``cytonet synth CONFIG --out DIR synth.n_brains=2``).

    The subparsers action of the top-level parser calls ``parse_known_args``; it is routed to argparse's
    intermixed parsing, which parses the options first and then the positionals from what is left (plain
    parsing ends the ``nargs="*"`` overrides at the first option and rejects later ones as unrecognized).
    """

    _intermixed = False

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixed:  # the two passes of parse_known_intermixed_args call back in here
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    takes_config: bool = True
    writes: bool = True
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    positionals: Callable[[argparse.ArgumentParser], None] | None = None
    """Positional arguments that come before CONFIG (e.g. ``submit``'s command name)."""
    takes_overrides: bool = True


def _path_arg(value: str) -> str:
    """A path option's value: an empty one (``--out ""``, an unset shell variable) is refused, not taken as
    "not given" (the default folder) or as the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return value


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _out(args: argparse.Namespace) -> Path | None:
    """``--out`` as a path (``~`` expanded, as the shell does not in ``--out=~/x``), None when not given."""
    return expand_user(args.out, "--out") if args.out else None


# ---------------------------------------------------------------------------------------------------------
# Commands


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    sys.stdout.write(config_to_yaml(cfg))
    log.info("config %s is valid", args.config)
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from cytonet.pipeline import run_synth

    cfg = _load(args)
    out = _out(args) or cfg.resolve_path(cfg.synth.out_dir)
    run_synth(cfg, out, overwrite=args.overwrite, preview=args.preview, workers=args.workers)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from cytonet.data.importer import import_section

    cfg = _load(args)
    out = _out(args) or cfg.resolve_path(cfg.importer.out_dir)
    path = import_section(cfg, out, overwrite=args.overwrite)
    print(path)
    return EXIT_OK


def demo_config(args: argparse.Namespace) -> Config:
    """The demo's config: configs/demo.yaml, the overrides, and ``--out`` as ``run.root_dir``.

    ``--out`` is set as the string given (``~`` expanded), not parsed as an override's YAML value: ``try #2``
    would lose its comment-like tail, and ``2024-06-01``, ``null``, ``on`` or ``0755`` would stop being strings.
    """
    out = _out(args)
    flags = {"run.root_dir": ("--out", str(out))} if out is not None else None
    return load_config(demo_config_path(), args.overrides, flags=flags)


def cmd_demo(args: argparse.Namespace) -> int:
    from cytonet.pipeline import run_demo

    run_demo(demo_config(args), overwrite=args.overwrite, workers=args.workers)
    return EXIT_OK


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preview", action="store_true", help="also write preview.png: a section with its area overlay")
    p.add_argument(
        "--workers", type=worker_count, default=2, help="processes generating sections in parallel (default 2)"
    )


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def worker_count(text: str) -> int:
    """An argparse type: a number of worker processes, 1 to :data:`THREADS` (a large node's hardware threads)."""
    value = positive_int(text)
    if value > THREADS:
        raise argparse.ArgumentTypeError(f"{value} is more than {THREADS} processes")
    return value


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=worker_count, default=2, help="processes for parallel steps (default 2)")


def _array_share(args: argparse.Namespace, cfg: Config) -> tuple[LaunchEnv, int, int]:
    """(launcher environment, task id, task count) of a command that splits its work over array tasks and ranks.

    hpc/ reads the launcher: the SLURM array gives the task share (unless --task-id/--num-tasks say otherwise),
    torchrun / mpiexec / srun the ranks of this task. Such commands form no process group (every unit of work
    has one owner and workers never communicate), so rank and world size are all they need.
    """
    from hpc.env import detect

    launch = detect()
    task_id, num_tasks = launch.task_share(args.task_id, args.num_tasks)
    setup_logging("DEBUG" if args.debug else cfg.run.log_level, launch.rank, launch.world_size)
    return launch, task_id, num_tasks


def _task_args(what: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--task-id",
            type=int,
            default=None,
            help="this task's number, 0..N-1 (default: with --num-tasks, $SLURM_ARRAY_TASK_ID; without, the "
            "position in the SLURM job array; else 0); inside an array, give --num-tasks with it",
        )
        p.add_argument(
            "--num-tasks",
            type=int,
            default=None,
            help=f"number of array tasks sharing the {what} (default: the SLURM array's size, else 1); "
            "under torchrun, mpiexec or srun each task's ranks split its share further",
        )

    return add


def cmd_extract(args: argparse.Namespace) -> int:
    from cytonet.data.extract import run_extract

    cfg = _load(args)
    launch, task_id, num_tasks = _array_share(args, cfg)
    out = _out(args) or cfg.resolve_path(cfg.extract.out_dir)
    result = run_extract(
        cfg,
        out,
        overwrite=args.overwrite,
        task_id=task_id,
        num_tasks=num_tasks,
        workers=args.workers,
        rank=launch.rank,
        world_size=launch.world_size,
    )
    if result.manifest is not None:
        print(result.out)
    return EXIT_OK


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=worker_count, default=1, help="processes writing shards in this task (default 1)")
    _task_args("shards")(p)


def cmd_infer(args: argparse.Namespace) -> int:
    from cytonet.distributed import device_for
    from cytonet.infer.run import run_infer

    cfg = _load(args)
    launch, task_id, num_tasks = _array_share(args, cfg)
    env = launch.dist()
    result = run_infer(
        cfg,
        env,
        _out(args),
        task_id=task_id,
        num_tasks=num_tasks,
        overwrite=args.overwrite,
        device=device_for(env, cfg.dist),
    )
    if result.complete:
        print(result.out)
    return EXIT_OK


def cmd_store(args: argparse.Namespace) -> int:
    from cytonet.data.patches import check_store, describe_store

    if args.action == "info":
        print(describe_store(args.path))
    else:
        result = check_store(args.path, read_patches=not args.quick)
        note = ""
        if args.quick:
            note = "; metadata only (--quick): pixels not read"
        elif result.unchecked_pixels:
            note = (
                f"; pixels of {result.unchecked_pixels} shard(s) decompressed but not checksummed (the manifest has "
                "no checksums: extracted by an older cytonet)"
            )
        print(f"{args.path}: ok ({result.shards} shards, {result.patches} patches{note})")
    return EXIT_OK


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action", choices=["info", "check"], help="info: counts per split, area, brain; check: verify every shard"
    )
    p.add_argument("path", metavar="PATH", type=_path_arg, help="patch store folder (holding manifest.json)")
    p.add_argument("--quick", action="store_true", help="check: metadata only, do not decompress every patch")


def cmd_features(args: argparse.Namespace) -> int:
    from cytonet.analysis.run import compute_features

    cfg = _load(args)
    setup_logging("DEBUG" if args.debug else cfg.run.log_level)
    paths = compute_features(
        cfg,
        _out(args),
        splits=args.split or None,
        dense=args.dense,
        encoder_path=args.encoder,
        overwrite=args.overwrite,
    )
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    from cytonet.analysis.run import run_analysis

    cfg = _load(args)
    setup_logging("DEBUG" if args.debug else cfg.run.log_level)
    result = run_analysis(cfg, None, _out(args), encoder_path=args.encoder, overwrite=args.overwrite)
    print(result.report)
    return EXIT_OK


def _encoder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder",
        metavar="PATH",
        type=_path_arg,
        help="encoder.pt to use (default: encoder.pt in analysis.encoder_from, the pretraining run folder)",
    )


def _features_args(p: argparse.ArgumentParser) -> None:
    _encoder_arg(p)
    p.add_argument(
        "--split",
        action="append",
        choices=["train", "test", "unseen"],
        help="patch-store split to encode (repeatable; default: analysis.splits)",
    )
    p.add_argument(
        "--dense", action="store_true", help="also encode a dense grid over analysis.dense_sections (section maps)"
    )


def _job_failure(job: submitit.Job[Any], exc: Exception) -> str:
    """Why a submitit job failed: the last ``cytonet: error:`` line of its stderr log (submitit's exception ends
    with the log paths, not the cause), else the exception's first line; and where the log is."""
    err = Path(job.paths.stderr)
    reason = ""
    try:
        errors = [line for line in err.read_text(errors="replace").splitlines() if line.startswith("cytonet: error:")]
        reason = errors[-1].removeprefix("cytonet: error:").strip() if errors else ""
    except OSError:
        pass
    if not reason:
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        raised = [line for line in lines if "Error: " in line]  # the job's exception, inside submitit's trace
        reason = raised[-1] if raised else lines[0] if lines else type(exc).__name__
    return f"{reason} (log: {err})"


def cmd_submit(args: argparse.Namespace) -> int:
    from hpc.site import load_profile
    from hpc.submit import submit

    profile = load_profile(args.profile)
    jobs = submit(
        args.target, args.config, args.overrides, profile, local=args.local, array_tasks=args.array, folder=args.folder
    )
    for job in jobs:
        print(job.job_id)
    sys.stdout.flush()
    if args.wait:
        failed = 0
        for job in jobs:
            try:
                job.results()
            except Exception as exc:  # submitit raises several kinds; each is reported, the exit status counts them
                failed += 1
                print(f"cytonet: job {job.job_id} failed: {_job_failure(job, exc)}", file=sys.stderr)
        return EXIT_FAILURE if failed else EXIT_OK
    return EXIT_OK


def _submit_positionals(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", choices=["extract", "pretrain", "probe", "scratch", "infer"], metavar="COMMAND", help="what to run"
    )


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", required=True, metavar="FILE", type=_path_arg, help="site profile YAML (see configs/sites/)"
    )
    p.add_argument("--local", action="store_true", help="run through submitit's local executor instead of SLURM")
    p.add_argument(
        "--array", type=positive_int, metavar="N", help="extract/infer: number of array tasks (default: profile)"
    )
    p.add_argument(
        "--folder", metavar="DIR", type=_path_arg, help="submitit's folder (default: <run.root_dir>/submitit)"
    )
    p.add_argument("--wait", action="store_true", help="wait for the jobs; exit 1 if any failed")


def cmd_slurm(args: argparse.Namespace) -> int:
    from hpc.site import load_profile
    from hpc.slurm import DEFAULT_STAGES, check_array_kind, render, submit_jobs, submit_pipeline, write_script

    profile = load_profile(args.profile)
    if args.kind == "pipeline":
        if args.write is not None:
            raise UsageError("--write is for one job; a pipeline writes its scripts into <run.root_dir>/slurm/")
        stages = args.stages.split(",") if args.stages is not None else DEFAULT_STAGES
        for stage in submit_pipeline(profile, args.config, args.overrides, stages=stages, array_tasks=args.array):
            print(f"{stage.kind} {stage.job_id} {stage.script}")
        return EXIT_OK
    if args.stages is not None:
        raise UsageError(f"--stages is for a pipeline; `cytonet slurm {args.kind}` renders one job")
    check_array_kind(args.kind, args.array)
    job = render(args.kind, profile, args.config, args.overrides, array_tasks=args.array)
    path = Path(args.write) if args.write else job.log_dir / f"{args.kind}.sbatch"
    if args.submit:
        print(submit_jobs([job], [path])[0].job_id)  # the script file is written once sbatch took it
    elif args.write is not None:
        print(write_script(job, path))
    else:
        sys.stdout.write(job.script)
        if not job.log_dir.is_dir():
            print(
                f"cytonet: note: the job's log folder {job.log_dir} does not exist yet; sbatch needs it "
                "(mkdir -p it, or use --write or --submit, which create it)",
                file=sys.stderr,
            )
    return EXIT_OK


def _slurm_positionals(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "kind",
        choices=["extract", "pretrain", "probe", "scratch", "infer", "pipeline"],
        metavar="KIND",
        help="the job's command (extract, pretrain, probe, scratch, infer) or `pipeline` (submit a chain)",
    )


def _slurm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", required=True, metavar="FILE", type=_path_arg, help="site profile YAML (see configs/sites/)"
    )
    p.add_argument(
        "--array", type=positive_int, metavar="N", help="extract/infer: number of array tasks (default: profile)"
    )
    p.add_argument(
        "--write", metavar="FILE", type=_path_arg, help="write the script to FILE (and create its log folder)"
    )
    p.add_argument("--submit", action="store_true", help="write the script into <run.root_dir>/slurm/ and sbatch it")
    p.add_argument(
        "--stages",
        help="pipeline: stages chained with --dependency=afterok (default pretrain,probe,infer)",
    )


def _train_command(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from cytonet.train.loop import run_stage
        from cytonet.train.preempt import Preempted
        from hpc.launch import dist_env

        if args.overwrite and args.resume is not None:
            # --overwrite deletes the checkpoints that --resume asks to continue from (or --no-resume to keep)
            raise UsageError(f"--overwrite starts {kind} again: it cannot be combined with --resume or --no-resume")
        cfg = _load(args)
        # hpc/ reads the launcher's variables (and settles an MPI rendezvous); cytonet gets plain values.
        env = dist_env()
        setup_logging("DEBUG" if args.debug else cfg.run.log_level, env.rank, env.world_size)
        resume = False if args.overwrite else args.resume
        try:
            run_stage(cfg, env, kind, out=_out(args), resume=resume, fresh=args.overwrite)  # type: ignore[arg-type]
        except Preempted as exc:
            log.warning("%s", exc)
            return exc.exit_code
        return EXIT_OK

    return run


def _train_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const=True,
        default=None,
        help="require a checkpoint in the run folder and continue from it (default: resume when one exists)",
    )
    group.add_argument(
        "--no-resume", dest="resume", action="store_const", const=False, help="refuse a run folder with checkpoints"
    )


COMMANDS: list[Command] = [
    Command("synth", "generate synthetic brains into section stores", cmd_synth, extra_args=_synth_args),
    Command("import", "import a real section (TIFF/OME-TIFF, HDF5, zarr) into a section store", cmd_import),
    Command(
        "extract",
        "sample class-balanced patches from section stores into a sharded patch store (array tasks: --task-id)",
        cmd_extract,
        extra_args=_extract_args,
    ),
    Command(
        "store",
        "inspect a patch store: `store info PATH` (counts) or `store check PATH` (verify shards)",
        cmd_store,
        takes_config=False,
        writes=False,
        extra_args=_store_args,
        takes_overrides=False,
    ),
    Command(
        "pretrain",
        "contrastive pretraining (supcon or distance-weighted) with DDP; run under torchrun for several ranks",
        _train_command("pretrain"),
        extra_args=_train_args,
    ),
    Command(
        "probe",
        "linear probe on the frozen pretrained encoder; weighted F1, top-1, top-3 on held-out data",
        _train_command("probe"),
        extra_args=_train_args,
    ),
    Command(
        "scratch",
        "baseline: encoder plus linear head trained end to end with cross-entropy",
        _train_command("scratch"),
        extra_args=_train_args,
    ),
    Command(
        "infer",
        "per-area probability maps and label maps of whole sections into OME-Zarr/HDF5 (resumable; array tasks)",
        cmd_infer,
        extra_args=_task_args("blocks"),
    ),
    Command(
        "features",
        "encoder features (before the projection head) of patch-store splits or a dense grid, as chunked zarr",
        cmd_features,
        extra_args=_features_args,
    ),
    Command(
        "analyze",
        "Ward clusters, t-SNE, UMAP, NMF factors and section maps of the features; figures, tables, report.html",
        cmd_analyze,
        extra_args=_encoder_arg,
    ),
    Command(
        "submit",
        "submit a command through submitit to SLURM (or --local): checkpointed, requeued and resumed on preemption",
        cmd_submit,
        writes=False,
        positionals=_submit_positionals,
        extra_args=_submit_args,
    ),
    Command(
        "slurm",
        "render the sbatch script of a command from a site profile (print, --write, --submit) or submit a pipeline",
        cmd_slurm,
        writes=False,
        positionals=_slurm_positionals,
        extra_args=_slurm_args,
    ),
    Command("check-config", "load and validate a config, print it resolved", cmd_check_config, writes=False),
    Command(
        "demo",
        "run the whole pipeline on built-in synthetic brains (no config needed)",
        cmd_demo,
        takes_config=False,
        extra_args=_demo_args,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cytonet",
        description="Cytoarchitectonic mapping of whole histological brain sections: synthetic data, sharded patch "
        "stores, distributed contrastive pretraining, evaluation and whole-section inference.",
        epilog="Most commands take the shape cytonet <command> CONFIG [section.key=value ...] [--out DIR] "
        "[--overwrite] (see cytonet <command> --help). Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.",
    )
    parser.add_argument("--version", action="version", version=f"cytonet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_CommandParser)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.positionals:
            c.positionals(p)
        if c.takes_config:
            p.add_argument("config", metavar="CONFIG", type=_path_arg, help="YAML config (see configs/)")
        if c.takes_overrides:
            p.add_argument(
                "overrides",
                nargs="*",
                default=[],  # not "required": an empty list is a valid value
                metavar="section.key=value",
                help="dotted overrides, e.g. synth.n_brains=2 (before or after the options)",
            )
        else:
            p.set_defaults(overrides=[])
        if c.writes:
            p.add_argument("--out", metavar="DIR", type=_path_arg, help="output folder (default: from the config)")
            p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        p.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")
        if c.extra_args:
            c.extra_args(p)
        p.set_defaults(_command=c)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (and ``sys.exit``s with it when run as a script)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not faulthandler.is_enabled():
        # A rank that crashes in native code (SIGSEGV, or SIGABRT from a C++ library such as gloo) prints every
        # thread's Python stack to stderr, which SLURM keeps; SIGABRT also dumps the stacks of a hung rank.
        faulthandler.enable(all_threads=True)
    setup_logging("DEBUG" if debug else "INFO")
    try:
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return EXIT_OK if argv else EXIT_USAGE
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            command = getattr(args, "command", None)
            hint = f"cytonet {command} --help" if command else "cytonet --help"
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see `{hint}`)")
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        for item in args.overrides:
            if "=" not in item:
                raise UsageError(f"{item!r} is not an override: use section.key=value")
        started = time.perf_counter()
        code = args._command.run(args)
        log.debug("%s finished in %.1f s", args.command, time.perf_counter() - started)
        return code
    except (ConfigError, UsageError, LaunchEnvError) as exc:
        if debug:
            raise
        print(f"cytonet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CytonetError as exc:
        if debug:
            raise
        print(f"cytonet: error: {one_line(exc, first=False)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("cytonet: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"cytonet: error: {exc.strerror}{where}: free space (or quota) and rerun; finished work is kept "
                "and skipped",
                file=sys.stderr,
            )
        else:
            print(f"cytonet: error: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        if debug:
            raise
        print(
            f"cytonet: error: unexpected {exc.__class__.__name__}: {one_line(exc)} (run with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def one_line(exc: BaseException, first: bool = True) -> str:
    """The error's message: an error re-raised from a DataLoader worker carries the worker's whole traceback
    ("Caught InputError in DataLoader worker process 0. Original Traceback ..."), whose last line is the
    message; others' first line (``first``: a library's message may run to a page), or all of it."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    if "Original Traceback" in text:
        _, sep, message = lines[-1].partition(": ")  # "cytonet.errors.InputError: shard ... does not exist"
        return message if sep else lines[-1]
    return lines[0] if first else text


if __name__ == "__main__":
    sys.exit(main())
