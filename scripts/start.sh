#!/usr/bin/env bash
# One command from a fresh Debian machine to a running redis-server with the
# slots module: installs what is missing, builds the module (release), starts
# redis-server on 127.0.0.1:${PORT:-6390} in .build/run, and tries a command.
# Extra arguments are passed to the module, e.g.:
#   scripts/start.sh hash-function crc16
#   scripts/start.sh index-mode counts-only
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
port=${PORT:-6390}

bash scripts/deps.sh
cargo build --release -p slots
module="$root/target/release/libslots.so"

run="$root/.build/run"
mkdir -p "$run"
if redis-cli -p "$port" ping >/dev/null 2>&1; then
  echo "start: something already answers on port $port; stopping it (SHUTDOWN NOSAVE)"
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  sleep 0.5
fi
redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
  --dir "$run" --logfile "$run/redis.log" --pidfile "$run/redis.pid" \
  --enable-debug-command local \
  --loadmodule "$module" "$@"
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
if ! redis-cli -p "$port" ping >/dev/null 2>&1; then
  echo "start: redis-server did not come up; its log:" >&2
  tail -20 "$run/redis.log" >&2
  exit 1
fi
echo
echo "redis-server $(redis-server --version | grep -o 'v=[^ ]*') is running on 127.0.0.1:$port with $module"
echo "  log:     $run/redis.log"
echo "  connect: redis-cli -p $port"
echo "  stop:    redis-cli -p $port shutdown nosave"
echo
echo "\$ redis-cli -p $port SLOTS.HASHKEY user:1000 '{user:1000}.cart'"
redis-cli -p "$port" SLOTS.HASHKEY user:1000 '{user:1000}.cart'
echo "\$ redis-cli -p $port INFO slots"
redis-cli -p "$port" INFO slots
