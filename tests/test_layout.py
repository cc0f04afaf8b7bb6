"""The house rules, checked: one import name, layered packages without upward imports, a lint-clean
tree, an SDK that needs only httpx, every package folder installed, `--version` from metadata."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"server": "switchboard.server", "adapter_store": "switchboard.adapter_store", "clients": "switchboard.clients"}


def run(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_import_contracts_hold():
    """core ← adapter_store ← runtime ← http ← cli; the SDK imports no server code; bench ⟂ tests."""
    result = run(str(Path(sys.executable).parent / "lint-imports"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_ruff_is_clean_and_bans_the_bare_folder_names():
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout[-4000:]
    probe = run(sys.executable, "-m", "ruff", "check", "--stdin-filename", "server/probe.py", "-")
    bare = subprocess.run([sys.executable, "-m", "ruff", "check", "--stdin-filename", "server/probe.py", "-"],
                          input="from server.core.engine import Engine\n\nEngine\n", cwd=ROOT,
                          capture_output=True, text=True)
    assert probe.returncode == 0 and bare.returncode == 1 and "TID251" in bare.stdout, bare.stdout


def test_every_package_folder_is_installed_under_switchboard():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {FOLDERS[init.relative_to(ROOT).parts[0]] + "".join(f".{p}" for p in init.parent.relative_to(
        ROOT / init.relative_to(ROOT).parts[0]).parts) for folder in FOLDERS for init in (ROOT / folder).rglob(
        "__init__.py")}
    assert found == packages


def test_the_sdk_needs_only_httpx():
    code = ("import sys, switchboard.clients as c; c.Client; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'fastapi', 'transformers')"
            " or m.startswith(('switchboard.server', 'switchboard.adapter_store'))); print(heavy); "
            "sys.exit(1 if heavy else 0)")
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_comes_from_the_package_metadata():
    result = run(sys.executable, "-m", "switchboard.clients.cli", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"switchboard {version('switchboard')}"


def test_the_wheel_installs_one_top_level_name(tmp_path):
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("switchboard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"switchboard"}, top
    for folder, package in FOLDERS.items():  # each folder's modules land under its switchboard.* name
        module = next((ROOT / folder).glob("*.py")).name
        assert f"{package.replace('.', '/')}/{module}" in names


def test_every_setting_is_documented():
    from switchboard.server.settings import Settings

    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if f"`{name}`" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
