#!/usr/bin/env bash
# Starts or stops all local services. `start --record FILE` appends the names of the services
# this call really started (not those already running) so that `stop --only-from FILE` stops
# exactly those: `make test` leaves a developer's own running services alone. A broker already up,
# whoever started it, gets its topics (kafka.sh topics).
# usage: services.sh start [--record FILE] | stop [--only-from FILE] | status
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ALL=(postgres minio kafka)

cmd="${1:-}"; shift || true
record=""; only_from=""
while (($#)); do
  case "$1" in
    --record) record="$2"; shift 2 ;;
    --only-from) only_from="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

case "$cmd" in
  start)
    for s in "${ALL[@]}"; do
      if "$HERE/$s.sh" health >/dev/null 2>&1; then
        echo "[$s] already up"
        # whoever started the broker (`make demo` starts it for a topic of its own), the topics must exist
        if [[ "$s" == kafka ]]; then "$HERE/kafka.sh" topics; fi
      else
        "$HERE/$s.sh" start
        # an `if`, not `[[ … ]] && …`: as the loop's last command that was the script's exit status
        if [[ -n "$record" ]]; then echo "$s" >>"$record"; fi
      fi
    done
    ;;
  stop)
    if [[ -n "$only_from" ]]; then
      [[ -f "$only_from" ]] || exit 0
      mapfile -t names <"$only_from"
    else
      names=("${ALL[@]}")
    fi
    status=0
    for s in "${names[@]}"; do
      if [[ -n "$s" ]]; then "$HERE/$s.sh" stop || status=1; fi
    done
    exit "$status"
    ;;
  status)
    status=0
    for s in "${ALL[@]}"; do "$HERE/$s.sh" status || status=1; done
    exit "$status"
    ;;
  *) echo "usage: $0 start [--record FILE] | stop [--only-from FILE] | status" >&2; exit 2 ;;
esac
