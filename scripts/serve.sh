#!/usr/bin/env bash
# Run StableTrain on this machine: the API (gunicorn, foreground) plus one Celery
# worker for training and one for samples (background, stopped on exit).
#
# Defaults need no servers (SQLite database and broker under var/). For production
# set STABLETRAIN_DATABASE_URL (PostgreSQL), STABLETRAIN_BROKER_URL (Redis) and
# STABLETRAIN_STORAGE_DIR. HOST/PORT pick the listen address (127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
BIN=.venv/bin
LOG_DIR=var/log
KEY_FILE=var/dev-api-key
STOP_WAIT_S=${STOP_WAIT_S:-60}

scripts/setup.sh
mkdir -p "$LOG_DIR"

echo "serve: applying database migrations" >&2
"$BIN/flask" --app app db upgrade

# True when $1 is a live (not revoked) key of the configured database.
key_is_valid() {
  "$BIN/python" - "$1" <<'PY'
import sys

from sqlalchemy import select

from app import create_app
from app.auth import hash_secret
from app.extensions import db
from app.models import ApiKey

with create_app().app_context():
    row = db.session.execute(
        select(ApiKey.id).where(ApiKey.key_hash == hash_secret(sys.argv[1]), ApiKey.revoked_at.is_(None))
    ).first()
sys.exit(0 if row else 1)
PY
}

# Reuse var/dev-api-key while the database knows it, so reruns print the same key.
dev_api_key() {
  if [ -s "$KEY_FILE" ] && key_is_valid "$(cat "$KEY_FILE")"; then
    cat "$KEY_FILE"
    return
  fi
  local secret
  secret=$("$BIN/flask" --app app keys create dev | sed -n 's/^key: //p')
  [ -n "$secret" ] || { echo "serve: could not create a development API key" >&2; exit 1; }
  (umask 077 && printf '%s\n' "$secret" > "$KEY_FILE")
  printf '%s\n' "$secret"
}

API_KEY=$(dev_api_key)

pids=()
stop_all() {
  trap - EXIT INT TERM
  # SIGTERM = Celery warm shutdown: a running job checkpoints at its next step and is requeued.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + STOP_WAIT_S))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  echo "serve: stopped" >&2
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --pool=solo: one job per worker process, and the warm-shutdown flag reaches the running job.
for queue in train samples; do
  "$BIN/celery" -A worker.celery_app worker -Q "$queue" -c 1 --pool=solo -n "$queue@%h" --loglevel=INFO \
    >>"$LOG_DIR/worker-$queue.log" 2>&1 &
  pids+=($!)
done

URL="http://$HOST:$PORT"
cat <<EOF
StableTrain is starting
  API        $URL/v1
  docs       $URL/docs   (OpenAPI: $URL/v1/openapi.json)
  dashboard  $URL/ui
  dev key    $API_KEY    (stored in $KEY_FILE)
  logs       $LOG_DIR/worker-train.log, $LOG_DIR/worker-samples.log
  try        curl -H "Authorization: Bearer $API_KEY" $URL/v1/jobs
Press Ctrl-C to stop.
EOF

# gthread: a sample request may wait for its result; threads keep other requests flowing meanwhile.
"$BIN/gunicorn" --bind "$HOST:$PORT" --workers "${WEB_CONCURRENCY:-2}" --worker-class gthread --threads 4 \
  --timeout 120 --no-control-socket --access-logfile - "app:create_app()" &
pids+=($!)
wait "${pids[-1]}"
