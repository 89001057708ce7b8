#!/usr/bin/env bash
# The class server on one machine, all on loopback, as ordinary (non-root) processes with pid files:
#   deploy/class-server.sh start|stop|status [--replicas N] [--workers K] [--port P] [--base-port B]
#                                            [--redis-port R] [--threads T] [--worker-nice W] [--run DIR]
# start: redis-server (its own config and dir under DIR), K RQ workers (python -m qcore.jobs.worker, T torch
# threads each, at niceness W (default 10: on a shared machine the replicas, which answer the browsers, get the
# CPU first and a page stays responsive while every worker is busy), N Streamlit replicas on ports B..B+N-1 sharing one cookieSecret, nginx on P in front
# (deploy/nginx_conf.py: sticky cookie, websocket upgrade). Open http://127.0.0.1:P.
# Workers on other machines: run `python -m qcore.jobs.worker --redis redis://<this host>:R/0` there (and bind
# Redis to an address they reach, with a password); nothing else changes.
set -euo pipefail
cd "$(dirname "$0")/.."
ACTION=${1:-status}; shift || true
REPLICAS=2 WORKERS=2 PORT=8600 BASE=8601 REDIS_PORT=6390 THREADS=1 WORKER_NICE=10 RUN=${QCORE_RUN_DIR:-$PWD/.run/class-server}
while [ $# -gt 0 ]; do
  case $1 in
    --replicas) REPLICAS=$2;; --workers) WORKERS=$2;; --port) PORT=$2;; --base-port) BASE=$2;;
    --redis-port) REDIS_PORT=$2;; --threads) THREADS=$2;; --worker-nice) WORKER_NICE=$2;; --run) RUN=$2;;
    *) echo "unknown option $1 (see the comment at the top of $0)" >&2; exit 2;;
  esac; shift 2
done
PY=${QCORE_PYTHON:-$PWD/.venv/bin/python}; [ -x "$PY" ] || PY=$(command -v python3)
URL="redis://127.0.0.1:$REDIS_PORT/0"
mkdir -p "$RUN"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
rss_mib() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status" 2>/dev/null; }

start() {
  for f in "$RUN"/*.pid; do alive "$f" && { echo "already running ($f); stop it first" >&2; exit 2; }; done
  mkdir -p "$RUN/redis"
  printf 'port %s\nbind 127.0.0.1\nprotected-mode yes\ndir %s\nsave ""\nappendonly no\ndaemonize yes\npidfile %s\nlogfile %s\nmaxmemory 512mb\nmaxmemory-policy noeviction\n' \
    "$REDIS_PORT" "$RUN/redis" "$RUN/redis.pid" "$RUN/redis.log" > "$RUN/redis.conf"
  redis-server "$RUN/redis.conf"
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  for i in $(seq "$WORKERS"); do
    nohup nice -n "$WORKER_NICE" "$PY" -m qcore.jobs.worker --redis "$URL" --threads "$THREADS" --name "worker-$i-$$" \
      > "$RUN/worker-$i.log" 2>&1 & echo $! > "$RUN/worker-$i.pid"
  done
  [ -f "$RUN/cookie-secret" ] || "$PY" -c "import secrets; print(secrets.token_hex(32))" > "$RUN/cookie-secret"
  ports=()
  for i in $(seq "$REPLICAS"); do
    p=$((BASE + i - 1)); ports+=("$p")
    QCORE_REDIS_URL=$URL STREAMLIT_SERVER_COOKIE_SECRET=$(cat "$RUN/cookie-secret") nohup "$PY" -m streamlit run app.py \
      --server.port "$p" --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false \
      --server.fileWatcherType none --server.runOnSave false \
      > "$RUN/replica-$i.log" 2>&1 & echo $! > "$RUN/replica-$i.pid"
  done
  "$PY" deploy/nginx_conf.py "$RUN" "$PORT" "${ports[@]}" >/dev/null
  nginx -e "$RUN/nginx-error.log" -p "$RUN" -c "$RUN/nginx.conf"
  echo "class server: http://127.0.0.1:$PORT ($REPLICAS replicas on ${ports[*]}, $WORKERS workers, Redis $URL)"
}

stop() {
  [ -f "$RUN/nginx.pid" ] && alive "$RUN/nginx.pid" && nginx -e "$RUN/nginx-error.log" -p "$RUN" -c "$RUN/nginx.conf" -s quit || true
  pids=()
  for f in "$RUN"/replica-*.pid "$RUN"/worker-*.pid; do [ -f "$f" ] && { pids+=("$(cat "$f")"); rm -f "$f"; }; done
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.1; done
  [ ${#pids[@]} -gt 0 ] && kill -9 "${pids[@]}" 2>/dev/null || true  # still shutting down after 5 s
  alive "$RUN/redis.pid" && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -f "$RUN/redis.pid" "$RUN/nginx.pid"; echo "stopped"
}

status() {
  for f in "$RUN"/*.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then echo "$(basename "$f" .pid): pid $(cat "$f"), RSS $(rss_mib "$(cat "$f")")"; else echo "$(basename "$f" .pid): not running"; fi
  done
  redis-cli -p "$REDIS_PORT" info memory 2>/dev/null | grep used_memory_human || echo "redis: not answering"
}

case $ACTION in start) start;; stop) stop;; status) status;; *) echo "usage: $0 start|stop|status [options]" >&2; exit 2;; esac
