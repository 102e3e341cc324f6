"""The two ways to set up agree: pyproject.toml (what `make setup` installs) and environment.yml
(conda) pin the same packages at the same versions, for a Python both accept."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import ROOT


def _pins(requirements) -> dict:
    out = {}
    for req in requirements:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)==([^;\s]+)\s*(;.*)?", req)
        if m and not (m.group(3) and "!= 'x86_64'" in m.group(3)):  # the ARM alternative of tensorflow-cpu
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_pins_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    assert {"keras", "numpy", "papermill"} <= set(wanted)  # the pattern read the pins
    assert _pins(pip) == wanted
    assert "-e ." in pip  # the project itself, editable, as make setup installs it
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    floor = tuple(int(v) for v in re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups())
    assert tuple(int(v) for v in python.split("=")[1].split(".")[:2]) >= floor
