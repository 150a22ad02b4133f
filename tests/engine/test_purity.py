"""worker/engine imports only torch and the standard library (no service frameworks).

Two deliberate exceptions, imported inside the one function that needs them and never at module
import: the `tokenizers` package for a BPE tokenizer (byte-level BPE must encode exactly as the
Hugging Face export's tokenizer.json does, which a hand-written copy could not promise), and the
stabletrain_export package (safetensors) for reading weights-only files and for `export`.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("flask", "celery", "sqlalchemy", "kombu", "marshmallow", "transformers",
             "safetensors", "tokenizers", "stabletrain_export")
# (file, function) -> the top-level packages that function may import lazily.
LAZY_IMPORTS = {
    ("tokenizers.py", "_hf_tokenizer"): {"tokenizers"},
    ("tokenizers.py", "train_bpe"): {"tokenizers"},
    ("sampling.py", "load_model_file"): {"stabletrain_export"},
    ("__main__.py", "cmd_export"): {"stabletrain_export"},
}

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


def test_non_torch_packages_are_imported_only_where_allowed() -> None:
    found: dict[tuple[str, str], set[str]] = {}
    for path in sorted((ROOT / "worker" / "engine").rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for top in {n.split(".")[0] for n in names} & set(FORBIDDEN):
                    found.setdefault((path.name, func.name), set()).add(top)
    unexpected = {k: v for k, v in found.items() if not v <= LAZY_IMPORTS.get(k, set())}
    assert not unexpected, f"lazy imports outside the allowed functions: {unexpected}"
    assert ("sampling.py", "load_model_file") in found and ("__main__.py", "cmd_export") in found
