#!/usr/bin/env bash
# Local S3-compatible server: MinIO, built from its Go module with `go install` (binary cached),
# on 127.0.0.1:9000 with its data in the cache folder. Creates the buckets in $RETRAINER_S3_BUCKETS.
# usage: minio.sh start|stop|status|health
SERVICE=minio
source "$(dirname "$0")/common.sh"

HOST=127.0.0.1
PORT="${RETRAINER_MINIO_PORT:-9000}"
CONSOLE_PORT="${RETRAINER_MINIO_CONSOLE_PORT:-9001}"
MINIO_MODULE="github.com/minio/minio"
# Pinned: the pseudo-version `go install ...@latest` resolved on 2026-11-23 (MinIO tags no Go-module releases).
MINIO_VERSION="${RETRAINER_MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
BIN="$CACHE_DIR/bin/minio"
DATA="$CACHE_DIR/minio/data"
LOG="$CACHE_DIR/logs/minio.log"
PIDFILE="$CACHE_DIR/run/minio.pid"
BUCKETS="${RETRAINER_S3_BUCKETS:-retrainer retrainer-test datasets}"
export MINIO_ROOT_USER="${AWS_ACCESS_KEY_ID:-retrainer}"
export MINIO_ROOT_PASSWORD="${AWS_SECRET_ACCESS_KEY:-retrainer-secret}"

build() {
  if [[ -x "$BIN" ]]; then return 0; fi
  command -v go >/dev/null || die "Go is needed to build MinIO (go install $MINIO_MODULE); install Go 1.24+ from go.dev"
  log "building MinIO with 'go install $MINIO_MODULE@$MINIO_VERSION' (one time, several minutes on 2 cores)"
  GOBIN="$CACHE_DIR/bin" GOFLAGS=-trimpath go install "$MINIO_MODULE@$MINIO_VERSION" \
    >"$CACHE_DIR/logs/minio-build.log" 2>&1 || fail_with_log "$CACHE_DIR/logs/minio-build.log" "go install $MINIO_MODULE failed"
}

health() { curl -fsS -o /dev/null --max-time 2 "http://$HOST:$PORT/minio/health/live" 2>/dev/null; }

# S3 CreateBucket signed with SigV4 by curl itself: no client tool needed.
create_buckets() {
  local bucket code
  for bucket in $BUCKETS; do
    code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X PUT \
      --aws-sigv4 "aws:amz:us-east-1:s3" --user "$MINIO_ROOT_USER:$MINIO_ROOT_PASSWORD" \
      "http://$HOST:$PORT/$bucket")"
    case "$code" in
      200|409) ;;  # 409: BucketAlreadyOwnedByYou
      *) die "could not create bucket $bucket (HTTP $code)" ;;
    esac
  done
}

start() {
  if pid_alive "$PIDFILE" && health; then log "already running (pid $(cat "$PIDFILE"))"; create_buckets; return 0; fi
  if port_open "$HOST" "$PORT"; then
    die "something else already listens on $HOST:$PORT; stop it or set RETRAINER_MINIO_PORT"
  fi
  build
  mkdir -p "$DATA"
  log "starting on $HOST:$PORT"
  : >"$LOG"
  MINIO_BROWSER=off MINIO_UPDATE=off setsid "$BIN" server --quiet --address "$HOST:$PORT" \
    --console-address "$HOST:$CONSOLE_PORT" "$DATA" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  if ! wait_until 60 minio health; then
    if pid_alive "$PIDFILE"; then kill -KILL "$(cat "$PIDFILE")" 2>/dev/null || true; fi
    rm -f "$PIDFILE"
    fail_with_log "$LOG" "MinIO did not answer on $HOST:$PORT within 60 s"
  fi
  create_buckets
  log "ready on http://$HOST:$PORT; buckets: $BUCKETS"
}

case "${1:-}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" ;;
  health) health ;;
  status) if health; then echo "minio: up on $HOST:$PORT"; else echo "minio: down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status|health" >&2; exit 2 ;;
esac
