"""Config loading: strict keys, types, values, dotted overrides, and the shipped configs."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

from cytonet.cli import main
from cytonet.config import (
    Bound,
    Config,
    config_from_dict,
    config_to_dict,
    layer_overrides,
    load_config,
    paper_receptive_field,
    parse_overrides,
    save_config,
)
from cytonet.errors import ConfigError, UsageError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_are_valid() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.loss.temperature == pytest.approx(0.07)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    # The round trip through the resolved dict gives back the same config.
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    p = write(tmp_path, {"synth": {"nbrains": 3}})
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "synth.nbrains" in msg and "n_brains" in msg and "pixel_size_um" in msg and str(p) in msg


def test_unknown_section_lists_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'synthh'.*valid keys: run, synth"):
        load_config(write(tmp_path, {"synthh": {}}))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("synth.n_brains=two", "synth.n_brains='two' is invalid: expected an integer"),
        ("synth.n_brains=2.5", "expected an integer"),
        ("synth.pixel_size_um=fast", "expected a number"),
        ("sections.backend=tiff", "use one of 'zarr', 'hdf5'"),
        ("model.channels_last=3", "expected true or false"),
        ("synth.cortex_thickness_mm=[2]", "expected 2 values"),
    ],
)
def test_wrong_type_names_key_value_and_allowed(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("synth.n_brains=0", "synth.n_brains=0 is invalid"),
        ("synth.section_spacing_um=10", "must be >= synth.section_thickness_um"),
        ("loss.temperature=-1", "loss.temperature=-1.0 is invalid"),
        ("model.patch_size_px=300", "valid: 265, 297, 329"),
        ("synth.cortex_thickness_mm=[3,2]", "low <= high"),
    ],
)
def test_bad_values_name_the_fix(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_patch_size_follows_receptive_field() -> None:
    assert [paper_receptive_field(n) for n in (4, 5, 6)] == [265, 553, 1129]
    cfg = load_config(None, ["model.n_blocks=6", "model.patch_size_px=1129"])
    assert cfg.model.receptive_field_px == 1129
    with pytest.raises(ConfigError, match="1129"):
        load_config(None, ["model.n_blocks=6", "model.patch_size_px=1000"])


def test_overrides_are_dotted_and_typed() -> None:
    cfg = load_config(None, ["synth.n_brains=2", "synth.pixel_size_um=16", "synth.cortex_thickness_mm=[2, 3.5]"])
    assert cfg.synth.n_brains == 2
    assert cfg.synth.pixel_size_um == 16.0 and isinstance(cfg.synth.pixel_size_um, float)
    assert cfg.synth.cortex_thickness_mm == (2.0, 3.5)
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


@pytest.mark.parametrize("bad", ["synth.n_brains", "=3", "synth..n=1", "synth.n_brains=[1"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(UsageError):
        load_config(None, [bad])


def test_override_beats_file(tmp_path: Path) -> None:
    p = write(tmp_path, {"synth": {"n_brains": 3, "seed": 5}})
    cfg = load_config(p, ["synth.n_brains=2"])
    assert (cfg.synth.n_brains, cfg.synth.seed) == (2, 5)


def test_bad_value_names_where_it_came_from(tmp_path: Path) -> None:
    p = write(tmp_path, {"synth": {"n_brains": 0}})
    with pytest.raises(ConfigError, match=r"synth.n_brains=0 .* \(in .*c.yaml\)"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"run.reuse_host_memory='maybe' .* \(set by a command-line override\)"):
        load_config(p, ["synth.n_brains=2", "run.reuse_host_memory=maybe"])


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    # One line naming the file, line and column (not PyYAML's page with '<unicode string>' and an excerpt).
    p.write_text("synth:\n  n_brains: 4\n  seed 1\n  x: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "\n" not in str(info.value) and "<unicode string>" not in str(info.value)
    assert str(info.value).startswith(f"config file {str(p)!r} is not valid YAML: line 4, column 3:")
    assert str(info.value).endswith("(while scanning a simple key that began on line 3)")
    with pytest.raises(ConfigError, match=r"is a folder, not a YAML file"):
        load_config(tmp_path)


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["synth.n_brains=3"])
    path = save_config(cfg, tmp_path / "out")
    assert load_config(path) == cfg


def test_relative_paths_lie_below_root() -> None:
    cfg = load_config(None, ["run.root_dir=/data/run1", "synth.out_dir=sections"])
    assert cfg.resolve_path(cfg.synth.out_dir) == Path("/data/run1/sections")
    cfg = load_config(None, ["synth.out_dir=/abs/x"])
    assert cfg.resolve_path(cfg.synth.out_dir) == Path("/abs/x")


def test_global_batch_must_divide_world_size() -> None:
    cfg = load_config(None, ["pretrain.global_batch_size=96"])
    assert cfg.pretrain.per_rank_batch(4, "pretrain") == 24
    with pytest.raises(
        ConfigError, match=r"pretrain.global_batch_size=96 is invalid: must be divisible by the world size 5"
    ):
        cfg.pretrain.per_rank_batch(5, "pretrain")


def test_scratch_epochs_default_to_pretrain_plus_probe() -> None:
    cfg = load_config(None, ["pretrain.epochs=150", "probe.epochs=30"])
    assert cfg.scratch_epochs == 180  # seed 002: as many iterations as pretraining plus probe
    assert load_config(None, ["scratch.epochs=7"]).scratch_epochs == 7
    with pytest.raises(ConfigError, match=r"pretrain\.epochs=0"):
        load_config(None, ["pretrain.epochs=0"])
    with pytest.raises(ConfigError, match="preempt_signals"):
        load_config(None, ["pretrain.preempt_signals=[SIGKILL]"])


def test_a_key_written_twice_is_refused_naming_key_file_and_line(tmp_path: Path) -> None:
    # Plain YAML keeps the last block: importer.pixel_size_um and importer.brain would silently be lost.
    p = tmp_path / "dup.yaml"
    p.write_text(
        "importer:\n  pixel_size_um: 0.5\n  brain: B07\nsections:\n  chunk_px: 256\nimporter:\n  section_index: 12\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg and "'importer'" in msg and "line 6" in msg and "line 1" in msg
    p.write_text("synth:\n  n_brains: 2\n  seed: 1\n  n_brains: 3\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'synth\.n_brains' is written twice \(first on line 2\)"):
        load_config(p)
    # Site profiles are read by the same reader.
    from hpc.site import load_profile

    site = tmp_path / "site.yaml"
    site.write_text((Path(__file__).resolve().parent.parent / "configs" / "sites" / "local.yaml").read_text())
    load_profile(site)
    site.write_text(site.read_text() + "\n" + site.read_text())
    with pytest.raises(ConfigError, match=rf"{site}.*written twice"):
        load_profile(site)
    # A merge key may still be overridden (that is what it is for), and a duplicate in an override is refused.
    q = tmp_path / "merge.yaml"
    q.write_text("synth:\n  <<: {n_brains: 2, seed: 1}\n  seed: 4\n")
    assert load_config(q).synth.seed == 4 and load_config(q).synth.n_brains == 2
    with pytest.raises(UsageError, match="appears twice"):
        load_config(None, ["synth.cortex_thickness_mm={a: 1, a: 2}"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dist.timeout_s=inf", "dist.timeout_s"),  # accepted before, then OverflowError when the group starts
        ("dist.timeout_s=.inf", "dist.timeout_s"),
        ("synth.pixel_size_um=nan", "synth.pixel_size_um"),
        ("synth.pixel_size_um=.NaN", "synth.pixel_size_um"),
        ("importer.pixel_size_um=.inf", "importer.pixel_size_um"),
        ("extract.pixel_size_um=.inf", "extract.pixel_size_um"),  # float or null
        ("optim.base_lr=1e999", "optim.base_lr"),
        ("loss.radius_mm=" + "9" * 400, "loss.radius_mm"),  # an integer too large for a float
        ("synth.cortex_thickness_mm=[2, .inf]", r"synth.cortex_thickness_mm\[1\]"),
        ("augment.alpha_range=[.nan, 1]", r"augment.alpha_range\[0\]"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: expected a finite number"):
        load_config(None, [override])


def test_non_finite_number_in_a_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("synth:\n  pixel_size_um: .inf\n")
    with pytest.raises(ConfigError, match=rf"synth.pixel_size_um=inf is invalid: expected a finite number \(in {p}\)"):
        load_config(p)


def test_home_folder_is_expanded_in_configured_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["run.root_dir=~/runs", "extract.out_dir=~/patches"])
    assert cfg.root_path == tmp_path / "home" / "runs"
    assert cfg.resolve_path(cfg.synth.out_dir) == tmp_path / "home" / "runs" / "sections"
    assert cfg.resolve_path(cfg.extract.out_dir) == tmp_path / "home" / "patches"
    assert cfg.run.root_dir == "~/runs"  # the config keeps what was written; paths are derived


@pytest.mark.parametrize("value", ["runs/try #2", "2024-06-01", "null", "on", "0755", "~", "[a]", "x: y"])
def test_flag_values_are_set_verbatim(value: str) -> None:
    # What `cytonet demo --out DIR` sets: the folder name as typed, never parsed as YAML.
    cfg = load_config(None, ["run.seed=3"], flags={"run.root_dir": ("--out", value)})
    assert cfg.run.root_dir == value and cfg.run.seed == 3
    with pytest.raises(ConfigError, match=r"run.root_dir='' is invalid: give a folder path \(set by --out\)"):
        load_config(None, ["run.root_dir=elsewhere"], flags={"run.root_dir": ("--out", "")})


def test_unknown_key_of_an_override_is_blamed_on_the_override(tmp_path: Path) -> None:
    from cytonet.errors import ConfigError

    for override in ("synth.bogus=1", "bogus.x=1"):
        with pytest.raises(ConfigError, match=r"\(set by a command-line override\)$"):
            load_config(CONFIGS[0].parent / "demo.yaml", [override])
    (tmp_path / "c.yaml").write_text("synth:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'synth.bogus'.*\(in .*c.yaml\)$"):
        load_config(tmp_path / "c.yaml", ["synth.n_brains=2"])


# ----------------------------------------------------------------------------------------------------------
# Bounds: every number has a finite range, checked before the rules that compute with it

DEMO = CONFIGS[0].parent / "demo.yaml"


def _holds_numbers(tp: Any) -> bool:
    return tp in (int, float) or any(_holds_numbers(a) for a in typing.get_args(tp))


def _bounded_settings() -> list[tuple[str, str, Any, Bound]]:
    out = []
    for f in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[f.name]
        for name, tp in typing.get_type_hints(cls).items():
            if name in {g.name for g in dataclasses.fields(cls)} and _holds_numbers(tp):
                out.append((f.name, name, tp, cls.bounds.get(name)))
    return out


BOUNDED = _bounded_settings()


def test_every_number_setting_has_a_finite_range() -> None:
    missing = [f"{section}.{name}" for section, name, _, bound in BOUNDED if bound is None]
    assert not missing, f"give these settings a Bound: {missing}"
    assert all(math.isfinite(b.lo) and math.isfinite(b.hi) and b.lo < b.hi for *_, b in BOUNDED)
    assert len(BOUNDED) > 90  # every int and float of every section, not a few of them


def _shaped(tp: Any, x: float) -> Any:
    """A value of annotation ``tp`` holding the number ``x`` (a key of ``dict[int, str]``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _shaped(next(a for a in args if a is not type(None)), x)
    if origin is dict:
        return {int(x): "x"} if args[0] is int else {"hOc1": int(x) if args[1] is int else x}
    if origin in (list, tuple):
        item = args[0]
        return [int(x) if item is int else x] * (len(args) if origin is tuple and args[-1] is not Ellipsis else 1)
    return int(x) if tp is int else x


@pytest.mark.parametrize(("section", "name", "tp", "bound"), BOUNDED, ids=[f"{s}.{n}" for s, n, *_ in BOUNDED])
def test_each_range_is_enforced_at_load_naming_the_key_and_the_range(
    section: str, name: str, tp: Any, bound: Bound
) -> None:
    is_int = "int" in str(tp)
    above = bound.hi + 1 if is_int else bound.hi * 1.5 + 1
    below = bound.lo if bound.above else bound.lo - 1
    for x in (above, below, max(10**30, bound.hi * 10)):
        value = yaml.safe_dump(_shaped(tp, x), default_flow_style=True).strip().removesuffix("\n...")
        with pytest.raises(ConfigError) as info:
            load_config(DEMO, [f"{section}.{name}={value}"])
        msg = str(info.value)
        assert msg.startswith(f"{section}.{name}") and f"is invalid: {bound.describe(name)}" in msg, msg
        assert msg.endswith("(set by a command-line override)"), msg


@pytest.mark.parametrize(
    "override",
    [
        "run.seed=18446744073709551616",  # torch.manual_seed: ValueError Overflow, in pretrain
        "run.seed=4294967296",  # scikit-learn's RandomState (analysis.seed) stops at 2^32 - 1
        "model.proj_dim=99999999999999999999999",
        "dist.timeout_s=1e12",  # OverflowError when the process group starts
        "dist.timeout_s=1e10",  # a timeout that fires at once
        "synth.brain_width_mm=1e9",  # MemoryError (165 TiB)
        "extract.pixel_size_um=1e9",  # "array is too big"
        "extract.patches_per_area=99999999999999999999999",
        "analysis.threads=100000",  # a segfault in the BLAS pools
        "analysis.threads=4096",  # a hang
        "loader.workers=100000",
        "infer.pyramid_levels=100000",  # 2^99999 was computed first, then printed: ValueError (4300 digits)
    ],
)
def test_values_that_failed_later_are_refused_at_load(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ is invalid: use .*\(set by a command-line override\)$"):
        load_config(DEMO, [override])


def test_the_largest_sensible_values_stay_allowed() -> None:
    cfg = load_config(
        DEMO,
        [
            "run.seed=4294967295",
            "analysis.seed=4294967295",
            "analysis.threads=256",  # the hardware threads of a 128-core node
            "loader.workers=128",
            "infer.io_threads=64",
            "dist.timeout_s=86400",
            "optim.base_lr=1e30",  # tests/test_train.py makes the loss non-finite with it
            "synth.brain_width_mm=200",
            "infer.pyramid_levels=8",
            "model.proj_dim=2048",
        ],
    )
    assert (cfg.run.seed, cfg.analysis.threads, cfg.dist.timeout_s) == (2**32 - 1, 256, 86400.0)


def test_a_huge_pyramid_level_count_is_refused_before_any_power_of_two() -> None:
    # 2 ** (pyramid_levels - 1) of a 23-digit number grew to 18 GB without end: in a child with 2 GB at most.
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    code = "from cytonet.config import load_config; load_config(None, ['infer.pyramid_levels=' + '9' * 23])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DEMO.parent.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, preexec_fn=limit_memory
    )
    assert "ConfigError: infer.pyramid_levels=99999999999999999999999 is invalid: use 1-14" in r.stderr, r.stderr


def test_synthetic_stacks_stay_within_a_brain() -> None:
    load_config(DEMO, ["synth.sections_per_brain=300"])  # 300 x 600 um = 180 mm
    with pytest.raises(ConfigError, match=r"^synth.sections_per_brain=400 is invalid: .* = 239.4 mm; use at most 200"):
        load_config(DEMO, ["synth.sections_per_brain=400"])


# ----------------------------------------------------------------------------------------------------------
# Overrides: each key once; combinations that would be silently ignored


@pytest.mark.parametrize(
    "overrides",
    [
        ["synth.n_brains=2", "synth.n_brains=3"],
        ["synth.n_brains=2", "synth.seed=1", "synth.n_brains=2"],  # even with the same value
        ["synth={n_brains: 2}", "synth.n_brains=3"],
        ["synth.n_brains=3", "synth={n_brains: 2}"],
    ],
)
def test_an_override_key_given_twice_is_refused_naming_it(overrides: list[str]) -> None:
    with pytest.raises(UsageError, match=r"'synth\.n_brains'|'synth'"):
        load_config(DEMO, overrides)
    assert main(["check-config", str(DEMO), *overrides]) == 2


def test_different_override_keys_of_one_section_are_fine() -> None:
    cfg = load_config(DEMO, ["synth.n_brains=2", "synth.seed=3", "sections.image_levels=[2]"])
    assert (cfg.synth.n_brains, cfg.synth.seed, cfg.sections.image_levels) == (2, 3, (2,))
    with pytest.raises(ConfigError, match=r"unknown key 'synth\.n_brainsx'"):  # another key, not the same one twice
        load_config(DEMO, ["synth.n_brains=2", "synth.n_brainsx=3"])


def test_code_that_composes_overrides_layers_them_explicitly() -> None:
    # Defaults composed with specific settings in code (the tests' helpers): later groups replace earlier keys,
    # and the keys below them.
    base = ["synth.n_brains=2", "synth.seed=1", "run.seed=4"]
    assert layer_overrides(base, ["synth.n_brains=3"]) == ["synth.seed=1", "run.seed=4", "synth.n_brains=3"]
    assert layer_overrides(base, ["synth={n_brains: 5}"]) == ["run.seed=4", "synth={n_brains: 5}"]
    cfg = load_config(DEMO, layer_overrides(base, ["synth.n_brains=3"]))
    assert (cfg.synth.n_brains, cfg.synth.seed, cfg.run.seed) == (3, 1, 4)


def test_shard_chunks_needs_zarr_output() -> None:
    # Only the zarr writer shards; the HDF5 writer would ignore the setting (and only make the blocks larger).
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["infer.format=hdf5", "infer.shard_chunks=2"])
    msg = str(info.value)
    assert msg.startswith("infer.shard_chunks=2 is invalid: infer.format=hdf5 has no shards"), msg
    assert load_config(DEMO, ["infer.format=hdf5"]).infer.shard_chunks == 0
    assert load_config(DEMO, ["infer.shard_chunks=2"]).infer.shard_chunks == 2


# ----------------------------------------------------------------------------------------------------------
# Errors say where each value came from


@pytest.mark.parametrize(
    "override",
    ["synth.n_brains.x=1", "importer.label_names={a: 1}", "infer.cleanup_components_per_area={1: 2}"],
)
def test_a_bad_override_inside_a_key_is_blamed_on_the_override(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override])
    assert str(info.value).endswith("(set by a command-line override)"), str(info.value)
    assert "demo.yaml" not in str(info.value)


def test_rules_across_keys_name_each_key_and_where_it_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["synth.section_thickness_um=900"])
    assert str(info.value) == (
        "synth.section_spacing_um=20.0 is invalid: must be >= synth.section_thickness_um (900.0): sections cannot "
        "overlap (synth.section_spacing_um left at its default; synth.section_thickness_um set by a command-line "
        "override)"
    )
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["infer.shard_chunks=100"])
    assert str(info.value).endswith(
        "(infer.shard_chunks set by a command-line override; infer.chunk_px left at its default)"
    ) and "infer.chunk_px * infer.shard_chunks must be <= 8192" in str(info.value)
    p = write(tmp_path, {"synth": {"section_spacing_um": 10.0}})
    with pytest.raises(ConfigError) as info:
        load_config(p, ["synth.section_thickness_um=15"])
    assert str(info.value).endswith(
        f"(synth.section_spacing_um in {p}; synth.section_thickness_um set by a command-line override)"
    )
    # both from the file: the file, once
    p = write(tmp_path, {"synth": {"section_spacing_um": 10.0, "section_thickness_um": 15.0}})
    with pytest.raises(ConfigError, match=rf"sections cannot overlap \(in {p}\)$"):
        load_config(p, ["synth.n_brains=2"])
    with pytest.raises(
        ConfigError, match=r"must divide pretrain\.global_batch_size \(64\).*\(loader\.samples_per_class"
    ):
        load_config(DEMO, ["loader.samples_per_class=3"])
