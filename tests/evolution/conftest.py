"""Shared helpers: the tiny run config (examples/tiny-test.toml) with overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from namm.evolution.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny-test.toml"


def _tiny_dict(out: Path, **overrides: Any) -> dict[str, Any]:
    data = tomllib.loads(TINY.read_text())
    data["output_dir"] = str(out)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def _write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A minimal TOML writer for the run dicts used here (scalars, tables, arrays of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, (dict, list)) or
             (isinstance(v, list) and not (v and isinstance(v[0], dict)))]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += [f"[[{k}]]"] + [f"{kk} = {value(vv)}" for kk, vv in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def examples() -> Path:
    return ROOT / "examples"


@pytest.fixture
def tiny_dict():
    """The tiny run as a dict (as parsed from TOML) writing into ``out``, with table overrides."""
    return _tiny_dict


@pytest.fixture
def write_toml():
    """Write a run dict as a TOML file."""
    return _write_toml


@pytest.fixture
def tiny_config(tmp_path):
    """Build a RunConfig of the tiny run writing into tmp_path/run, with overrides."""

    def make(**overrides: Any) -> RunConfig:
        return RunConfig.from_dict(_tiny_dict(tmp_path / "run", **overrides))

    return make
