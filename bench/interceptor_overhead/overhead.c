/*
 * overhead: time N back-to-back cuLaunchKernel calls on the fake driver (0 kernel time) and
 * print {"launches": N, "ns_per_launch": x, "shim": bool} as one JSON line.
 *
 *   overhead [N] [ROUNDS]   best (lowest) ns/launch of ROUNDS rounds of N launches
 *
 * Run by bench/interceptor_overhead/run.py with and without LD_PRELOAD=libsair_intercept.so.
 * The launches go through the pointer cuGetProcAddress_v2 hands out with flag 2 (the
 * per-thread-stream variant, what libcudart calls), so the shim's wrapper is on the path.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "sair_cuda.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    long long n = argc > 1 ? atoll(argv[1]) : 2000000;
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    if (n <= 0 || rounds <= 0) {
        fprintf(stderr, "usage: overhead [N>0] [ROUNDS>0]\n");
        return 2;
    }
    if (cuInit(0) != CUDA_SUCCESS) {
        fprintf(stderr, "cuInit failed\n");
        return 1;
    }
    void *fn = NULL;
    CUdriverProcAddressQueryResult status;
    if (cuGetProcAddress_v2("cuLaunchKernel", &fn, 12000,
                            CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM,
                            &status) != CUDA_SUCCESS || fn == NULL) {
        fprintf(stderr, "cuGetProcAddress_v2(cuLaunchKernel) failed\n");
        return 1;
    }
    sair_pfn_cuLaunchKernel launch = (sair_pfn_cuLaunchKernel)fn;
    /* Warm-up: the shim's first launch starts its refill thread and waits for tokens. */
    for (int i = 0; i < 10000; i++) {
        launch(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
    }
    double best = 1e30;
    long long errors = 0;
    for (int r = 0; r < rounds; r++) {
        double t0 = now_s();
        for (long long i = 0; i < n; i++) {
            errors += launch(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL) != CUDA_SUCCESS;
        }
        double ns = (now_s() - t0) * 1e9 / (double)n;
        if (ns < best) {
            best = ns;
        }
    }
    int shim = dlsym(RTLD_DEFAULT, "sair_intercept_stats") != NULL;
    printf("{\"launches\": %lld, \"rounds\": %d, \"ns_per_launch\": %.2f, \"errors\": %lld, "
           "\"shim\": %s}\n",
           n, rounds, best, errors, shim ? "true" : "false");
    return errors == 0 ? 0 : 1;
}
