"""Fixtures shared by test modules: ring sections (tests/ringdata.py) and their one-process extraction.

A module may define a fixture of the same name (test_patches.py has HDF5 sections of its own); pytest takes the
module's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ringdata import make_sections


@pytest.fixture(scope="module")
def sections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ring sections of three brains, zarr."""
    root = tmp_path_factory.mktemp("sections")
    make_sections(root)
    return root


@pytest.fixture(scope="module")
def reference(sections: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-task, one-process extraction that the other runs (tasks, workers, ranks, resumes) are compared with."""
    from test_extract import make_cfg

    from cytonet.data.extract import run_extract

    out = tmp_path_factory.mktemp("ref") / "patches"
    result = run_extract(make_cfg(), out, sections_dir=sections)
    assert result.manifest is not None and result.written == result.n_shards
    return out
