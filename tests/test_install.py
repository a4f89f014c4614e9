"""Reproducible installs: the lock pins every dependency, and make setup installs from it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def _pins() -> dict[str, str]:
    lines = [ln.strip() for ln in LOCK.read_text().splitlines()]
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [ln for ln in entries if not PIN.match(ln)]
    assert not bad, f"the lock holds only name==version lines, not {bad[:3]}"
    return {canonicalize_name(m[1]): m[2] for m in map(PIN.match, entries)}


def test_every_dependency_of_pyproject_is_pinned_in_the_lock():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+, the lock's Python")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*project["dependencies"],
            *(d for extra in project["optional-dependencies"].values() for d in extra)]
    pins = _pins()
    assert "cxrlib" not in pins  # the project itself is installed from the checkout
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not pinned in {LOCK.name}; run make lock"
        assert dep.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {dep.name}=={pins[name]}, outside pyproject's {dep.specifier}")


def test_make_setup_installs_from_the_lock_unless_asked_not_to(tmp_path):
    def install_line(*args: str) -> str:
        out = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path}", *args],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return next(ln for ln in out.splitlines() if '-e ".[dev]"' in ln)
    assert install_line().rstrip().endswith("-c constraints.txt")
    assert "-c" not in install_line("LOCK=").split('".[dev]"')[1]


def test_conda_environment_installs_through_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-c constraints.txt", "-e .[dev]"]
