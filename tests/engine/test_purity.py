"""worker/engine imports only torch and the standard library (no service frameworks)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("flask", "celery", "sqlalchemy", "kombu", "marshmallow")

SCRIPT = f"""
import importlib, pkgutil, sys
import worker.engine as engine
names = ["worker.engine"] + [m.name for m in pkgutil.walk_packages(engine.__path__, "worker.engine.")]
for name in names:
    importlib.import_module(name)
bad = sorted({{m.split(".")[0] for m in sys.modules}} & set({FORBIDDEN!r}))
print("imported", len(names), "modules")
if bad:
    sys.exit("forbidden imports: " + ", ".join(bad))
"""


def test_engine_imports_no_service_frameworks() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "imported" in proc.stdout
