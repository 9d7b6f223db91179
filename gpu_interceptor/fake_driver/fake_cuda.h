/*
 * fake_cuda.h: what the fake libcuda.so.1 exports beyond the driver API, for tests.
 *
 *   unsigned long long fake_cuda_count(int counter);  // FAKE_COUNT_* below
 *   void fake_cuda_reset(void);
 *
 * Look them up with dlsym on the driver's handle (names do not start with "cu", so the
 * shim's dlsym passes them through).
 */
#ifndef FAKE_CUDA_H
#define FAKE_CUDA_H

enum fake_cuda_counter {
    FAKE_COUNT_KERNEL = 0,     /* cuLaunchKernel */
    FAKE_COUNT_KERNEL_PTSZ,    /* cuLaunchKernel_ptsz */
    FAKE_COUNT_EX,             /* cuLaunchKernelEx */
    FAKE_COUNT_EX_PTSZ,        /* cuLaunchKernelEx_ptsz */
    FAKE_COUNT_COOP,           /* cuLaunchCooperativeKernel */
    FAKE_COUNT_COOP_PTSZ,      /* cuLaunchCooperativeKernel_ptsz */
    FAKE_COUNT_GRAPH,          /* cuGraphLaunch */
    FAKE_COUNT_GRAPH_PTSZ,     /* cuGraphLaunch_ptsz */
    FAKE_COUNT_GRAPH_KERNELS,  /* kernels run by graph launches */
    FAKE_COUNT_KERNELS,        /* every kernel run, whatever the path */
    FAKE_COUNT_PROC_LOOKUPS,   /* cuGetProcAddress(_v2) calls */
    FAKE_COUNT_PROC_FOUND,     /* ... that found the symbol */
    FAKE_COUNT_EXPORT_TABLE,   /* cuGetExportTable calls */
    FAKE_COUNT_N
};

typedef unsigned long long (*fake_cuda_count_fn)(int counter);
typedef void (*fake_cuda_reset_fn)(void);

#endif /* FAKE_CUDA_H */
