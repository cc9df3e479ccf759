#!/usr/bin/env bash
# Leak check: the whole integration test workload against redis-server running
# under valgrind, then a verdict on every server's leak report.
#
# Why a special redis-server: Debian's binary allocates through jemalloc,
# which valgrind cannot see into, and the module allocates through the
# server's allocator (RedisModule_Alloc). So this script builds Redis 7.0.15
# from Debian's source with MALLOC=libc (cached in .build/redis/libc/), and
# runs the tests with REDIS_SERVER pointing at a valgrind wrapper.
#
# Servers are stopped with SIGTERM (SLOTS_TEST_GRACEFUL=1) so that valgrind
# writes its report.
#
# Verdict: the script fails if any "definitely lost" block has the module
# (libslots.so) in its allocation stack. Leaks inside redis-server itself
# are listed but do not fail the check.
#
# Usage: scripts/leak-check.sh [test filter]   e.g. scripts/leak-check.sh property
# Reports: .build/leak/vg-<pid>.log
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/deps.sh

server="$root/.build/redis/libc/redis-server"
if [ ! -x "$server" ]; then
  src="${REDIS_SRC:-}"
  # Reuse the tree scripts/build-redis.sh fetched, if there is one.
  [ -z "$src" ] && [ -f "$root/.build/redis/src/src/server.c" ] && src="$root/.build/redis/src"
  if [ -z "$src" ]; then
    mkdir -p .build/src
    src=$(ls -d "$root"/.build/src/redis-7.0.15 2>/dev/null || true)
    if [ -z "$src" ]; then
      if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
          > /etc/apt/sources.list.d/slotfork-src.sources
      fi
      apt-get update -qq
      command -v dpkg-source >/dev/null || apt-get install -y -qq dpkg-dev >/dev/null
      (cd .build/src && apt-get source -qq redis >/dev/null 2>&1)
      src="$root/.build/src/redis-7.0.15"
    fi
  fi
  echo "leak-check: building a libc-malloc redis-server from $src"
  rm -rf .build/redis/libc-src && mkdir -p .build/redis/libc && cp -a "$src" .build/redis/libc-src
  make -C .build/redis/libc-src -j"$(nproc)" MALLOC=libc BUILD_TLS=no redis-server >/dev/null
  cp .build/redis/libc-src/src/redis-server "$server"
fi

logs="$root/.build/leak"
rm -rf "$logs" && mkdir -p "$logs"
wrapper="$logs/redis-server-valgrind"
cat > "$wrapper" <<WRAP
#!/bin/sh
exec valgrind --leak-check=full --show-leak-kinds=definite --num-callers=40 --keep-debuginfo=yes \\
  --log-file="$logs/vg-%p.log" "$server" "\$@"
WRAP
chmod +x "$wrapper"

verdict() { # log-dir -> exit status 1 when a module leak is found
python3 - "$1" <<'PY'
import glob, re, sys
logs = sorted(glob.glob(sys.argv[1] + "/vg-*.log"))
module_leaks, other_leaks, reports = [], [], 0
# Frames of the module: our crate, the redis-module crate linked into it, its
# entry points. --keep-debuginfo keeps them named after an unload.
ours = re.compile(r"slots::|redis_module::|RedisModule_OnLoad|RedisModule_OnUnload|libslots")
for path in logs:
    text = open(path, errors="replace").read()
    if "LEAK SUMMARY" in text or "All heap blocks were freed" in text:
        reports += 1
    for rec in re.split(r"==\d+== \n", text):
        if "definitely lost in loss record" not in rec:
            continue
        (module_leaks if ours.search(rec) else other_leaks).append((path, rec.strip()))
print(f"leak-check: {len(logs)} server runs, {reports} with a leak report")
for path, rec in other_leaks[:3]:
    print(f"--- leak outside the module ({path}):\n{rec[:1200]}")
for path, rec in module_leaks[:10]:
    print(f"--- LEAK IN THE MODULE ({path}):\n{rec}")
if reports == 0:
    print("leak-check: no server produced a leak report; the check saw nothing")
    sys.exit(1)
if module_leaks:
    print(f"leak-check: {len(module_leaks)} definite leak(s) attributable to the module")
    sys.exit(1)
print(f"leak-check: no definite leak attributable to the module ({len(other_leaks)} outside it)")
PY
}

# 1. Self-test: a module built with a deliberate leak must be caught.
echo "leak-check: self-test with a module that leaks on purpose"
cargo build -p slots --features leak-selftest --target-dir "$root/target/leak-selftest"
selftest="$logs/selftest"
mkdir -p "$selftest"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
valgrind --leak-check=full --show-leak-kinds=definite --keep-debuginfo=yes --log-file="$selftest/vg-%p.log" \
  "$server" --port "$port" --bind 127.0.0.1 --save "" --dir "$selftest" \
  --loadmodule "$root/target/leak-selftest/debug/libslots.so" >/dev/null 2>&1 &
vg=$!
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
redis-cli -p "$port" slots.selftest-leak
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
wait $vg || true
if verdict "$selftest"; then
  echo "leak-check: FAILED: the planted leak was not detected; the check cannot be trusted"
  exit 1
fi
echo "leak-check: self-test OK (the planted leak was detected)"

# 2. The integration workload.
cargo build -p slots
# The whole suite except the migration tests, then a migration subset that
# exercises every code path (every record type, big keys in chunks, ASK,
# cancel, failures) on small data: under valgrind everything is ~30x slower
# and the full migration set (big keys of 200k elements, killed servers,
# timeouts) would not fit CI's time limit.
base_tests=$(ls tests/tests/*.rs | xargs -n1 basename | sed 's/\.rs$//' | grep -v '^migrate_' | sed 's/^/--test /' | tr '\n' ' ')
SLOTS_MODULE="$root/target/debug/libslots.so" REDIS_SERVER="$wrapper" \
  SLOTS_TEST_GRACEFUL=1 \
  cargo test -p slotfork-tests --no-fail-fast $base_tests -- --test-threads=2 ${1:+"$1"} >"$logs/tests.log" 2>&1 \
  || echo "leak-check: some tests failed under valgrind (timeouts: everything is ~30x slower); see $logs/tests.log"
SLOTS_MODULE="$root/target/debug/libslots.so" REDIS_SERVER="$wrapper" \
  SLOTS_TEST_GRACEFUL=1 \
  cargo test -p slotfork-tests --no-fail-fast --test migrate_restore_protocol --test migrate_commands \
    --test migrate_redirect --test migrate_types -- --test-threads=2 \
    --skip throttle --skip big_encodings --skip parallel_connections --skip wait_from_several \
    --skip finished_jobs_remembered --skip keys_expiring_during --skip crc16 \
    >>"$logs/tests.log" 2>&1 \
  || echo "leak-check: some migration tests failed under valgrind (timeouts); see $logs/tests.log"
# The workload's own pass/fail is not the verdict here (scripts/test.sh runs
# the same tests at full speed); its output stays in the log so that CI reads
# the real test run's summary, not this one's.
grep -E '^test result' "$logs/tests.log" | awk '{p+=$4; f+=$6} END {print "leak-check: workload ran " p+f " tests under valgrind (" f " did not finish in time or failed)"}' 

if verdict "$logs"; then
  echo "leak-check: OK"
else
  echo "leak-check: FAILED"
  exit 1
fi
