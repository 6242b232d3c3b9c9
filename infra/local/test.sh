#!/usr/bin/env bash
# What `make test` runs after lint: start the real services, migrate PostgreSQL, run pytest,
# and stop the services this script started (also when pytest fails or is interrupted).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

started="$(mktemp)"
cleanup() {
  local status=$?
  bash infra/local/services.sh stop --only-from "$started" || true
  rm -f "$started"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# kcat (Debian) is the outside producer in the Kafka tests; nginx the load balancer in front of the
# model-server replicas in tests/integration/test_split_deployment.py; chromium the headless browser
# Playwright drives in tests/integration/test_dashboard_browser.py (the system one: no browser download).
missing=()
command -v kcat >/dev/null || missing+=(kcat)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
if ((${#missing[@]})); then
  if [[ "$(id -u)" != 0 ]]; then echo "[test] missing: sudo apt-get install -y ${missing[*]}" >&2; exit 1; fi
  echo "[test] installing ${missing[*]} (Debian)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null
fi

bash infra/local/services.sh start --record "$started"

export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-retrainer}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-retrainer-secret}"
export RETRAINER_TEST_POSTGRES_URL="${RETRAINER_TEST_POSTGRES_URL:-postgresql+psycopg://retrainer:retrainer@127.0.0.1:${RETRAINER_PG_PORT:-5432}/retrainer_test}"
export RETRAINER_TEST_S3_ENDPOINT_URL="${RETRAINER_TEST_S3_ENDPOINT_URL:-http://127.0.0.1:${RETRAINER_MINIO_PORT:-9000}}"
export RETRAINER_TEST_KAFKA="${RETRAINER_TEST_KAFKA:-127.0.0.1:${RETRAINER_KAFKA_PORT:-9092}}"
# Inside make test a missing service is a failure, never a silent skip.
export RETRAINER_REQUIRE_SERVICES=1

echo "[test] applying migrations to PostgreSQL"
RETRAINER_DATABASE_URL="$RETRAINER_TEST_POSTGRES_URL" .venv/bin/retrainer db upgrade

.venv/bin/python -m pytest "$@"
