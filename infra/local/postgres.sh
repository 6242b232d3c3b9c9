#!/usr/bin/env bash
# Local PostgreSQL (Debian's package) on 127.0.0.1:5432 with a `retrainer` role and the databases
# `retrainer` and `retrainer_test`. The cluster lives in the cache folder, not in /var/lib.
# usage: postgres.sh start|stop|status|health
SERVICE=postgres
source "$(dirname "$0")/common.sh"

HOST=127.0.0.1
PORT="${RETRAINER_PG_PORT:-5432}"
PG_USER=retrainer
PG_PASSWORD="${RETRAINER_PG_PASSWORD:-retrainer}"
# postgres will not run as root; when we are root it runs as the `postgres` user of the package.
OS_USER="$( [[ "$(id -u)" == 0 ]] && echo postgres || id -un )"

# Where the cluster lives: the cache folder, unless the postgres user cannot reach it (a checkout
# under a private folder such as /root, mode 700); then a folder named after this checkout in
# that user's own home. Called after the package is installed (the user exists from then on).
resolve_paths() {
  HOME_DIR="$CACHE_DIR/postgres"
  if [[ "$OS_USER" != "$(id -un)" ]] && ! runuser -u "$OS_USER" -- test -x "$CACHE_DIR" 2>/dev/null; then
    HOME_DIR="$(getent passwd "$OS_USER" | cut -d: -f6)/retrainer-$(printf '%s' "$CACHE_DIR" | sha256sum | cut -c1-12)"
  fi
  DATA="$HOME_DIR/data"
  SOCKETS="$HOME_DIR/run"
  LOG="$HOME_DIR/postgres.log"  # written by the server process, so it lives where that user can write
}

find_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [[ -x "$dir/initdb" ]] && BIN="$dir"
  done
  [[ -n "${BIN:-}" ]]
}

ensure_installed() {
  if find_bin; then return 0; fi
  if [[ "$(id -u)" != 0 ]]; then die "PostgreSQL is not installed; run: sudo apt-get install -y postgresql"; fi
  log "installing Debian's postgresql package (one time)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
    >"$CACHE_DIR/logs/postgres-apt.log" 2>&1 || fail_with_log "$CACHE_DIR/logs/postgres-apt.log" "apt-get install postgresql failed"
  find_bin || die "postgresql installed but initdb not found under /usr/lib/postgresql/*/bin"
}

pg() { as_user "$OS_USER" "$@"; }
psql_admin() { pg "$BIN/psql" -h "$SOCKETS" -p "$PORT" -U "$OS_USER" -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

health() {
  find_bin || return 1
  resolve_paths
  PGPASSWORD="$PG_PASSWORD" "$BIN/psql" "postgresql://$PG_USER@$HOST:$PORT/retrainer_test" -qAt -c 'select 1' >/dev/null 2>&1
}

init_cluster() {
  if [[ -f "$DATA/PG_VERSION" ]]; then return 0; fi
  log "initialising a cluster in $DATA"
  mkdir -p "$DATA" "$SOCKETS"
  chown -R "$OS_USER" "$HOME_DIR"
  chmod 700 "$DATA"
  pg "$BIN/initdb" -D "$DATA" -U "$OS_USER" --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
    >>"$LOG" 2>&1 || fail_with_log "$LOG" "initdb failed"
}

ensure_databases() {
  psql_admin -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
        CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD' CREATEDB;
      END IF;
    END \$\$;" >/dev/null
  local db
  for db in retrainer retrainer_test; do
    if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
      psql_admin -c "CREATE DATABASE $db OWNER $PG_USER" >/dev/null
    fi
  done
}

start() {
  ensure_installed
  resolve_paths
  mkdir -p "$SOCKETS"; touch "$LOG"; chown "$OS_USER" "$HOME_DIR" "$SOCKETS" "$LOG" 2>/dev/null || true
  ln -sfn "$LOG" "$CACHE_DIR/logs/postgres.log"
  if pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    log "already running"
  else
    if port_open "$HOST" "$PORT"; then
      die "something else already listens on $HOST:$PORT (a system cluster? 'pg_lsclusters'); stop it or set RETRAINER_PG_PORT"
    fi
    init_cluster
    log "starting on $HOST:$PORT"
    pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
      -o "-c listen_addresses=$HOST -p $PORT -c unix_socket_directories=$SOCKETS -c fsync=off -c max_connections=200" \
      start >/dev/null 2>&1 || fail_with_log "$LOG" "PostgreSQL did not start"
  fi
  ensure_databases
  wait_until 30 postgres health || fail_with_log "$LOG" "PostgreSQL does not accept $PG_USER on $HOST:$PORT"
  log "ready: postgresql+psycopg://$PG_USER:***@$HOST:$PORT/retrainer_test"
}

stop() {
  find_bin && resolve_paths
  if ! find_bin || ! pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then log "not running"; return 0; fi
  pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null && log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  health) health ;;
  status) if health; then echo "postgres: up on $HOST:$PORT"; else echo "postgres: down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status|health" >&2; exit 2 ;;
esac
