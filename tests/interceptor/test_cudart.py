"""NVIDIA's libcudart.so.13 on the fake driver, with the shim preloaded.

libcudart initialises through dlsym(cuGetProcAddress_v2) and cuGetProcAddress_v2, then asks
cuGetExportTable for private tables that no fake driver can provide, and gives up
(cudaErrorNotSupported here): no runtime-API kernel can run without a real driver. What is
checked is the part that decides coverage: every launch entry point libcudart obtained is
the shim's wrapper (SAIR_GPU_TRACE=1 logs each hand-out). That those wrappers throttle is
what test_throttle.py checks, through the same cuGetProcAddress_v2 path (proc_v2_ptsz,
ex_ptsz_proc, coop_ptsz_proc, graph_proc_ptsz).

CUDA comes from CUDA_HOME or /usr/local/cuda when present, else from the nvidia-cuda-runtime
and nvidia-cuda-crt wheels (about 2.5 MB, installed with pip or uv under
gpu_interceptor/build/cuda-wheel).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interceptor.support import BUILD, INTERCEPTOR, Build, shim_env

# libcudart.so.13 + cuda.h + cuda_runtime_api.h, and the crt/ headers the latter includes.
CUDA_WHEELS = ("nvidia-cuda-runtime==13.0.96", "nvidia-cuda-crt==13.0.88")


@dataclass(frozen=True)
class CudaRuntime:
    include: Path
    lib: Path


def _local_cuda() -> CudaRuntime | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not root:
            continue
        include = Path(root) / "include"
        for lib in (Path(root) / "lib64", Path(root) / "lib"):
            if (include / "cuda_runtime_api.h").is_file() and (lib / "libcudart.so.13").is_file():
                return CudaRuntime(include, lib)
    return None


def _installers(target: Path) -> list[list[str]]:
    """Ways to put the wheel's files under target: pip (this Python's or on PATH), uv."""
    pip_args = ["install", "--no-deps", "--target", str(target), *CUDA_WHEELS]
    found: list[list[str]] = [[sys.executable, "-m", "pip", *pip_args]]
    for tool in ("pip3", "pip"):
        path = shutil.which(tool)
        if path:
            found.append([path, *pip_args])
    uv = shutil.which("uv")
    if uv:
        found.append([uv, "pip", "install", "--python", sys.executable, *pip_args[1:]])
    return found


def _wheel_cuda(target: Path = BUILD / "cuda-wheel") -> CudaRuntime | str:
    """The CUDA runtime wheels, installed under build/; or why they could not be had."""
    found = CudaRuntime(target / "nvidia/cu13/include", target / "nvidia/cu13/lib")
    ready = found.include / "crt" / "host_defines.h"
    if ready.is_file() and (found.lib / "libcudart.so.13").is_file():
        return found
    errors = []
    for cmd in _installers(target):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{cmd[0]}: {e}")
            continue
        if ready.is_file() and (found.lib / "libcudart.so.13").is_file():
            return found
        errors.append(f"{' '.join(cmd[:3])}: {proc.stderr.strip()[-200:]}")
    return f"could not install {' '.join(CUDA_WHEELS)}: {'; '.join(errors)}"


@pytest.fixture(scope="module")
def cuda_runtime() -> CudaRuntime:
    local = _local_cuda()
    if local is not None:
        return local
    wheel = _wheel_cuda()
    if isinstance(wheel, str):
        pytest.skip(f"no CUDA runtime (no /usr/local/cuda, CUDA_HOME unset, {wheel})")
    return wheel


@pytest.fixture(scope="module")
def cudart_probe(interceptor_build: Build, cuda_runtime: CudaRuntime) -> Path:
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(INTERCEPTOR),
            "cudart-probe",
            f"CUDA_INCLUDE={cuda_runtime.include}",
            f"CUDA_LIB={cuda_runtime.lib}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return BUILD / "tests" / "cudart_probe"


def test_headers_agree_with_nvidia_cuda_h(cuda_runtime: CudaRuntime) -> None:
    """The shim's own cuda.h subset compiles against NVIDIA's cuda.h, as a program sees it
    and as the driver does (every ABI variant declared): same prototypes and types."""
    proc = subprocess.run(
        ["make", "-C", str(INTERCEPTOR), "check-cuda-h", f"CUDA_INCLUDE={cuda_runtime.include}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agree with" in proc.stdout


# (name, version, flags) libcudart 13.0 asks cuGetProcAddress_v2 for -> wrapper it must get.
EXPECTED_WRAPPERS = [
    ('dlsym("cuGetProcAddress_v2"', "cuGetProcAddress_v2"),
    ('cuGetProcAddress("cuGetProcAddress", version 12000, flags 0)', "cuGetProcAddress_v2"),
    ('cuGetProcAddress("cuLaunchKernel", version 4000, flags 0)', "cuLaunchKernel"),
    ('cuGetProcAddress("cuLaunchKernel", version 7000, flags 2)', "cuLaunchKernel_ptsz"),
    ('cuGetProcAddress("cuLaunchKernelEx", version 11060, flags 0)', "cuLaunchKernelEx"),
    ('cuGetProcAddress("cuLaunchKernelEx", version 11060, flags 2)', "cuLaunchKernelEx_ptsz"),
    (
        'cuGetProcAddress("cuLaunchCooperativeKernel", version 9000, flags 0)',
        "cuLaunchCooperativeKernel",
    ),
    (
        'cuGetProcAddress("cuLaunchCooperativeKernel", version 9000, flags 2)',
        "cuLaunchCooperativeKernel_ptsz",
    ),
    ('cuGetProcAddress("cuGraphLaunch", version 10000, flags 0)', "cuGraphLaunch"),
    ('cuGetProcAddress("cuGraphLaunch", version 10000, flags 2)', "cuGraphLaunch_ptsz"),
]


def test_libcudart_gets_the_shims_wrapper_for_every_launch_entry_point(
    interceptor_build: Build, cudart_probe: Path
) -> None:
    env = shim_env(interceptor_build, redis_url=None, extra={"SAIR_GPU_TRACE": "1"})
    proc = subprocess.run(
        [str(cudart_probe)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    trace = [line for line in proc.stderr.splitlines() if "trace:" in line]
    for lookup, wrapper in EXPECTED_WRAPPERS:
        hits = [line for line in trace if lookup in line]
        assert hits, f"libcudart never looked up {lookup}"
        assert all(line.endswith(f"-> {wrapper}") for line in hits), hits
    # libcudart got that far and then stopped at the export tables, as expected.
    assert report["runtime_version"] >= 13000
    assert report["driver_export_table_calls"] >= 1
    assert report["device_count_error"] != 0
    assert report["shim_wrapped_dlsym"] >= 1
    assert report["shim_wrapped_proc_address"] >= len(EXPECTED_WRAPPERS) - 1
