"""The package's layering: the import-linter contract in `pyproject.toml` holds (as `.ci/run` checks), names every
module of `s2t_hf`, and `s2t_hf.prompts` imports nothing else from the package."""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import s2t_hf


ROOT = Path(__file__).resolve().parents[1]


def lint_imports_script() -> str | None:
    """The `lint-imports` console script of this interpreter's environment, else the one on `PATH`."""
    beside = Path(sys.executable).with_name("lint-imports")
    return str(beside) if beside.is_file() else shutil.which("lint-imports")


def layers_contract() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract


def test_lint_imports_passes():
    script = lint_imports_script()
    if script is None:
        pytest.skip("`lint-imports` is not installed (the `dev` extra installs import-linter)")
    result = subprocess.run([script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"an import breaks the layers contract in pyproject.toml:\n{result.stdout}"
    assert "0 broken" in result.stdout


def test_no_import_is_exempt():
    # every import obeys the layers: a module that needs one from above belongs in a higher layer
    assert "ignore_imports" not in layers_contract()


def test_every_module_is_in_a_layer():
    # a module left out of the contract could import anything: add a new module to its layer in `pyproject.toml`
    listed = set()
    for layer in layers_contract()["layers"]:
        listed.update(name.strip() for name in layer.replace(":", "|").split("|"))
    modules = {f"s2t_hf.{info.name}" for info in pkgutil.iter_modules(s2t_hf.__path__)}
    assert modules - listed == set(), "add these modules to the layers contract in pyproject.toml"
    assert listed - modules == set(), "these layers name no module of s2t_hf"


def test_prompts_imports_nothing_else_from_the_package():
    code = (
        "import json, sys\n"
        "import s2t_hf\n"
        "before = {m for m in sys.modules if m.split('.')[0] == 's2t_hf'}\n"
        "import s2t_hf.prompts\n"
        "after = {m for m in sys.modules if m.split('.')[0] == 's2t_hf'}\n"
        "print(json.dumps(sorted(after - before)))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "error::FutureWarning"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["s2t_hf.prompts"]
