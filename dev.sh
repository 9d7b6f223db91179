#!/usr/bin/env bash
# SAIR developer entry point. On a fresh Debian machine with Python >= 3.11, pip and root:
#   ./dev.sh up     set everything up, then run `sair up` (the embedded default)
#   ./dev.sh test   set everything up, then lint, type-check and run the test suite
#   ./dev.sh setup  only set up: system packages, uv, the locked .venv, the C interceptor
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '==> %s\n' "$*" >&2; }

need_apt=()
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need_apt+=(make)
[ -f /usr/include/hiredis/hiredis.h ] || need_apt+=(libhiredis-dev)

install_system_packages() {
  [ ${#need_apt[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "missing system packages: ${need_apt[*]} (run as root or install them: apt-get install ${need_apt[*]})"
    exit 1
  fi
  log "installing system packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
}

find_python() {
  for py in python3.11 python3.12 python3.13 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  log "Python >= 3.11 is required"
  exit 1
}

ensure_uv() {
  if command -v uv >/dev/null 2>&1; then UV=(uv); return 0; fi
  local py; py=$(find_python)
  if "$py" -m uv --version >/dev/null 2>&1; then UV=("$py" -m uv); return 0; fi
  log "installing uv with pip"
  # A system Python wants --user (Debian: and --break-system-packages); a venv wants neither.
  "$py" -m pip install --quiet --user uv 2>/dev/null ||
    "$py" -m pip install --quiet --user --break-system-packages uv 2>/dev/null ||
    "$py" -m pip install --quiet uv
  UV=("$py" -m uv)
}

setup() {
  install_system_packages
  ensure_uv
  local py; py=$(find_python)
  log "syncing .venv from uv.lock"
  # --inexact keeps an optional torch (installed below, or by the user) across syncs.
  UV_PYTHON_DOWNLOADS=never "${UV[@]}" sync --frozen --inexact --python "$py" --quiet
  if [ -f gpu_interceptor/Makefile ]; then
    log "building gpu_interceptor"
    make -s -C gpu_interceptor
  fi
}

# torch is optional (the GPU stage's real models). Where a CPU wheel lies on disk
# (SAIR_TORCH_WHEEL, or /opt/wheels), the tests install it so the torch path is exercised;
# elsewhere those tests skip and everything else runs.
install_cpu_torch() {
  .venv/bin/python -c 'import torch' >/dev/null 2>&1 && return 0
  local wheel=${SAIR_TORCH_WHEEL:-}
  if [ -z "$wheel" ]; then
    wheel=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)
  fi
  [ -n "$wheel" ] && [ -f "$wheel" ] || { log "no CPU torch wheel on disk: torch model tests skip"; return 0; }
  log "installing CPU torch for the model tests: $wheel"
  "${UV[@]}" pip install --quiet --python .venv/bin/python "$wheel" ||
    log "could not install $wheel: torch model tests skip"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup)
    setup
    ;;
  up)
    setup
    exec .venv/bin/sair up "$@"
    ;;
  test)
    setup
    install_cpu_torch
    log "ruff"
    .venv/bin/ruff check .
    log "mypy"
    .venv/bin/mypy
    log "pytest"
    exec .venv/bin/pytest "$@"
    ;;
  *)
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
