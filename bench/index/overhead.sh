#!/usr/bin/env bash
# Cost of the slots module, measured side by side in one run:
#  1. memory: the same N keys (names of 20-30 bytes) loaded into a server
#     without the module and one with it; bytes per key = difference of
#     used_memory / N, next to the module's own slots_index_bytes / N;
#  2. hot path: redis-benchmark -t set,get -P 16 against both servers,
#     alternating, ROUNDS rounds each; medians and the ratio.
# Usage: bench/index/overhead.sh [N=1000000] [ROUNDS=5]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
n=${1:-1000000}
rounds=${2:-5}
bash scripts/deps.sh
cargo build --release -p slots >/dev/null
module="$root/target/release/libslots.so"
work=$(mktemp -d)
trap 'redis-cli -p 7301 shutdown nosave >/dev/null 2>&1 || true; redis-cli -p 7302 shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

start() { # port [module args]
  local port=$1; shift
  mkdir -p "$work/$port"
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
    --dir "$work/$port" --logfile "$work/$port/log" "$@"
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server on $port did not start" >&2; exit 1
}
field() { redis-cli -p "$1" info "$2" | tr -d '\r' | awk -F: -v f="$3" '$1==f {print $2}'; }

start 7301
start 7302 --loadmodule "$module"

echo "== memory: $n keys of 20-30 bytes"
python3 bench/index/gen_keys.py "$n" > "$work/keys.resp"
keybytes=$(python3 - "$n" <<'PY'
import random, sys
n = int(sys.argv[1]); rng = random.Random(42)
print(sum(rng.randint(20, 30) for _ in range(n)))
PY
)
for p in 7301 7302; do redis-cli -p "$p" --pipe < "$work/keys.resp" >/dev/null; done
m1=$(field 7301 memory used_memory); m2=$(field 7302 memory used_memory)
idx=$(field 7302 slots slots_index_bytes)
redis-cli -p 7302 slots.check >/dev/null
python3 - "$n" "$keybytes" "$m1" "$m2" "$idx" <<'PY'
import sys
n, kb, m1, m2, idx = map(int, sys.argv[1:])
print(f"keys: {n}, mean key length: {kb/n:.2f} bytes")
print(f"used_memory without module: {m1}, with module: {m2}")
print(f"index cost from used_memory delta: {(m2-m1)/n:.2f} bytes/key = key length + {(m2-m1-kb)/n:.2f}")
print(f"slots_index_bytes: {idx} = {idx/n:.2f} bytes/key = key length + {(idx-kb)/n:.2f}")
PY
for p in 7301 7302; do redis-cli -p "$p" flushall >/dev/null; done

echo "== hot path: redis-benchmark -t set,get -P 16 -n 2000000 -r 1000000 -c 50, $rounds rounds each, alternating"
bench() { redis-benchmark -p "$1" -t set,get -P 16 -n 2000000 -r 1000000 -c 50 -q 2>/dev/null | tr '\r' '\n' | grep 'requests per second' | awk '{print $1, $2}'; }
: > "$work/results"
for r in $(seq "$rounds"); do
  for p in 7301 7302; do
    bench "$p" | while read -r name rps; do echo "$p ${name%:} $rps" >> "$work/results"; done
  done
done
python3 - "$work/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for cmd in ("SET", "GET"):
    base = [float(r[2]) for r in rows if r[0] == "7301" and r[1] == cmd]
    mod = [float(r[2]) for r in rows if r[0] == "7302" and r[1] == cmd]
    mb, mm = statistics.median(base), statistics.median(mod)
    print(f"{cmd}: without module median {mb:,.0f} req/s {sorted(base)}; with module median {mm:,.0f} req/s {sorted(mod)}; ratio {mm/mb:.3f}")
PY
