#!/usr/bin/env bash
# Compatibility run: builds Valkey 8.1.1 and Redis 8.0.2 from Debian 13's
# sources (the versions the module promises to load into besides Debian 12's
# Redis 7.0.15), then runs the whole integration suite against each with the
# same libslots.so. Servers are cached in .build/compat/<name>/server.
#
# scripts/test.sh runs the valkey part; the builds take a few minutes each.
# Usage: scripts/compat.sh [valkey|redis8]...   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/deps.sh
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(valkey redis8)

# Debian's packages of both use the system's jemalloc and Lua.
pkgs=(libhiredis-dev libjemalloc-dev liblua5.1-dev liblzf-dev libssl-dev lua-bitop-dev lua-cjson-dev pkg-config dpkg-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

compat="$root/.build/compat"
mkdir -p "$compat"
# A private apt configuration for Debian 13 (trixie) sources only, so the
# machine's own sources (and `apt-get source redis` = 7.0.15) stay as they are.
aptdir="$compat/apt"
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" > "$aptdir/sources.list"
O=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
   -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache")

build() { # name srcpkg dirglob binary
  local name=$1 pkg=$2 glob=$3 bin=$4
  local out="$compat/$name/server"
  [ -x "$out" ] && return
  [ -f "$aptdir/lists/lock" ] || apt-get "${O[@]}" update -qq
  local src
  src=$(ls -d "$compat"/$glob 2>/dev/null | head -1 || true)
  if [ -z "$src" ]; then
    (cd "$compat" && apt-get "${O[@]}" source -qq "$pkg" >/dev/null 2>&1)
    src=$(ls -d "$compat"/$glob | head -1)
  fi
  echo "compat: building $name from $src"
  make -C "$src" -j"$(nproc)" USE_SYSTEM_JEMALLOC=yes USE_JEMALLOC=yes BUILD_TLS=no \
    CFLAGS="-I/usr/include/liblzf" LDFLAGS="-ldl -latomic -llzf" "$bin" >"$compat/$name.build.log" 2>&1 \
    || { tail -30 "$compat/$name.build.log"; exit 1; }
  mkdir -p "$compat/$name"
  cp "$src/src/$bin" "$out"
}

cargo build -p slots -p slotfork-test-helper
status=0
for t in "${targets[@]}"; do
  case "$t" in
    valkey) build valkey valkey 'valkey-8.1.1*' valkey-server ;;
    redis8) build redis8 redis 'redis-8.0.2*' redis-server ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  echo "compat: $("$compat/$t/server" --version)"
  SLOTS_MODULE="$root/target/debug/libslots.so" REDIS_SERVER="$compat/$t/server" \
    cargo test -p slotfork-tests -- --test-threads=4 || status=1
done
exit $status
