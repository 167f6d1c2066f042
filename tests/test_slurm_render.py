"""Site profiles and sbatch script rendering: golden files, strict profile validation, quoting that keeps hostile
config paths and overrides literal when the rendered script runs under bash, the torchrun layout under srun."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cytonet.cli import build_parser
from cytonet.errors import ConfigError, UsageError
from hpc.env import LaunchEnvError, detect
from hpc.requeue import requeue_target
from hpc.site import SiteProfile, load_profile, parse_time_limit, parse_time_limit_s, profile_from_dict
from hpc.slurm import KINDS, render
from hpc.torchrun import torchrun_argv

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLE = REPO / "configs" / "sites" / "example.yaml"
PAPER = REPO / "configs" / "paper-isbi2021.yaml"
#: Set to 1 to rewrite the golden files from the current templates (then review the diff).
UPDATE = os.environ.get("CYTONET_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sites").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_load(path: Path) -> None:
    assert isinstance(load_profile(path), SiteProfile)


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_scripts_match_golden_files(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the folder the job runs in: where it was rendered
    job = render(kind, load_profile(EXAMPLE), PAPER, ["run.root_dir=/scratch/brainmap/isbi2021"])
    # The config path is absolute; the golden files show the checkout at /opt/cytonet.
    script = job.script.replace(str(REPO), "/opt/cytonet")
    golden = GOLDEN / f"{kind}.sbatch"
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text(), f"{kind}: rendered script differs from {golden} (CYTONET_UPDATE_GOLDEN=1)"
    assert job.log_dir == Path("/scratch/brainmap/isbi2021/slurm")


def test_array_size_and_parallelism_come_from_profile_or_argument() -> None:
    profile = load_profile(EXAMPLE)
    assert "#SBATCH --array=0-31%8\n" in render("infer", profile, PAPER).script
    assert "#SBATCH --array=0-4%8\n" in render("extract", profile, PAPER, array_tasks=5).script
    with pytest.raises(UsageError, match="at least 1 task"):
        render("infer", profile, PAPER, array_tasks=0)


def record_argv(path: Path, record: Path) -> Path:
    """An executable at ``path`` that writes its arguments and SRUN_CPUS_PER_TASK to ``record`` (JSON)."""
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump([sys.argv[1:], os.environ.get('SRUN_CPUS_PER_TASK')], open({str(record)!r}, 'w'))\n"
    )
    path.chmod(0o755)
    return path


def test_array_script_gives_any_resubmitted_task_its_own_share_and_srun_the_cpus(tmp_path: Path) -> None:
    """The extraction array script of 8 tasks under bash as task 5 of a resubmission `sbatch --array=2,5` (the
    variables SLURM 22.05 sets for it), srun recording what it was given: cytonet gets share 5 of 8, and srun the
    script's CPUs per task (srun of 22.05-23.02 does not inherit them from sbatch)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    record_argv(bin_dir / "srun", record)
    script = tmp_path / "extract.sbatch"
    script.write_text(render("extract", SiteProfile(cpus_per_task=4), PAPER, array_tasks=8).script)
    resubmitted = {
        "SLURM_ARRAY_JOB_ID": "900",
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "2",
        "SLURM_ARRAY_TASK_MAX": "5",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_STEP": "1",
        "SLURM_CPUS_PER_TASK": "4",
    }
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **resubmitted}
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv, srun_cpus = json.loads(record.read_text())
    assert srun_cpus == "4"
    assert argv[:3] == [sys.executable, "-m", "cytonet.cli"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.config) == ("extract", str(PAPER))
    assert detect(resubmitted).task_share(args.task_id, args.num_tasks) == (5, 8)


def test_memory_per_node_and_cpus_per_task_go_where_they_belong() -> None:
    """``mem`` (per node) on training scripts only; the srun CPU hand-over exactly where --cpus-per-task is set,
    after the #SBATCH lines (sbatch reads none after the first command)."""
    gpu = SiteProfile(gpus_per_node=4, cpus_per_gpu=8, cpus_per_task=8, mem="0")
    scripts = {kind: render(kind, gpu, PAPER).script for kind in KINDS}
    assert [kind for kind, text in scripts.items() if "#SBATCH --mem=0\n" in text] == ["pretrain", "probe", "scratch"]
    handover = 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"\n'
    assert [kind for kind, text in scripts.items() if handover in text] == ["extract"]  # GPU jobs: --cpus-per-gpu
    cpu = render("pretrain", SiteProfile(cpus_per_task=16, mem="64G"), PAPER).script
    assert "#SBATCH --cpus-per-task=16\n" in cpu and "#SBATCH --mem=64G\n" in cpu
    assert cpu.rindex("#SBATCH") < cpu.index(handover) < cpu.index("-m hpc.requeue --max-requeues=10 -- srun ")
    assert handover not in render("pretrain", SiteProfile(), PAPER).script
    # The profile's max_requeues reaches the requeue wrapper of the training scripts.
    assert "-m hpc.requeue --max-requeues=3 -- srun " in render("probe", SiteProfile(max_requeues=3), PAPER).script
    # Array tasks take their own, per-task memory where the profile gives one.
    sized = SiteProfile(gpus_per_node=4, mem="0", array_mem="48G")
    assert "#SBATCH --mem=48G\n" in render("infer", sized, PAPER).script
    assert "#SBATCH --mem=0\n" in render("probe", sized, PAPER).script


def test_submitit_array_tasks_take_array_memory_not_the_nodes(tmp_path: Path) -> None:
    from hpc.submit import make_executor

    profile = SiteProfile(gpus_per_node=4, mem="0", array_mem="48G")
    for command, mem in [("infer", "48G"), ("extract", "48G"), ("pretrain", "0")]:
        executor = make_executor(command, profile, tmp_path, local=False)
        assert executor.parameters.get("mem") == mem, command  # type: ignore[attr-defined]
    assert "mem" not in make_executor("infer", SiteProfile(mem="0"), tmp_path, local=False).parameters  # type: ignore[attr-defined]


def test_unknown_profile_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'acount'.*valid keys: account, partition, qos, time"):
        profile_from_dict({"acount": "x"})
    with pytest.raises(ConfigError, match=r"unknown key 'time.pretrian'.*valid keys: extract, pretrain"):
        profile_from_dict({"time": {"pretrian": "10"}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"account": "lab\n#SBATCH --qos=high"}, "account"),
        ({"partition": "gpu booster"}, "partition"),
        ({"qos": "'x'"}, "qos"),
        ({"time": {"pretrain": "tomorrow"}}, "time.pretrain"),
        ({"time": {"probe": "0"}}, "time.probe"),
        ({"mem": "lots"}, "mem"),
        ({"array_mem": "0"}, "array_mem"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"gpus_per_node": "4"}, "gpus_per_node"),
        ({"setup": ["module load x\nrm -rf /"]}, r"setup\[0\]"),
        ({"extra_sbatch": ["--constraint=a100 --exclusive"]}, r"extra_sbatch\[0\]"),
        ({"extra_sbatch": ["constraint=a100"]}, r"extra_sbatch\[0\]"),
        # options the scripts set from a key, or themselves: the later line would silently win
        ({"extra_sbatch": ["--exclusive", "--time=5"]}, r"extra_sbatch\[1\]"),
        ({"extra_sbatch": ["--output=x.log"]}, r"extra_sbatch\[0\]"),
        ({"array_parallelism": 0}, "array_parallelism"),
        ({"time": {"probe": "5"}}, "signal_lead_s"),
        ({"time": {"scratch": "6"}, "signal_lead_s": 301}, "signal_lead_s"),
        ({"time": {"pretrain": 90}}, r"time\.pretrain"),
    ],
)
def test_bad_profile_values_are_refused_naming_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^site profile: {key}=") as info:
        profile_from_dict(data)
    if data == {"time": {"pretrain": 90}}:  # a bare YAML number where a time string goes
        assert 'expected a string (quote it in YAML: "90")' in str(info.value)


def test_extra_sbatch_options_the_scripts_set_name_the_key_to_use() -> None:
    with pytest.raises(ConfigError, match=r"'--time=5' is invalid: the scripts set --time from the profile's time\."):
        profile_from_dict({"extra_sbatch": ["--time=5"]})
    with pytest.raises(ConfigError, match=r"'--output=x' is invalid: the scripts set --output themselves"):
        profile_from_dict({"extra_sbatch": ["--output=x"]})
    with pytest.raises(ConfigError, match=r"'--partit=big' is invalid: the scripts set --partition from the profile"):
        profile_from_dict({"extra_sbatch": ["--partit=big"]})  # sbatch's abbreviation of --partition
    assert profile_from_dict({"extra_sbatch": ["--constraint=a100", "--exclusive"]}).extra_sbatch[1] == "--exclusive"


def test_time_limits() -> None:
    assert parse_time_limit("90") == 90
    assert parse_time_limit("30:00") == 30
    assert parse_time_limit("01:30:00") == 90
    assert parse_time_limit("1-00:00:00") == 1440
    assert parse_time_limit("2-12") == 2 * 1440 + 12 * 60
    for bad in ("", "1:2:3:4", "-5", "1h"):
        with pytest.raises(ValueError):
            parse_time_limit(bad)


def test_paths_that_cannot_go_on_sbatch_lines_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"root_dir": str(tmp_path / "my runs")}}))
    with pytest.raises(ConfigError, match=r"run.root_dir=.*my runs.*cannot go on an #SBATCH line"):
        render("pretrain", SiteProfile(), config)
    config.write_text(yaml.safe_dump({"run": {"root_dir": str(tmp_path / "run-%j")}}))
    with pytest.raises(ConfigError, match=r"run.root_dir: the log folder .*run-%j/slurm holds a '%'"):
        render("pretrain", SiteProfile(), config)


#: How the training scripts start a step: the requeue wrapper (the default profile's max_requeues) around srun.
REQUEUE_SRUN = ["-m", "hpc.requeue", "--max-requeues=10", "--", "srun", "--kill-on-bad-exit=0"]

HOSTILE_OVERRIDES = [
    "importer.image=a;touch PWNED_semicolon",
    "importer.labels=$(touch PWNED_subst)`touch PWNED_backtick`",
    "importer.coords=x' ; touch PWNED_quote ; '",
    "importer.depth=$HOME && touch PWNED_and > /dev/null",
]


def hostile_config(tmp_path: Path) -> Path:
    folder = tmp_path / "x'$(touch PWNED_path)'"
    folder.mkdir()
    config = folder / "cfg.yaml"
    config.write_text(yaml.safe_dump({"run": {"root_dir": str(tmp_path / "run")}}))
    return config


def test_hostile_config_path_and_overrides_stay_literal_under_bash(tmp_path: Path) -> None:
    """The rendered script runs under bash with an interpreter that records its arguments: every hostile string
    arrives as one literal argument and no command in it is executed."""
    record = tmp_path / "argv.json"
    interpreter = tmp_path / "record-argv"
    interpreter.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump([os.getcwd(), *sys.argv[1:]], open({str(record)!r}, 'w'))\n"
    )
    interpreter.chmod(0o755)
    config = hostile_config(tmp_path)
    profile = SiteProfile(python=str(interpreter))
    script = tmp_path / "job.sbatch"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(config.parent)  # rendered in the hostile folder: the job runs there, whoever submits it
        script.write_text(render("probe", profile, config, HOSTILE_OVERRIDES).script)
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run(["bash", str(script)], cwd=work, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cwd, *argv = json.loads(record.read_text())
    assert cwd == str(config.parent)
    assert argv == [
        *REQUEUE_SRUN,
        str(interpreter),
        "-m",
        "hpc.torchrun",
        "--nproc-per-node=1",
        "--",
        "probe",
        str(config),
        *HOSTILE_OVERRIDES,
    ]
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_torchrun_layout_under_srun_and_alone() -> None:
    env = detect(
        {
            "SLURM_JOB_ID": "1234",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_NODEID": "1",
            "SLURM_LOCALID": "0",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
        }
    )
    argv = torchrun_argv(env, 4, ["pretrain", "c.yaml"], env.master_addr)
    assert argv == [
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=gpu07",
        "--master_port=21234",
        "--nproc_per_node=4",
        "-m",
        "cytonet.cli",
        "pretrain",
        "c.yaml",
    ]
    assert torchrun_argv(detect({}), 2, ["probe", "c.yaml"], "x")[:3] == [
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
    ]
    two_per_node = detect(
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_NTASKS_PER_NODE": "2"}
    )
    with pytest.raises(LaunchEnvError, match="one task per node"):
        torchrun_argv(two_per_node, 1, ["pretrain", "c.yaml"], "x")


def test_requeue_target_names_the_array_task() -> None:
    assert requeue_target(detect({"SLURM_JOB_ID": "77"})) == "77"
    array_task = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert requeue_target(detect(array_task)) == "77_3"
    assert requeue_target(detect({})) is None


def test_requeue_wrapper_passes_other_statuses_through() -> None:
    for status in (0, 3):
        cmd = [sys.executable, "-m", "hpc.requeue", "--", sys.executable, "-c", f"raise SystemExit({status})"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == status
    # 75 outside SLURM: nothing to requeue, the status is kept for the caller.
    r = subprocess.run(
        [sys.executable, "-m", "hpc.requeue", "--", sys.executable, "-c", "raise SystemExit(75)"],
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 75 and "not a SLURM job" in r.stderr, r.stderr


def test_signal_lead_must_leave_training_time_before_it_naming_both_keys() -> None:
    """USR1 before the training loop listens ends the job with 75 and no progress: it would be requeued forever
    (time.probe '5' with the default lead of 300 s). One minute of margin; arrays take no signal."""
    with pytest.raises(ConfigError, match=r"^site profile: signal_lead_s=300 .*time\.probe='5' \(300 s\)"):
        profile_from_dict({"time": {"probe": "5"}})
    assert profile_from_dict({"time": {"probe": "6"}}).signal_lead_s == 300  # 300 + 60 <= 360
    assert profile_from_dict({"time": {"extract": "1", "infer": "1"}, "signal_lead_s": 300})
    assert profile_from_dict({"time": {"pretrain": "3"}, "signal_lead_s": 100})  # the slow test's profile
    assert parse_time_limit_s("2:30") == 150 and parse_time_limit_s("1-00:00:01") == 86401


def test_batch_shell_execs_the_requeue_wrapper_and_srun_keeps_every_status(tmp_path: Path) -> None:
    """The rendered training script under bash: the interpreter running hpc.requeue is the script's own process
    (exec: a USR1 to the batch shell, `--signal=B:USR1` or `scancel -b`, reaches the wrapper instead of killing
    bash and orphaning it), and srun is told not to kill the other nodes when the first one exits 75."""
    record = tmp_path / "pid.json"
    interpreter = tmp_path / "record-pid"
    interpreter.write_text(
        f"#!{sys.executable}\nimport json, os, sys\njson.dump([os.getpid(), sys.argv[1:]], open({str(record)!r}, 'w'))\n"
    )
    interpreter.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render("pretrain", SiteProfile(python=str(interpreter), pretrain_nodes=2), PAPER).script)
    shell = subprocess.Popen(["bash", str(script)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    _, err = shell.communicate(timeout=60)
    assert shell.returncode == 0, err
    pid, argv = json.loads(record.read_text())
    assert pid == shell.pid
    assert argv[:7] == [*REQUEUE_SRUN, str(interpreter)]


def fake_scontrol(bin_dir: Path, record: Path) -> None:
    """An ``scontrol`` on ``bin_dir`` that appends its arguments to ``record``, one call a line."""
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$*" >> {shlex.quote(str(record))}\n')
    scontrol.chmod(0o755)


def requeue_env(bin_dir: Path, **slurm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", **slurm}


@pytest.mark.parametrize(
    ("max_requeues", "restarts", "requeued"),
    [("3", "", True), ("3", "2", True), ("3", "3", False), ("3", "7", False), ("0", "", False)],
)
def test_requeue_wrapper_stops_requeueing_after_max_requeues(
    tmp_path: Path, max_requeues: str, restarts: str, requeued: bool
) -> None:
    """A job that always stops with 75 (a signal before training starts, with nothing to resume) is requeued at
    most --max-requeues times: then it ends with the status and says why (0: requeues are off)."""
    calls = tmp_path / "scontrol.txt"
    fake_scontrol(tmp_path / "bin", calls)
    slurm = {"SLURM_JOB_ID": "77", **({"SLURM_RESTART_COUNT": restarts} if restarts else {})}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc.requeue",
            "--max-requeues",
            max_requeues,
            "--",
            sys.executable,
            "-c",
            "raise SystemExit(75)",
        ],
        env=requeue_env(tmp_path / "bin", **slurm),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 75, r.stderr
    if requeued:
        assert calls.read_text() == "requeue 77\n", r.stderr
        assert "requeueing job 77" in r.stderr
    else:
        assert not calls.exists(), calls.read_text()
        says = "requeues are off (max_requeues 0)" if max_requeues == "0" else f"requeued {restarts} times already"
        assert says in r.stderr, r.stderr


FAKE_SRUN = """#!{python}
import os, signal, sys, time
got = []
def handle(signum, frame):
    got.append(signal.Signals(signum).name)
    with open({record!r}, "a") as f:
        f.write(got[-1] + "\\n")
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, handle)
open({ready!r}, "w").close()
end = time.monotonic() + 30
while time.monotonic() < end and not got:
    time.sleep(0.02)
sys.exit(75 if got else 1)  # any signal: a checkpoint, then the requeue status
"""


def start_wrapper(tmp_path: Path, command: str) -> tuple[subprocess.Popen[str], Path, Path]:
    """hpc.requeue (job 77) around a stand-in ``command`` (named srun or not) that records the signals it gets
    and exits 75 after the first one; returns the wrapper, the stand-in's record and scontrol's."""
    bin_dir, record, ready, calls = tmp_path / "bin", tmp_path / "signals.txt", tmp_path / "ready", tmp_path / "sc.txt"
    fake_scontrol(bin_dir, calls)
    stand_in = bin_dir / command
    stand_in.write_text(FAKE_SRUN.format(python=sys.executable, record=str(record), ready=str(ready)))
    stand_in.chmod(0o755)
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "hpc.requeue", "--", command, "--kill-on-bad-exit=0", "task"],
        env=requeue_env(bin_dir, SLURM_JOB_ID="77"),
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < end:
        time.sleep(0.02)
    assert ready.exists(), wrapper.stderr.read() if wrapper.poll() is not None else "stand-in did not start"  # type: ignore[union-attr]
    return wrapper, record, calls


def test_requeue_wrapper_passes_usr1_to_srun_and_requeues(tmp_path: Path) -> None:
    wrapper, record, calls = start_wrapper(tmp_path, "srun")
    wrapper.send_signal(signal.SIGUSR1)  # --signal=B:USR1@N, scancel -b --signal=USR1
    _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 75, err
    assert record.read_text() == "SIGUSR1\n"
    assert calls.read_text() == "requeue 77\n", err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_requeue_wrapper_keeps_ending_signals_from_srun_and_does_not_requeue(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """scancel (or the time limit) sends TERM to the batch step and to every other step. srun would answer a
    forwarded TERM or HUP by SIGKILLing its tasks at once (no checkpoint), so the wrapper keeps it; the tasks get
    their own and may still checkpoint and exit 75, but a cancelled job is not requeued (`scontrol requeue`
    accepts one)."""
    wrapper, record, calls = start_wrapper(tmp_path, "srun")
    wrapper.send_signal(sig)
    time.sleep(1.0)
    assert not record.exists(), f"srun got {record.read_text()}"
    assert wrapper.poll() is None
    srun_pid = int(subprocess.run(["pgrep", "-P", str(wrapper.pid)], capture_output=True, text=True).stdout.split()[0])
    os.kill(srun_pid, signal.SIGTERM)  # what the step's own TERM does to srun; its tasks checkpoint: 75
    _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 75, err
    assert not calls.exists(), calls.read_text()
    assert f"received {sig.name}: the job is ending" in err and "does not requeue a job that is being ended" in err


def test_requeue_wrapper_passes_ending_signals_to_a_command_other_than_srun(tmp_path: Path) -> None:
    """Run by hand around hpc.torchrun (no srun): a TERM to the wrapper reaches the command."""
    wrapper, record, calls = start_wrapper(tmp_path, "agent")
    wrapper.send_signal(signal.SIGTERM)
    _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 75, err
    assert record.read_text() == "SIGTERM\n"
    assert not calls.exists(), calls.read_text()


def test_submitit_checkpoint_wait_ends_before_the_time_limit() -> None:
    """USR2 comes signal_lead_s before the time limit (up to ~30 s late): the handler must give up waiting for
    cytonet early enough for submitit to requeue the job before SLURM ends it (a 600 s wait with a 300 s lead
    ended jobs as TIMEOUT, not requeued)."""
    from hpc.submit import CHECKPOINT_MARGIN_S, checkpoint_wait_s

    for lead in (60, 100, 300, 900):
        assert 0 < checkpoint_wait_s(lead) <= lead - 30
    assert checkpoint_wait_s(300) == 300 - CHECKPOINT_MARGIN_S


def test_submitit_checkpoint_handler_gives_up_after_its_wait(tmp_path: Path) -> None:
    from hpc.submit import CytonetJob

    job = CytonetJob(["pretrain", "c.yaml"], checkpoint_wait_s=0.5)
    # A cytonet that does not react (still importing, say): the handler requeues after its wait anyway.
    job._proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); time.sleep(30)"]
    )
    try:
        time.sleep(0.5)
        start = time.monotonic()
        delayed = job.checkpoint()
        assert 0.4 < time.monotonic() - start < 5
        assert delayed.function is job
    finally:
        job._proc.kill()
        job._proc.wait()


@pytest.mark.parametrize("slurm", [False, True])
def test_submitit_rank0_requeue_status_is_not_reported_as_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slurm: bool
) -> None:
    """Rank 0's cytonet exits 75 without submitit's checkpoint call (its SIGTERM of a preemption, which SLURM
    requeues): the task waits to be requeued or ended like the other ranks, and only then, if neither came, ends
    with JobPreemptedError, not as a failed command."""
    import hpc.submit
    from hpc.submit import CytonetJob, JobPreemptedError

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_PROCID", "0")
        monkeypatch.setenv("SLURM_NTASKS", "2")
        monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setattr(hpc.submit, "REQUEUE_WAIT_S", 1.0)
    job = CytonetJob(["pretrain", "c.yaml"])
    monkeypatch.setattr(job, "command", lambda extra=(): [sys.executable, "-c", "raise SystemExit(75)"])
    start = time.monotonic()
    with pytest.raises(JobPreemptedError, match="resubmit it to resume"):
        job()
    assert (time.monotonic() - start >= 1.0) == slurm


def test_slurm_cli_refuses_what_it_would_ignore_or_misorder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pipelines run their stages in the order they need each other, each once; --array and --write are refused
    where they would be ignored; --write into a folder is named. Nothing is written or submitted."""
    from cytonet.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"root_dir": str(tmp_path / "run")}}))
    base = ["slurm", "pipeline", str(config), "--profile", str(EXAMPLE)]
    for stages, says in [
        ("infer,pretrain", "out of order"),
        ("pretrain,probe,probe", "probe is listed twice"),
        ("pretrain,,probe", "use a comma-separated list"),
        ("probe,extract", "out of order"),
    ]:
        assert main([*base, "--stages", stages]) == 2
        assert says in capsys.readouterr().err, stages
    assert main([*base, "--write", str(tmp_path / "x.sbatch")]) == 2
    assert "--write is for one job" in capsys.readouterr().err
    assert main(["slurm", "pretrain", str(config), "--profile", str(EXAMPLE), "--array", "3"]) == 2
    assert "--array is for extract and infer, not pretrain" in capsys.readouterr().err
    assert main(["slurm", "pretrain", str(config), "--profile", str(EXAMPLE), "--stages", "extract"]) == 2
    assert "--stages is for a pipeline; `cytonet slurm pretrain` renders one job" in capsys.readouterr().err
    for submit in ([], ["--submit"]):  # with --submit: refused before sbatch, not after (the job left queued)
        assert main(["slurm", "probe", str(config), "--profile", str(EXAMPLE), "--write", str(tmp_path), *submit]) == 2
        assert f"--write {tmp_path}: that is a folder" in capsys.readouterr().err
        # the config itself given as --write (or any file that is not a script cytonet wrote): left as it was
        before = config.read_text()
        assert main(["slurm", "probe", str(config), "--profile", str(EXAMPLE), "--write", str(config), *submit]) == 2
        assert f"{config} exists and is not a script cytonet wrote" in capsys.readouterr().err
        assert config.read_text() == before
    assert not (tmp_path / "run").exists()
    # Printing only: the script on stdout, and a note that its log folder must exist before sbatch.
    assert main(["slurm", "probe", str(config), "--profile", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash") and f"log folder {tmp_path / 'run' / 'slurm'} does not exist yet" in err
    assert not (tmp_path / "run").exists()
    # An earlier script (of any kind) is replaced by the new one.
    script = tmp_path / "job.sbatch"
    for kind in ("extract", "probe"):
        assert main(["slurm", kind, str(config), "--profile", str(EXAMPLE), "--write", str(script)]) == 0
        assert script.read_text().startswith(f"#!/bin/bash\n# cytonet {kind}")
