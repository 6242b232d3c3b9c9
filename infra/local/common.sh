# Shared helpers for the local service scripts. Sourced, never run.
# Every service keeps its downloads, data, logs and pid under one git-ignored cache folder.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE_DIR="${RETRAINER_CACHE_DIR:-$REPO_ROOT/.cache}"
mkdir -p "$CACHE_DIR/logs" "$CACHE_DIR/run" "$CACHE_DIR/bin"

log() { printf '[%s] %s\n' "$SERVICE" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$SERVICE" "$*" >&2; exit 1; }

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.5 s.
wait_until() {
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@"; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 0.5
  done
}

# fail_with_log LOGFILE MESSAGE: a service that did not come up shows the tail of its own log.
fail_with_log() {
  printf '[%s] error: %s\n' "$SERVICE" "$2" >&2
  if [[ -f "$1" ]]; then
    printf '[%s] last lines of %s:\n' "$SERVICE" "$1" >&2
    tail -n 30 "$1" | sed 's/^/    /' >&2
  fi
  exit 1
}

# stop_pidfile PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pidfile() {
  local pidfile="$1" pid
  if ! pid_alive "$pidfile"; then rm -f "$pidfile"; log "not running"; return 0; fi
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then log "still running after 30 s, killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
  log "stopped"
}

# as_user USER CMD...: PostgreSQL refuses to run as root; everything else runs as the caller.
# From / so that a private current directory does not trouble the other user.
as_user() {
  local user="$1"; shift
  if [[ "$(id -u)" == 0 && "$user" != root ]]; then (cd / && runuser -u "$user" -- "$@"); else "$@"; fi
}
