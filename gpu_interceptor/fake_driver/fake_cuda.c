/*
 * fake_cuda.c: a fake libcuda.so.1 for testing the interceptor without a GPU.
 *
 * Exports the driver entry points the shim hooks, a minimal graph API, cuGetProcAddress
 * (_v2) answering with its own functions like the real driver, cuGetExportTable (always an
 * error, as libcudart then gives up), and counters of what it saw (fake_cuda.h).
 *
 * Built twice by the Makefile:
 *   build/fake/libcuda.so.1          -Wl,-Bsymbolic: its cuGetProcAddress answers with its
 *                                    own functions, like the real driver;
 *   build/fake_nosym/libcuda.so.1    without -Bsymbolic: `&cuLaunchKernel` below resolves
 *                                    through the global scope, i.e. to the preloaded shim's
 *                                    wrapper: the recursion pitfall, kept as a regression test;
 *   build/fake_minimal/libcuda.so.1  -DFAKE_MINIMAL: no cuLaunchKernelEx(_ptsz), to test the
 *                                    shim's missing-entry-point path.
 *
 * Environment: FAKE_CUDA_KERNEL_US (busy time per kernel, default 0),
 *              FAKE_CUDA_DRIVER_VERSION (cuDriverGetVersion, default 13000).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fake_cuda.h"
#include "sair_cuda.h"

#define FAKE_EXPORT __attribute__((visibility("default")))

/* Graph model: a graph owns its nodes; an exec is a flattened kernel count. */
struct CUgraphNode_st {
    CUgraphNodeType type;
    CUgraph child; /* CU_GRAPH_NODE_TYPE_GRAPH: a copy owned by the node */
};
struct CUgraph_st {
    size_t n, cap;
    struct CUgraphNode_st **nodes;
};
struct CUgraphExec_st {
    uint64_t kernels;
};

/* All state of the fake driver. */
static struct {
    pthread_once_t once;                       /* guards init */
    int64_t kernel_ns;                         /* FAKE_CUDA_KERNEL_US, read once */
    int driver_version;                        /* FAKE_CUDA_DRIVER_VERSION, read once */
    _Atomic unsigned long long count[FAKE_COUNT_N]; /* what it saw; any thread adds */
} fk = {.once = PTHREAD_ONCE_INIT};

static void init(void)
{
    const char *us = getenv("FAKE_CUDA_KERNEL_US");
    fk.kernel_ns = us != NULL ? (int64_t)(atof(us) * 1000.0) : 0;
    const char *v = getenv("FAKE_CUDA_DRIVER_VERSION");
    fk.driver_version = v != NULL ? atoi(v) : 13000;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* "Run" one kernel: count it and spin for the configured kernel time. */
static void run_kernel(void)
{
    pthread_once(&fk.once, init);
    atomic_fetch_add_explicit(&fk.count[FAKE_COUNT_KERNELS], 1, memory_order_relaxed);
    if (fk.kernel_ns > 0) {
        int64_t until = now_ns() + fk.kernel_ns;
        while (now_ns() < until) {
        }
    }
}

static CUresult launch(enum fake_cuda_counter counter)
{
    atomic_fetch_add_explicit(&fk.count[counter], 1, memory_order_relaxed);
    run_kernel();
    return CUDA_SUCCESS;
}

FAKE_EXPORT unsigned long long fake_cuda_count(int counter)
{
    if (counter < 0 || counter >= FAKE_COUNT_N) {
        return 0;
    }
    return atomic_load(&fk.count[counter]);
}

FAKE_EXPORT void fake_cuda_reset(void)
{
    for (int i = 0; i < FAKE_COUNT_N; i++) {
        atomic_store(&fk.count[i], 0);
    }
}

FAKE_EXPORT CUresult cuInit(unsigned int Flags)
{
    (void)Flags;
    pthread_once(&fk.once, init);
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuDriverGetVersion(int *driverVersion)
{
    pthread_once(&fk.once, init);
    if (driverVersion == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *driverVersion = fk.driver_version;
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGetExportTable(const void **ppExportTable, const CUuuid *pExportTableId)
{
    (void)pExportTableId;
    atomic_fetch_add(&fk.count[FAKE_COUNT_EXPORT_TABLE], 1);
    if (ppExportTable != NULL) {
        *ppExportTable = NULL;
    }
    return CUDA_ERROR_NOT_SUPPORTED;
}

/* ---- launches ---- */

FAKE_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                    unsigned int gridDimZ, unsigned int blockDimX,
                                    unsigned int blockDimY, unsigned int blockDimZ,
                                    unsigned int sharedMemBytes, CUstream hStream,
                                    void **kernelParams, void **extra)
{
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams, (void)extra;
    return launch(FAKE_COUNT_KERNEL);
}

FAKE_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                         unsigned int gridDimY, unsigned int gridDimZ,
                                         unsigned int blockDimX, unsigned int blockDimY,
                                         unsigned int blockDimZ, unsigned int sharedMemBytes,
                                         CUstream hStream, void **kernelParams, void **extra)
{
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams, (void)extra;
    return launch(FAKE_COUNT_KERNEL_PTSZ);
}

#ifndef FAKE_MINIMAL
FAKE_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                      void **kernelParams, void **extra)
{
    (void)f, (void)kernelParams, (void)extra;
    if (config == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    return launch(FAKE_COUNT_EX);
}

FAKE_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                           void **kernelParams, void **extra)
{
    (void)f, (void)kernelParams, (void)extra;
    if (config == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    return launch(FAKE_COUNT_EX_PTSZ);
}
#endif

FAKE_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX,
                                               unsigned int gridDimY, unsigned int gridDimZ,
                                               unsigned int blockDimX, unsigned int blockDimY,
                                               unsigned int blockDimZ,
                                               unsigned int sharedMemBytes, CUstream hStream,
                                               void **kernelParams)
{
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams;
    return launch(FAKE_COUNT_COOP);
}

FAKE_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                                    unsigned int gridDimY,
                                                    unsigned int gridDimZ,
                                                    unsigned int blockDimX,
                                                    unsigned int blockDimY,
                                                    unsigned int blockDimZ,
                                                    unsigned int sharedMemBytes,
                                                    CUstream hStream, void **kernelParams)
{
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams;
    return launch(FAKE_COUNT_COOP_PTSZ);
}

/* ---- graphs ---- */

static CUresult add_node(CUgraphNode *out, CUgraph g, CUgraphNodeType type, CUgraph child)
{
    if (out == NULL || g == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 8;
        struct CUgraphNode_st **nodes = realloc(g->nodes, cap * sizeof(*nodes));
        if (nodes == NULL) {
            return CUDA_ERROR_UNKNOWN;
        }
        g->nodes = nodes;
        g->cap = cap;
    }
    struct CUgraphNode_st *node = calloc(1, sizeof(*node));
    if (node == NULL) {
        return CUDA_ERROR_UNKNOWN;
    }
    node->type = type;
    node->child = child;
    g->nodes[g->n++] = node;
    *out = node;
    return CUDA_SUCCESS;
}

static CUgraph graph_clone(CUgraph g);

FAKE_EXPORT CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags)
{
    (void)flags;
    if (phGraph == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *phGraph = calloc(1, sizeof(**phGraph));
    return *phGraph ? CUDA_SUCCESS : CUDA_ERROR_UNKNOWN;
}

FAKE_EXPORT CUresult cuGraphDestroy(CUgraph hGraph)
{
    if (hGraph == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (size_t i = 0; i < hGraph->n; i++) {
        if (hGraph->nodes[i]->child != NULL) {
            cuGraphDestroy(hGraph->nodes[i]->child);
        }
        free(hGraph->nodes[i]);
    }
    free(hGraph->nodes);
    free(hGraph);
    return CUDA_SUCCESS;
}

static CUgraph graph_clone(CUgraph g)
{
    CUgraph copy = NULL;
    if (cuGraphCreate(&copy, 0) != CUDA_SUCCESS) {
        return NULL;
    }
    for (size_t i = 0; i < g->n; i++) {
        CUgraphNode node;
        CUgraph child = g->nodes[i]->child ? graph_clone(g->nodes[i]->child) : NULL;
        add_node(&node, copy, g->nodes[i]->type, child);
    }
    return copy;
}

FAKE_EXPORT CUresult cuGraphAddKernelNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                                          const CUgraphNode *dependencies,
                                          size_t numDependencies,
                                          const CUDA_KERNEL_NODE_PARAMS_v1 *nodeParams)
{
    (void)dependencies, (void)numDependencies;
    if (nodeParams == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    return add_node(phGraphNode, hGraph, CU_GRAPH_NODE_TYPE_KERNEL, NULL);
}

FAKE_EXPORT CUresult cuGraphAddKernelNode_v2(CUgraphNode *phGraphNode, CUgraph hGraph,
                                             const CUgraphNode *dependencies,
                                             size_t numDependencies,
                                             const CUDA_KERNEL_NODE_PARAMS_v2 *nodeParams)
{
    (void)dependencies, (void)numDependencies;
    if (nodeParams == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    return add_node(phGraphNode, hGraph, CU_GRAPH_NODE_TYPE_KERNEL, NULL);
}

FAKE_EXPORT CUresult cuGraphAddEmptyNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                                         const CUgraphNode *dependencies,
                                         size_t numDependencies)
{
    (void)dependencies, (void)numDependencies;
    return add_node(phGraphNode, hGraph, CU_GRAPH_NODE_TYPE_EMPTY, NULL);
}

FAKE_EXPORT CUresult cuGraphAddChildGraphNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                                              const CUgraphNode *dependencies,
                                              size_t numDependencies, CUgraph childGraph)
{
    (void)dependencies, (void)numDependencies;
    if (childGraph == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUgraph copy = graph_clone(childGraph); /* like CUDA: the node owns a clone */
    return copy ? add_node(phGraphNode, hGraph, CU_GRAPH_NODE_TYPE_GRAPH, copy)
                : CUDA_ERROR_UNKNOWN;
}

FAKE_EXPORT CUresult cuGraphChildGraphNodeGetGraph(CUgraphNode hNode, CUgraph *phGraph)
{
    if (hNode == NULL || phGraph == NULL || hNode->type != CU_GRAPH_NODE_TYPE_GRAPH) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *phGraph = hNode->child;
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGraphGetNodes(CUgraph hGraph, CUgraphNode *nodes, size_t *numNodes)
{
    if (hGraph == NULL || numNodes == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (nodes != NULL) {
        size_t n = *numNodes < hGraph->n ? *numNodes : hGraph->n;
        for (size_t i = 0; i < n; i++) {
            nodes[i] = hGraph->nodes[i];
        }
        *numNodes = n;
    } else {
        *numNodes = hGraph->n;
    }
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGraphNodeGetType(CUgraphNode hNode, CUgraphNodeType *type)
{
    if (hNode == NULL || type == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *type = hNode->type;
    return CUDA_SUCCESS;
}

static uint64_t kernels_in(CUgraph g)
{
    uint64_t n = 0;
    for (size_t i = 0; i < g->n; i++) {
        if (g->nodes[i]->type == CU_GRAPH_NODE_TYPE_KERNEL) {
            n++;
        } else if (g->nodes[i]->type == CU_GRAPH_NODE_TYPE_GRAPH) {
            n += kernels_in(g->nodes[i]->child);
        }
    }
    return n;
}

static CUresult instantiate(CUgraphExec *out, CUgraph g)
{
    if (out == NULL || g == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUgraphExec e = calloc(1, sizeof(*e));
    if (e == NULL) {
        return CUDA_ERROR_UNKNOWN;
    }
    e->kernels = kernels_in(g);
    *out = e;
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGraphInstantiate(CUgraphExec *phGraphExec, CUgraph hGraph,
                                        CUgraphNode *phErrorNode, char *logBuffer,
                                        size_t bufferSize)
{
    (void)phErrorNode, (void)logBuffer, (void)bufferSize;
    return instantiate(phGraphExec, hGraph);
}

FAKE_EXPORT CUresult cuGraphInstantiate_v2(CUgraphExec *phGraphExec, CUgraph hGraph,
                                           CUgraphNode *phErrorNode, char *logBuffer,
                                           size_t bufferSize)
{
    (void)phErrorNode, (void)logBuffer, (void)bufferSize;
    return instantiate(phGraphExec, hGraph);
}

FAKE_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph,
                                                 unsigned long long flags)
{
    (void)flags;
    return instantiate(phGraphExec, hGraph);
}

FAKE_EXPORT CUresult cuGraphInstantiateWithParams(CUgraphExec *phGraphExec, CUgraph hGraph,
                                                  CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams)
{
    CUresult r = instantiate(phGraphExec, hGraph);
    if (instantiateParams != NULL) {
        instantiateParams->result_out =
            r == CUDA_SUCCESS ? CUDA_GRAPH_INSTANTIATE_SUCCESS : CUDA_GRAPH_INSTANTIATE_ERROR;
    }
    return r;
}

FAKE_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(
    CUgraphExec *phGraphExec, CUgraph hGraph, CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams)
{
    return cuGraphInstantiateWithParams(phGraphExec, hGraph, instantiateParams);
}

FAKE_EXPORT CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
{
    if (hGraphExec == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    free(hGraphExec);
    return CUDA_SUCCESS;
}

static CUresult graph_launch(CUgraphExec e, enum fake_cuda_counter counter)
{
    if (e == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    atomic_fetch_add_explicit(&fk.count[counter], 1, memory_order_relaxed);
    for (uint64_t i = 0; i < e->kernels; i++) {
        atomic_fetch_add_explicit(&fk.count[FAKE_COUNT_GRAPH_KERNELS], 1, memory_order_relaxed);
        run_kernel();
    }
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    (void)hStream;
    return graph_launch(hGraphExec, FAKE_COUNT_GRAPH);
}

FAKE_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    (void)hStream;
    return graph_launch(hGraphExec, FAKE_COUNT_GRAPH_PTSZ);
}

/* ---- cuGetProcAddress: the driver's own lookup table ---- */

struct fake_proc {
    const char *name;
    int min_version;
    bool ptsz;
    void *fn; /* `&function`: without -Bsymbolic this resolves via the global scope */
};

static const struct fake_proc fake_procs[] = {
    {"cuInit", 2000, false, (void *)&cuInit},
    {"cuDriverGetVersion", 2020, false, (void *)&cuDriverGetVersion},
    {"cuGetExportTable", 3000, false, (void *)&cuGetExportTable},
    {"cuGetProcAddress", 11030, false, (void *)&cuGetProcAddress},
    {"cuGetProcAddress", 12000, false, (void *)&cuGetProcAddress_v2},
    {"cuLaunchKernel", 4000, false, (void *)&cuLaunchKernel},
    {"cuLaunchKernel", 7000, true, (void *)&cuLaunchKernel_ptsz},
#ifndef FAKE_MINIMAL
    {"cuLaunchKernelEx", 11060, false, (void *)&cuLaunchKernelEx},
    {"cuLaunchKernelEx", 11060, true, (void *)&cuLaunchKernelEx_ptsz},
#endif
    {"cuLaunchCooperativeKernel", 9000, false, (void *)&cuLaunchCooperativeKernel},
    {"cuLaunchCooperativeKernel", 9000, true, (void *)&cuLaunchCooperativeKernel_ptsz},
    {"cuGraphCreate", 10000, false, (void *)&cuGraphCreate},
    {"cuGraphDestroy", 10000, false, (void *)&cuGraphDestroy},
    {"cuGraphAddKernelNode", 10000, false, (void *)&cuGraphAddKernelNode},
    {"cuGraphAddKernelNode", 12000, false, (void *)&cuGraphAddKernelNode_v2},
    {"cuGraphAddEmptyNode", 10000, false, (void *)&cuGraphAddEmptyNode},
    {"cuGraphAddChildGraphNode", 10000, false, (void *)&cuGraphAddChildGraphNode},
    {"cuGraphChildGraphNodeGetGraph", 10000, false, (void *)&cuGraphChildGraphNodeGetGraph},
    {"cuGraphGetNodes", 10000, false, (void *)&cuGraphGetNodes},
    {"cuGraphNodeGetType", 10000, false, (void *)&cuGraphNodeGetType},
    {"cuGraphInstantiate", 10000, false, (void *)&cuGraphInstantiate},
    {"cuGraphInstantiate", 11000, false, (void *)&cuGraphInstantiate_v2},
    {"cuGraphInstantiate", 12000, false, (void *)&cuGraphInstantiateWithFlags},
    {"cuGraphInstantiateWithFlags", 11040, false, (void *)&cuGraphInstantiateWithFlags},
    {"cuGraphInstantiateWithParams", 12000, false, (void *)&cuGraphInstantiateWithParams},
    {"cuGraphInstantiateWithParams", 12000, true, (void *)&cuGraphInstantiateWithParams_ptsz},
    {"cuGraphExecDestroy", 10000, false, (void *)&cuGraphExecDestroy},
    {"cuGraphLaunch", 10000, false, (void *)&cuGraphLaunch},
    {"cuGraphLaunch", 10000, true, (void *)&cuGraphLaunch_ptsz},
};

static CUresult lookup(const char *symbol, void **pfn, int version, cuuint64_t flags,
                       CUdriverProcAddressQueryResult *status)
{
    atomic_fetch_add(&fk.count[FAKE_COUNT_PROC_LOOKUPS], 1);
    if (symbol == NULL || pfn == NULL) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    bool want_ptsz = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    const struct fake_proc *best = NULL;
    bool known = false;
    for (size_t i = 0; i < sizeof(fake_procs) / sizeof(fake_procs[0]); i++) {
        const struct fake_proc *p = &fake_procs[i];
        if (strcmp(p->name, symbol) != 0) {
            continue;
        }
        known = true;
        if (p->min_version > version) {
            continue;
        }
        if (best == NULL || (p->ptsz == want_ptsz && best->ptsz != want_ptsz) ||
            (p->ptsz == best->ptsz && p->min_version > best->min_version)) {
            best = p;
        }
    }
    *pfn = best ? best->fn : NULL;
    if (status != NULL) {
        *status = best    ? CU_GET_PROC_ADDRESS_SUCCESS
                  : known ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
                          : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    }
    if (best == NULL) {
        return CUDA_ERROR_NOT_FOUND;
    }
    atomic_fetch_add(&fk.count[FAKE_COUNT_PROC_FOUND], 1);
    return CUDA_SUCCESS;
}

FAKE_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                      cuuint64_t flags)
{
    return lookup(symbol, pfn, cudaVersion, flags, NULL);
}

FAKE_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                         cuuint64_t flags,
                                         CUdriverProcAddressQueryResult *symbolStatus)
{
    return lookup(symbol, pfn, cudaVersion, flags, symbolStatus);
}
