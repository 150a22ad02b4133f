#!/usr/bin/env bash
# Create .venv and install the locked requirements; a no-op when already current.
#
# requirements.lock (made by scripts/lock.sh from the exact pins in requirements*.txt) pins every
# transitive package with its hashes, and pip checks them (--require-hashes). torch is the one package
# outside it: its build differs per machine, so it is installed by its exact pin from requirements.txt
# (here the CPU wheel that pip finds on this disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/pip --disable-pip-version-check --quiet)
stamp=.venv/.requirements.sha256
want=$(cat requirements.lock requirements.txt pyproject.toml clients/stabletrain/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements.lock and torch==2.13.0 (CPU build)" >&2
  "${PIP[@]}" install --require-hashes --no-deps -r requirements.lock
  "${PIP[@]}" install --no-deps "$(grep '^torch==' requirements.txt)"
  "${PIP[@]}" install --no-deps -e . -e clients/stabletrain   # the service, and the client + command
  .venv/bin/pip check >&2
  echo "$want" > "$stamp"
fi
