#!/usr/bin/env bash
# Run StableTrain on this machine: the API (gunicorn) plus one Celery worker for training and one for
# samples, all under supervisord (scripts/supervisord.conf), which starts again any of them that dies.
# Ctrl-C (or SIGTERM) stops them all: the workers get a warm shutdown (a running job checkpoints and is
# requeued) for up to STOP_WAIT_S seconds.
#
# Defaults need no servers (SQLite database and broker under var/). For production set
# STABLETRAIN_DATABASE_URL (PostgreSQL), STABLETRAIN_BROKER_URL (Redis) and STABLETRAIN_STORAGE_DIR.
# HOST/PORT pick the listen address (127.0.0.1:8000); SERVE_DIR (var) holds the logs, the dev key and
# supervisord's socket.
set -euo pipefail
cd "$(dirname "$0")/.."

export HOST=${HOST:-127.0.0.1}
export PORT=${PORT:-8000}
export WEB_CONCURRENCY=${WEB_CONCURRENCY:-2}
export STOP_WAIT_S=${STOP_WAIT_S:-60}
mkdir -p "${SERVE_DIR:-var}/log"
SERVE_DIR=$(cd "${SERVE_DIR:-var}" && pwd)
export SERVE_DIR SERVE_REPO=$PWD SERVE_BIN=$PWD/.venv/bin
BIN=.venv/bin
LOG_DIR=$SERVE_DIR/log
KEY_FILE=$SERVE_DIR/dev-api-key

scripts/setup.sh

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

# Reuse the dev key file while the database knows the key, so reruns print the same key.
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

URL="http://$HOST:$PORT"
cat <<EOF
StableTrain is starting
  API        $URL/v1
  docs       $URL/docs   (OpenAPI: $URL/v1/openapi.json)
  dashboard  $URL/ui
  dev key    $API_KEY    (stored in $KEY_FILE)
  logs       $LOG_DIR/worker-{train,samples,webhooks}.log, $LOG_DIR/supervisord.log
  processes  SERVE_DIR=$SERVE_DIR $BIN/supervisorctl -c scripts/supervisord.conf status
  try        curl -H "Authorization: Bearer $API_KEY" $URL/v1/jobs
Press Ctrl-C to stop.
EOF

# supervisord replaces this shell: Ctrl-C and SIGTERM reach it and it stops every process it runs.
exec "$BIN/supervisord" --nodaemon --configuration scripts/supervisord.conf
