"""Packaging: the lock files agree with the exact pins, and the client installs without the service."""

from __future__ import annotations

import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.ops.helpers import REPO

SERVICE_ONLY = {"torch", "celery", "kombu", "flask", "flask-smorest", "sqlalchemy", "psycopg2-binary", "psycopg",
                "psycopg2", "gunicorn", "matplotlib", "numpy", "alembic"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (no -r includes)."""
    return {canonical(m.group(1)): m.group(2) for line in path.read_text().splitlines() if (m := PIN.match(line))}


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of every entry of a lock file."""
    entries: dict[str, tuple[str, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            name = canonical(m.group(1))
            entries[name] = (m.group(2), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            entries[name] = (entries[name][0], entries[name][1] + 1)
    return entries


@pytest.mark.parametrize("lock, sources", [
    ("requirements.lock", ["requirements.txt", "requirements-dev.txt"]),
    ("requirements-api.lock", ["requirements.txt"]),
])
def test_lock_pins_every_package_with_hashes(lock: str, sources: list[str]) -> None:
    """Every exact pin is in the lock at the same version (a stale lock fails: rerun scripts/lock.sh),
    every locked package carries a hash, and torch is left to its exact pin (scripts/lock.sh says why)."""
    entries = locked(REPO / lock)
    assert len(entries) >= 50, sorted(entries)
    for source in sources:
        for name, version in pins(REPO / source).items():
            if name == "torch":
                continue
            assert entries.get(name, ("missing",))[0] == version, f"{source}: {name}=={version}, {lock}: {entries.get(name)}"
    assert not [name for name, (_, hashes) in entries.items() if hashes == 0]
    assert "torch" not in entries and not [name for name in entries if name.startswith(("nvidia", "triton"))]


def test_api_lock_has_no_training_stack() -> None:
    entries = locked(REPO / "requirements-api.lock")
    assert {"flask", "celery", "gunicorn", "sqlalchemy", "psycopg2-binary"} <= set(entries)
    assert not {"torch", "sympy", "networkx", "pytest", "schemathesis"} & set(entries)


@pytest.mark.slow
def test_client_installs_alone(tmp_path: Path) -> None:
    """A fresh virtualenv installing the client distribution gets requests and tqdm, none of the service's
    packages, and a working `stabletrain` command."""
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the worktree
    shutil.copytree(REPO / "stabletrain", source / "stabletrain", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "clients" / "stabletrain").mkdir(parents=True)
    shutil.copy(REPO / "clients" / "stabletrain" / "pyproject.toml", source / "clients" / "stabletrain")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bindir = env_dir / "bin"
    install = subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                              str(source / "clients" / "stabletrain")], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(bindir / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    installed = {canonical(line.split("==")[0]) for line in listed.splitlines() if "==" in line}
    assert {"stabletrain", "requests", "tqdm"} <= installed, installed
    assert not SERVICE_ONLY & installed, SERVICE_ONLY & installed
    assert not [name for name in installed if name.startswith(("nvidia", "flask", "psycopg"))], installed
    helped = subprocess.run([str(bindir / "stabletrain"), "--help"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert helped.returncode == 0 and "submit" in helped.stdout, helped.stdout + helped.stderr
    isolated = subprocess.run([str(bindir / "python"), "-c", "import stabletrain, sys; print(stabletrain.__file__); "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'worker', 'torch')))"],
                              capture_output=True, text=True, cwd=tmp_path, check=True).stdout.splitlines()
    assert isolated[0].startswith(str(env_dir)) and isolated[1] == "[]", isolated
