"""Config loading: strict keys, types, values, dotted overrides, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cytonet.config import (
    Config,
    config_from_dict,
    config_to_dict,
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
        ("synth.section_spacing_um=10", "must be >= section_thickness_um"),
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
