#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting and lints, unit tests, and
# the integration tests, which start real redis-server processes with the
# module built here.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build stock and patched redis-server 7.0.15 (async fork; cached in .build/redis)"
MAKE_JOBS="$(nproc)" CARGO_BUILD_JOBS="$(nproc)" bash scripts/build-redis.sh
# The fork engine's Redis-level tests must not skip in CI.
export FORKPATCH_REQUIRE_REDIS=1
echo "== build the module (and the second module some tests load next to it)"
cargo build -p slots -p slotfork-test-helper
export SLOTS_MODULE="$root/target/debug/libslots.so"
export REDIS_SERVER="${REDIS_SERVER:-$(command -v redis-server)}"
echo "== unit and integration tests (redis-server: $REDIS_SERVER)"
mkdir -p .build
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee .build/test-output.log
if [ "${COMPAT:-1}" = 1 ]; then
  # Valkey 8.1 needs a module-side workaround (README, "Valkey 8.1 note"):
  # run the suite against it too, so that workaround cannot silently break.
  echo "== integration tests against Valkey 8.1.1 (COMPAT=0 skips)"
  bash scripts/compat.sh valkey 2>&1 | tee -a .build/test-output.log
fi
if [ "${LEAK_CHECK:-1}" = 1 ]; then
  echo "== leak check (valgrind; LEAK_CHECK=0 skips it)"
  bash scripts/leak-check.sh
fi
# One closing line for the whole run (the leak check prints its own verdict
# above; reaching this line means it passed).
grep -E '^test result' .build/test-output.log |
  awk '{p+=$4; f+=$6} END {printf "slotfork: %d passed, %d failed\n", p, f}'
