/*
 * cudart_probe: a runtime-API program (built against NVIDIA's libcudart.so.13) run on the
 * fake driver. libcudart initialises through cuGetProcAddress_v2 and then stops at
 * cuGetExportTable (private tables a fake driver cannot provide), so no kernel runs; what
 * this shows is which pointers libcudart got for the launch entry points: with
 * SAIR_GPU_TRACE=1 the shim logs each one it replaced by its wrapper.
 *
 * Prints one JSON line: the runtime's error codes, the fake driver's counters and the
 * shim's (when preloaded).
 *
 * Build: make -C gpu_interceptor cudart-probe CUDA_INCLUDE=... CUDA_LIB=...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

#include <cuda_runtime_api.h>

#include "fake_cuda.h"
#include "sair_intercept.h"

int main(void)
{
    int devices = -1;
    cudaError_t count_err = cudaGetDeviceCount(&devices);
    int runtime_version = 0;
    cudaRuntimeGetVersion(&runtime_version);

    void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    fake_cuda_count_fn count =
        driver ? (fake_cuda_count_fn)dlsym(driver, "fake_cuda_count") : NULL;
    int (*stats_fn)(struct sair_intercept_stats *) =
        (int (*)(struct sair_intercept_stats *))dlsym(RTLD_DEFAULT, "sair_intercept_stats");
    struct sair_intercept_stats s = {0};
    int have_stats = stats_fn != NULL && stats_fn(&s) == 0;

    printf("{\"runtime_version\": %d, \"device_count_error\": %d, \"device_count_error_name\": "
           "\"%s\", \"driver_loaded\": %s, \"driver_proc_lookups\": %llu, "
           "\"driver_proc_found\": %llu, \"driver_export_table_calls\": %llu, "
           "\"shim_wrapped_proc_address\": %lld, \"shim_wrapped_dlsym\": %lld}\n",
           runtime_version, (int)count_err, cudaGetErrorName(count_err),
           driver ? "true" : "false", count ? count(FAKE_COUNT_PROC_LOOKUPS) : 0ULL,
           count ? count(FAKE_COUNT_PROC_FOUND) : 0ULL,
           count ? count(FAKE_COUNT_EXPORT_TABLE) : 0ULL,
           have_stats ? (long long)s.wrapped_proc_address : -1LL,
           have_stats ? (long long)s.wrapped_dlsym : -1LL);
    return 0;
}
