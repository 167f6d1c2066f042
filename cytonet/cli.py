"""The ``cytonet`` command: ``cytonet <command> CONFIG [section.key=value ...] [--out DIR] [--overwrite]``.

The CLI only parses arguments, loads the config and calls the library; the work lives in the modules.
Exit codes: 0 ok, 2 usage or config error, 1 runtime failure. Errors print one line; ``--debug`` adds
the traceback. Every command that writes saves the resolved config into its output folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cytonet import __version__
from cytonet.config import Config, config_to_yaml, load_config
from cytonet.errors import ConfigError, CytonetError, UsageError
from cytonet.log import setup_logging

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
        raise UsageError(f"{self.prog}: {message}")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    takes_config: bool = True
    writes: bool = True
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


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
    out = Path(args.out) if args.out else cfg.resolve_path(cfg.synth.out_dir)
    run_synth(cfg, out, overwrite=args.overwrite, preview=args.preview, workers=args.workers)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from cytonet.data.importer import import_section

    cfg = _load(args)
    out = Path(args.out) if args.out else cfg.resolve_path(cfg.importer.out_dir)
    path = import_section(cfg, out, overwrite=args.overwrite)
    print(path)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from cytonet.pipeline import run_demo

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.root_dir={args.out}")
    cfg = load_config(demo_config_path(), overrides)
    run_demo(cfg, overwrite=args.overwrite, workers=args.workers)
    return EXIT_OK


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preview", action="store_true", help="also write preview.png: a section with its area overlay")
    p.add_argument("--workers", type=int, default=2, help="processes generating sections in parallel (default 2)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="processes for parallel steps (default 2)")


def cmd_extract(args: argparse.Namespace) -> int:
    from cytonet.data.extract import run_extract

    cfg = _load(args)
    out = Path(args.out) if args.out else cfg.resolve_path(cfg.extract.out_dir)
    result = run_extract(
        cfg, out, overwrite=args.overwrite, task_id=args.task_id, num_tasks=args.num_tasks, workers=args.workers
    )
    if result.manifest is not None:
        print(result.out)
    return EXIT_OK


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in this task (default 1)")
    p.add_argument(
        "--task-id", type=int, default=0, help="this task's number, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID; default 0)"
    )
    p.add_argument("--num-tasks", type=int, default=1, help="number of array tasks sharing the work (default 1)")


def cmd_store(args: argparse.Namespace) -> int:
    from cytonet.data.patches import check_store, describe_store

    if args.overrides:
        raise UsageError(f"store takes no overrides, got {args.overrides}")
    if args.action == "info":
        print(describe_store(args.path))
    else:
        result = check_store(args.path, read_patches=not args.quick)
        print(f"{args.path}: ok ({result.shards} shards, {result.patches} patches)")
    return EXIT_OK


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action", choices=["info", "check"], help="info: counts per split, area, brain; check: verify every shard"
    )
    p.add_argument("path", metavar="PATH", help="patch store folder (holding manifest.json)")
    p.add_argument("--quick", action="store_true", help="check: metadata only, do not decompress every patch")


def _train_command(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from cytonet.train.loop import run_stage
        from cytonet.train.preempt import Preempted
        from hpc.env import detect

        cfg = _load(args)
        env = detect().dist()  # hpc/ reads the launcher's variables; cytonet gets plain values
        setup_logging("DEBUG" if args.debug else cfg.run.log_level, env.rank, env.world_size)
        resume = False if args.overwrite else args.resume
        try:
            run_stage(cfg, env, kind, out=Path(args.out) if args.out else None, resume=resume, fresh=args.overwrite)  # type: ignore[arg-type]
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
        epilog="Shape of every command: cytonet <command> CONFIG [section.key=value ...] [--out DIR] [--overwrite]. "
        "Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.",
    )
    parser.add_argument("--version", action="version", version=f"cytonet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.takes_config:
            p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
        p.add_argument(
            "overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. synth.n_brains=2"
        )
        if c.writes:
            p.add_argument("--out", metavar="DIR", help="output folder (default: from the config)")
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
    setup_logging("DEBUG" if debug else "INFO")
    try:
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return EXIT_OK if argv else EXIT_USAGE
        args = parser.parse_args(argv)
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
    except (ConfigError, UsageError) as exc:
        if debug:
            raise
        print(f"cytonet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CytonetError as exc:
        if debug:
            raise
        print(f"cytonet: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("cytonet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"cytonet: error: unexpected {exc.__class__.__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
