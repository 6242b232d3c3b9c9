#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker+controller) on 127.0.0.1:9092.
# The official broker jars come from Maven Central through infra/kafka/pom.xml.
# `start` and `topics` create the event topic, its dead-letter topic and the decision events' topic
# wherever they are missing, whoever started the broker; the names follow RETRAINER_KAFKA_TOPIC,
# RETRAINER_KAFKA_DLQ_TOPIC and RETRAINER_DECISIONS_TOPIC.
# usage: kafka.sh start|stop|status|health|topics
SERVICE=kafka
source "$(dirname "$0")/common.sh"

HOST=127.0.0.1
PORT="${RETRAINER_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${RETRAINER_KAFKA_CONTROLLER_PORT:-9093}"
HOME_DIR="$CACHE_DIR/kafka"
LIBS="$HOME_DIR/libs"
DATA="$HOME_DIR/data"
CONF="$HOME_DIR/server.properties"
LOG="$CACHE_DIR/logs/kafka.log"
PIDFILE="$CACHE_DIR/run/kafka.pid"
POM="$REPO_ROOT/infra/kafka/pom.xml"
TOPIC="${RETRAINER_KAFKA_TOPIC:-retrainer.data-changes}"
DLQ_TOPIC="${RETRAINER_KAFKA_DLQ_TOPIC:-$TOPIC.dlq}"
DECISIONS_TOPIC="${RETRAINER_DECISIONS_TOPIC:-retrainer.decisions}"
HEAP="${RETRAINER_KAFKA_HEAP:-512m}"

resolve_jars() {
  local stamp="$LIBS/.pom.sha256" want
  want="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka broker jars; install it (apt-get install maven)"
  command -v java >/dev/null || die "Java 17+ is needed to run Kafka; install it (apt-get install openjdk-17-jre-headless)"
  log "resolving Kafka jars from Maven Central (one time)"
  rm -rf "$LIBS"
  mvn -q -B -f "$POM" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS" \
    >"$CACHE_DIR/logs/kafka-mvn.log" 2>&1 || fail_with_log "$CACHE_DIR/logs/kafka-mvn.log" "mvn could not resolve the Kafka jars"
  echo "$want" >"$stamp"
}

run_class() { java -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$HOME_DIR/log4j2.properties" "$@"; }

write_config() {
  mkdir -p "$DATA"
  cat >"$CONF" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
CONF
  cat >"$HOME_DIR/log4j2.properties" <<'L4J'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
L4J
}

format_storage() {
  if [[ -f "$DATA/meta.properties" ]]; then return 0; fi
  local cluster_id
  cluster_id="$(run_class kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)"
  log "formatting KRaft storage (cluster $cluster_id)"
  run_class kafka.tools.StorageTool format --cluster-id "$cluster_id" --config "$CONF" --standalone \
    >>"$LOG" 2>&1 || fail_with_log "$LOG" "could not format KRaft storage in $DATA"
}

topics() { run_class org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$PORT" "$@"; }

health() { port_open "$HOST" "$PORT" && topics --list >/dev/null 2>&1; }

# ensure_topics: the event topic (3 partitions), its dead-letter topic (1 partition) and the decision
# events' topic (3 partitions, flows/relay.py), created where missing. Automatic topic creation is
# off, and a broker that answers may have been started for other topics (`make demo` starts it for a
# topic of its own), so this runs on every start, not only a fresh one.
ensure_topics() {
  local existing spec name created=()
  existing="$(topics --list 2>>"$LOG")" || fail_with_log "$LOG" "could not list the topics on $HOST:$PORT"
  for spec in "$TOPIC:3" "$DLQ_TOPIC:1" "$DECISIONS_TOPIC:3"; do
    name="${spec%:*}"
    if grep -qxF -- "$name" <<<"$existing"; then continue; fi
    # --if-not-exists: another caller may create it between the listing and here
    topics --create --if-not-exists --topic "$name" --partitions "${spec##*:}" --replication-factor 1 >>"$LOG" 2>&1 \
      || fail_with_log "$LOG" "could not create topic $name"
    created+=("$name")
  done
  if ((${#created[@]})); then log "created topics: ${created[*]}"; fi
}

launch() {
  write_config
  format_storage
  log "starting broker on $HOST:$PORT (heap $HEAP)"
  : >"$LOG"
  setsid java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$HOME_DIR/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$CONF" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  if ! wait_until 90 "kafka" health; then
    if pid_alive "$PIDFILE"; then kill -KILL "$(cat "$PIDFILE")" 2>/dev/null || true; fi
    rm -f "$PIDFILE"
    fail_with_log "$LOG" "broker did not answer on $HOST:$PORT within 90 s"
  fi
}

start() {
  resolve_jars
  if pid_alive "$PIDFILE"; then
    wait_until 90 "kafka" health || fail_with_log "$LOG" "broker (pid $(cat "$PIDFILE")) does not answer on $HOST:$PORT"
    log "already running (pid $(cat "$PIDFILE"))"
  elif port_open "$HOST" "$PORT"; then
    health || die "something else already listens on $HOST:$PORT; stop it or set RETRAINER_KAFKA_PORT"
    log "a broker started elsewhere answers on $HOST:$PORT"
  else
    launch
  fi
  ensure_topics
  log "ready on $HOST:$PORT; topics $TOPIC (3 partitions), $DLQ_TOPIC, $DECISIONS_TOPIC"
}

case "${1:-}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" ;;
  health) health ;;
  topics) resolve_jars; health || die "no broker answers on $HOST:$PORT; start one with $0 start"; ensure_topics ;;
  status) if health; then echo "kafka: up on $HOST:$PORT"; else echo "kafka: down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status|health|topics" >&2; exit 2 ;;
esac
