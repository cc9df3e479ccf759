#!/usr/bin/env bash
# Installs what slotfork needs on a Debian machine, only where it is missing:
# redis-server (the server the module loads into and the tests start),
# libclang (bindgen, used by the redis-module crate), valgrind (leak check),
# and what building redis-server from Debian's source needs.
# Safe to run again; it does nothing when everything is there.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# Building redis-server from source (scripts/build-redis.sh, leak-check.sh).
command -v make >/dev/null 2>&1 || need+=(make)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v patch >/dev/null 2>&1 || need+=(patch)
command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)

if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # Debian starts a system redis-server on 6379 after installing it; the
  # project never uses it, so do not leave it running.
  if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
