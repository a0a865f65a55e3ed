#!/usr/bin/env bash
# System packages the tests need beyond pip. Idempotent; safe to run on every CI start.
#   g++-aarch64-linux-gnu  cross-compiles the aarch64 host library of Jetson TVM bundles (rsp export
#                          --target jetson-*, arm64-cpu); tests that need it skip without it.
#   qemu-user              runs the arm64 build of rsp's CPU sparse kernels in the tests (skipped without it).
# (nvcc, for the sm_87 fatbin, comes with a CUDA toolkit and is not installed here.)
set -uo pipefail

need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v file >/dev/null 2>&1 || need+=(file)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)   # runs the arm64 CPU kernels' tests here

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/setup.sh: warning: apt-get not available; install ${need[*]} yourself (tests needing them skip)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "scripts/setup.sh: warning: not root and no sudo; install ${need[*]} yourself (tests needing them skip)" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    # package lists may be missing or stale on a fresh machine
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
        || echo "scripts/setup.sh: warning: could not install ${need[*]} (tests needing them skip)" >&2
fi
exit 0
