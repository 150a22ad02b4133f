"""Item 10: no path from a request reaches the file system.

Dataset files are named by the sha256 the server computed, checkpoint files by a server-made job id
and an int step (app/services/storage.py refuses anything else), and every id in a URL is checked
against the server-made shape before the database, let alone a path, sees it
(app/services/common.py:get_owned). These tests attack every id-bearing route with traversal and odd
ids while a sentinel file sits where a traversal would land, spy on every path the app builds, and
scan app/ so that new file-system code has to be looked at.
"""

from __future__ import annotations

import ast
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from app.models import ID_PATTERN
from app.services import checkpoints as checkpoints_service
from app.services import datasets as datasets_service
from app.services import storage
from tests.fuzz.conftest import Seeded

APP_DIR = Path(__file__).resolve().parents[2] / "app"

ODD_IDS = [
    "..", "../..", "../../sentinel", "..%2F..%2Fsentinel", "%2e%2e%2f%2e%2e%2fsentinel", "%252e%252e%252fsentinel",
    "....//....//sentinel", "..\\..\\sentinel", "%2Fetc%2Fpasswd", "/etc/passwd", "C:%5CWindows%5Cwin.ini",
    "%00", "job_%00", "job_" + "0" * 24 + "%00.pt", "a" * 5000, "%C3%B1", "%F0%9F%92%A5", "%ED%A0%80",
    "%3Cscript%3Ealert(1)%3C%2Fscript%3E", "%22%3E%3Cimg%20src%3Dx%3E", "JOB_" + "0" * 24, "job_" + "g" * 24, "job_" + "0" * 23, "ds_" + "0" * 25, "~root", "%20", ".", "*", "%",
]


@pytest.fixture
def sentinel(seeded: Seeded) -> str:
    """A secret outside storage, in the places a traversal through the path builders would reach."""
    storage_root = Path(seeded.app.config["STORAGE_DIR"])
    content = "SENTINEL-" + secrets.token_hex(16)
    outside = storage_root.parent
    for target in (outside / "sentinel" / "step_100.pt", outside / "sentinel.txt", outside / "secret" / "step_1.pt",
                   storage_root / "sentinel.txt"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return content


@pytest.fixture
def built_paths(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """Every call of the path builders where the services use them."""
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def spy(name: str, real: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls.append((name, args))
            return real(*args)
        return wrapper

    monkeypatch.setattr(checkpoints_service, "checkpoint_key", spy("checkpoint", storage.checkpoint_key))
    monkeypatch.setattr(datasets_service, "dataset_key", spy("dataset", storage.dataset_key))
    return calls


def _id_routes(seeded: Seeded) -> list[tuple[str, str, list[str]]]:
    out = []
    for rule in seeded.app.url_map.iter_rules():
        if rule.arguments:
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                out.append((rule.rule, method, sorted(rule.arguments)))
    return out


def _url(rule: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        rule = re.sub(rf"<(?:\w+:)?{name}>", lambda _m, v=value: v, rule)
    return rule


def test_odd_ids_on_every_id_route(seeded: Seeded, sentinel: str, built_paths: list[Any]) -> None:
    client = seeded.app.test_client()
    real = {name: values[0] for name, values in seeded.ids.items()} | {"filename": "dashboard.css"}
    routes = _id_routes(seeded)
    assert {r for r, _m, _a in routes} >= {"/v1/datasets/<string:dataset_id>", "/v1/jobs/<string:job_id>",
                                           "/v1/jobs/<string:job_id>/checkpoints/<int:step>/file",
                                           "/v1/jobs/<string:job_id>/samples/<string:sample_id>",
                                           "/ui/static/<path:filename>", "/static/<path:filename>"}
    sent = 0
    for rule, method, names in routes:
        for name in names:
            for odd in ODD_IDS + ["..%2F..%2Fsentinel.txt", "../sentinel.txt", "..%2F..%2Fapp%2Fauth.py"]:
                url = _url(rule, {**real, name: odd})
                with client.open(url, method=method, headers=seeded.auth, json={"prompt": "x"}) as response:
                    body = response.get_data(as_text=True)
                sent += 1
                assert sentinel not in body, (method, url)
                assert "def require_key" not in body, (method, url)  # app source via a static route
                assert "<script>alert" not in body and "<img src=x>" not in body, (method, url)
                if rule == "/ui/jobs/<string:job_id>":  # a static page: the id is only shown (escaped)
                    assert response.status_code in (200, 404, 308), url
                    continue
                if response.status_code == 308:  # werkzeug merges "//" (from %2F at the start) by redirecting
                    assert "//" in url.replace("%2F", "/") and response.location.startswith("http://localhost/")
                    continue
                assert 400 <= response.status_code < 500, (method, url, response.status_code, body[:200])
                if url.startswith("/v1/"):
                    assert response.is_json and set(response.json) == {"error"}, (url, body[:200])
    assert sent > 500
    for kind, args in built_paths:  # whatever reached a builder was server-made
        if kind == "checkpoint":
            assert ID_PATTERN.fullmatch(args[0]) and args[0] in seeded.ids["job_id"], args
        else:
            assert re.fullmatch(r"[0-9a-f]{64}", args[0]), args


def test_raw_traversal_in_the_url(seeded: Seeded, sentinel: str) -> None:
    """Unencoded dot segments and encoded slashes in the middle of real URLs."""
    client = seeded.app.test_client()
    job = seeded.ids["job_id"][0]
    for url in (f"/v1/jobs/{job}/../../../sentinel.txt", f"/v1/jobs/{job}/checkpoints/100/file/../../../../x",
                f"/v1/jobs/{job}%2F..%2F..%2Fsentinel/checkpoints/100/file",
                f"/v1/jobs/{quote('../../sentinel', safe='')}/checkpoints/100/file",
                "/v1/datasets/..%2F..%2Fsentinel.txt", "/ui/static/../../auth.py", "/ui/static/%2e%2e/%2e%2e/auth.py",
                "/static/../app/auth.py", "/v1/jobs/%2e%2e%2f%2e%2e%2fsentinel/checkpoints/100/file"):
        with client.get(url, headers=seeded.auth) as response:
            body = response.get_data(as_text=True)
        assert response.status_code in (404, 405, 308), (url, response.status_code)
        assert sentinel not in body and "def require_key" not in body, url


def test_owner_download_is_built_from_the_record(seeded: Seeded, built_paths: list[Any]) -> None:
    job = seeded.ids["job_id"][0]
    with seeded.app.test_client().get(f"/v1/jobs/{job}/checkpoints/100/file", headers=seeded.auth) as response:
        assert response.status_code == 200
    assert built_paths == [("checkpoint", (job, 100))]


@pytest.mark.parametrize("job_id", ["../x", "job_../../x", "/etc", "job_" + "0" * 24 + "/..", "", None, 5])
def test_checkpoint_path_refuses_non_server_ids(seeded: Seeded, job_id: Any) -> None:
    with seeded.app.app_context(), pytest.raises(ValueError):
        storage.checkpoint_key(job_id, 1)


@pytest.mark.parametrize("step", [-1, "1", "../1", 1.5, True])
def test_checkpoint_path_refuses_non_int_steps(seeded: Seeded, step: Any) -> None:
    with seeded.app.app_context(), pytest.raises(ValueError):
        storage.checkpoint_key("job_" + "0" * 24, step)


@pytest.mark.parametrize("sha", ["../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/..", "", None])
def test_dataset_path_refuses_non_digests(seeded: Seeded, sha: Any) -> None:
    with seeded.app.app_context(), pytest.raises(ValueError):
        storage.dataset_key(sha)


# Modules that touch the file system, and why each is safe. A new one fails the scan below until it is
# reviewed and added: request values must never reach a path.
FS_MODULES = {
    "app/config.py": "creates the configured folders at start-up",
    "app/services/storage.py": "the key builders (server-made ids and digests only, else ValueError; "
                               "stabletrain_storage.check_key refuses any key outside the layout) and the "
                               "download of an object under such a key",
    "app/services/datasets.py": "spools uploads to mkstemp files; stores them by the computed sha256",
    "app/services/checkpoints.py": "checks that the record's object exists (key from storage.checkpoint_key)",
    "app/api/checkpoints/resources.py": "streams the object services.checkpoints found for the record",
    "app/plots/service.py": "PNG cache under storage/plots/<job.id of an owned record>/<fixed plot name>",
    "app/services/exports.py": "export file and its .pending/.error markers beside storage.export_path "
                               "(server-made job id, int step, sha256 of the record, known format)",
}
FS_CALLS = {"open", "send_file", "send_from_directory", "unlink", "mkstemp", "mkdtemp", "write_bytes",
            "read_bytes", "write_text", "read_text", "rmtree", "fdopen", "iterdir", "glob", "mkdir", "is_file",
            "Path", "makedirs", "listdir", "scandir"}
OS_CALLS = {"replace", "rename", "remove", "stat", "exists"}  # only as os./shutil./os.path. calls (str.replace...)


def _fs_call(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id if func.id in FS_CALLS else None
    if isinstance(func, ast.Attribute):
        if func.attr in FS_CALLS:
            return func.attr
        owner = ast.unparse(func.value)
        if func.attr in OS_CALLS and owner in ("os", "shutil", "os.path"):
            return f"{owner}.{func.attr}"
    return None


def test_file_system_code_lives_only_in_reviewed_modules() -> None:
    found: dict[str, set[str]] = {}
    for path in APP_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            name = _fs_call(node.func) if isinstance(node, ast.Call) else None
            if name:
                found.setdefault(path.relative_to(APP_DIR.parent).as_posix(), set()).add(name)
    unexpected = {module: sorted(names) for module, names in found.items() if module not in FS_MODULES}
    assert not unexpected, f"file-system calls in unreviewed modules: {unexpected}"
    # STORAGE_DIR is read in one place; every other module builds storage paths through it
    readers = [p.relative_to(APP_DIR.parent).as_posix() for p in APP_DIR.rglob("*.py")
               if '"STORAGE_DIR"' in p.read_text()]
    assert sorted(readers) == ["app/config.py", "app/services/storage.py"], readers
    assert {"fdopen", "unlink", "mkstemp"} <= found["app/services/datasets.py"]  # the scan sees real calls
