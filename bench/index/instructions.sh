#!/usr/bin/env bash
# Hot-path cost of the slots module in CPU instructions, which (unlike
# throughput) do not depend on what else the machine is doing: the same
# commands are sent to redis-server running under callgrind, once without
# and once with the module, and only instructions executed inside
# processCommand() (the command, the keyspace events it fires, our
# callbacks) are counted.
# Usage: bench/index/instructions.sh [N=100000]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
n=${1:-100000}
bash scripts/deps.sh
cargo build --release -p slots >/dev/null
module="$root/target/release/libslots.so"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The same N keys as SETs (new.resp), GETs (get.resp) and DELs (del.resp).
python3 - "$n" "$work" <<'PY'
import sys
n, work = int(sys.argv[1]), sys.argv[2]
keys = [b"key:%010d" % i for i in range(n)]
def write(name, cmd, extra):
    with open(f"{work}/{name}.resp", "wb") as out:
        for k in keys:
            args = [cmd, k] + extra
            out.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
write("new", b"SET", [b"val"])
write("get", b"GET", [])
write("del", b"DEL", [])
PY

# Instructions executed inside processCommand for the given command files,
# sent in order (each file is a phase of N commands).
total() { # outname [files...] -- [server args...]
  local name=$1; shift
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done
  shift
  local port=7311
  valgrind --tool=callgrind --toggle-collect=processCommand --callgrind-out-file="$work/cg.$name" \
    redis-server --port $port --bind 127.0.0.1 --save "" --appendonly no --dir "$work" "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 150); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.2; done
  for f in "${files[@]}"; do redis-cli -p $port --pipe < "$work/$f.resp" >/dev/null; done
  redis-cli -p $port shutdown nosave >/dev/null 2>&1 || true
  wait $pid || true
  # No early exit in awk: callgrind_annotate would die of SIGPIPE (pipefail).
  callgrind_annotate "$work/cg.$name" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",","",$1); print $1; done=1}'
}

# The cost of a phase = total(setup + phase) - total(setup): counts are
# deterministic, so the difference is exact (the PING/SHUTDOWN around them
# cancel out).
printf "%-20s %16s %16s %8s\n" "" "without module" "with module" ratio
for variant in base mod; do
  args=(); [ $variant = mod ] && args=(--loadmodule "$module")
  e=$(total "$variant-empty" -- "${args[@]}")
  s=$(total "$variant-set" new -- "${args[@]}")
  o=$(total "$variant-over" new new -- "${args[@]}")
  g=$(total "$variant-get" new get -- "${args[@]}")
  d=$(total "$variant-del" new del -- "${args[@]}")
  echo "$variant $((s-e)) $((o-s)) $((g-s)) $((d-s))" >> "$work/results"
done
python3 - "$work/results" "$n" <<'PY'
import sys
rows = {l.split()[0]: list(map(int, l.split()[1:])) for l in open(sys.argv[1])}
n = int(sys.argv[2])
for i, label in enumerate(["SET (new key)", "SET (existing key)", "GET", "DEL"]):
    a, b = rows["base"][i], rows["mod"][i]
    print(f"{label:20s} {a/n:11.0f} Ir/op {b/n:11.0f} Ir/op {b/a:8.3f}")
PY
