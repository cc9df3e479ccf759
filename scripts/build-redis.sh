#!/usr/bin/env bash
# Builds a stock and a patched (async fork) redis-server 7.0.15 from the same
# source tree with the same flags:
#   .build/redis/stock/redis-server     unmodified
#   .build/redis/patched/redis-server   forkpatch/patches/redis-7.0.15.patch
#                                       + c-shim/ + libforkpatch.a
# (redis-cli and redis-benchmark are copied next to the stock server, and
# Redis' own fork test module to .build/redis/modules/fork.so.)
#
# Source, in this order:
#   REDIS_SRC_DIR=/path/to/redis-7.0.15   an unpacked tree (copied, not modified)
#   REDIS_TARBALL=/path/to/redis-7.0.15.tar.gz
#   otherwise `apt-get source redis` from Debian bookworm (adds a deb-src
#   entry if missing; needs root or sudo).
# MAKE_JOBS (default 1) sets make -j; builds run under nice -n 19.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
ver=7.0.15
out="$root/.build/redis"
jobs="${MAKE_JOBS:-1}"
src="$out/src"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

fetch() {
  rm -rf "$src" "$out/fetch"
  mkdir -p "$out/fetch"
  if [ -n "${REDIS_SRC_DIR:-}" ]; then
    cp -a "$REDIS_SRC_DIR" "$src"
  elif [ -n "${REDIS_TARBALL:-}" ]; then
    tar -xf "$REDIS_TARBALL" -C "$out/fetch"
    mv "$out/fetch"/redis-*/ "$src"
  else
    local list=/etc/apt/sources.list.d/slotfork-src.sources
    if ! grep -qs "deb-src" "$list"; then
      printf '%s\n' "Types: deb-src" "URIs: http://deb.debian.org/debian" \
        "Suites: bookworm" "Components: main" \
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" | $SUDO tee "$list" >/dev/null
    fi
    $SUDO apt-get update -qq
    command -v dpkg-source >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dpkg-dev
    (cd "$out/fetch" && apt-get source -qq "redis")
    mv "$out/fetch/redis-$ver" "$src"
  fi
  rm -rf "$out/fetch"
}

[ -f "$src/src/server.c" ] || fetch
if ! grep -q "REDIS_VERSION \"$ver\"" "$src/src/version.h"; then
  echo "build-redis: $src is not Redis $ver" >&2
  exit 1
fi

# Debian's tree carries 0004-Add-support-for-USE_SYSTEM_JEMALLOC-flag, whose
# `#if ... (USE_SYSTEM_JEMALLOC == yes)` is true when the flag is unset (both
# sides are undefined, hence 0), which breaks a build with the bundled
# jemalloc that both flavours use. Revert it (once) in the pristine copy.
deb4="$src/debian/patches/0004-Add-support-for-USE_SYSTEM_JEMALLOC-flag.patch"
if [ -f "$deb4" ] && [ ! -f "$src/.slotfork-reverted-0004" ]; then
  if patch -R -p1 -d "$src" --dry-run --quiet <"$deb4" >/dev/null 2>&1; then
    patch -R -p1 -d "$src" --quiet <"$deb4"
  fi
  touch "$src/.slotfork-reverted-0004"
fi

# Same flags for both builds; Redis' defaults otherwise (bundled jemalloc).
flags=(MALLOC=jemalloc BUILD_TLS=no USE_SYSTEMD=no)

prepare() { # flavour; a tree is re-made when the patch changes
  local t="$out/tree-$1" stamp=pristine
  [ "$1" = stock ] || stamp=$(sha256sum <"$root/forkpatch/patches/redis-$ver.patch")
  if [ "$(cat "$t/.prepared" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$t"
    cp -a "$src" "$t"
    if [ "$1" = patched ]; then
      patch -p1 -d "$t" --quiet <"$root/forkpatch/patches/redis-$ver.patch"
    fi
    echo "$stamp" >"$t/.prepared"
  fi
}

prepare stock
prepare patched

echo "build-redis: libforkpatch.a"
CARGO_BUILD_JOBS="$jobs" nice -n 19 cargo build --release -p forkpatch --lib
lib="$root/target/release/libforkpatch.a"
cp "$root/c-shim/forkpatch_shim.c" "$root/c-shim/forkpatch_shim.h" \
  "$root/forkpatch/include/forkpatch.h" "$out/tree-patched/src/"

echo "build-redis: stock redis-server"
nice -n 19 make -C "$out/tree-stock" -j"$jobs" "${flags[@]}" >"$out/stock-build.log" 2>&1 ||
  { tail -30 "$out/stock-build.log"; exit 1; }
rm -f "$out/tree-patched/src/redis-server" # relink against a rebuilt libforkpatch.a
echo "build-redis: patched redis-server"
nice -n 19 make -C "$out/tree-patched" -j"$jobs" "${flags[@]}" FORKPATCH_LIB="$lib" \
  >"$out/patched-build.log" 2>&1 || { tail -30 "$out/patched-build.log"; exit 1; }

echo "build-redis: test module fork.so (RedisModule_Fork)"
nice -n 19 make -C "$out/tree-patched/tests/modules" fork.so >>"$out/patched-build.log" 2>&1 ||
  { tail -30 "$out/patched-build.log"; exit 1; }

mkdir -p "$out/stock" "$out/patched" "$out/modules"
install -m 755 "$out/tree-patched/tests/modules/fork.so" "$out/modules/fork.so"
install -m 755 "$out/tree-stock/src/redis-server" "$out/stock/redis-server"
install -m 755 "$out/tree-stock/src/redis-cli" "$out/stock/redis-cli"
install -m 755 "$out/tree-stock/src/redis-benchmark" "$out/stock/redis-benchmark"
install -m 755 "$out/tree-patched/src/redis-server" "$out/patched/redis-server"
echo "build-redis: $out/stock/redis-server $out/patched/redis-server"
