/*
 * sair_cuda.h: the subset of the CUDA driver API (cuda.h, CUDA 13.0) that the SAIR
 * interceptor and its fake driver use, so that neither needs the CUDA headers to build.
 *
 * Names, values and layouts are the ones of cuda.h; `make check-cuda-h` compiles this
 * file's prototypes against the real cuda.h (when one is found) so that any drift is a
 * compile error ("conflicting types for ...").
 *
 * With SAIR_USE_REAL_CUDA_H defined (and the CUDA include directory on the path), this
 * file includes the real <cuda.h>, undoes its renaming macros and declares the ABI symbols
 * itself, so the compiler checks every prototype and typedef below against NVIDIA's.
 *
 * Every ABI symbol is declared under its own name: the interceptor must define
 * cuGetProcAddress (4 arguments) and cuGetProcAddress_v2 (5 arguments), cuLaunchKernel and
 * cuLaunchKernel_ptsz, ... which cuda.h hides behind macros.
 */
#ifndef SAIR_CUDA_H
#define SAIR_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifndef SAIR_USE_REAL_CUDA_H

typedef uint64_t cuuint64_t;
typedef int CUdevice;

typedef struct CUctx_st *CUcontext;
typedef struct CUfunc_st *CUfunction;
typedef struct CUkern_st *CUkernel;
typedef struct CUstream_st *CUstream;
typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphNode_st *CUgraphNode;
typedef struct CUgraphExec_st *CUgraphExec;
typedef struct CUuuid_st {
    char bytes[16];
} CUuuid;

typedef enum cudaError_enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999
} CUresult;

typedef enum CUdriverProcAddressQueryResult_enum {
    CU_GET_PROC_ADDRESS_SUCCESS = 0,
    CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1,
    CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT = 2
} CUdriverProcAddressQueryResult;

typedef enum CUdriverProcAddress_flags_enum {
    CU_GET_PROC_ADDRESS_DEFAULT = 0,
    CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1 << 0,
    CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM = 1 << 1
} CUdriverProcAddress_flags;

typedef enum CUgraphNodeType_enum {
    CU_GRAPH_NODE_TYPE_KERNEL = 0,
    CU_GRAPH_NODE_TYPE_GRAPH = 4,
    CU_GRAPH_NODE_TYPE_EMPTY = 5,
    CU_GRAPH_NODE_TYPE_CONDITIONAL = 13
} CUgraphNodeType;

typedef enum CUgraphInstantiateResult_enum {
    CUDA_GRAPH_INSTANTIATE_SUCCESS = 0,
    CUDA_GRAPH_INSTANTIATE_ERROR = 1
} CUgraphInstantiateResult;

/* Opaque here: neither the shim nor the fake driver reads launch attributes. */
typedef struct CUlaunchAttribute_st CUlaunchAttribute;

typedef struct CUlaunchConfig_st {
    unsigned int gridDimX;
    unsigned int gridDimY;
    unsigned int gridDimZ;
    unsigned int blockDimX;
    unsigned int blockDimY;
    unsigned int blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    CUlaunchAttribute *attrs;
    unsigned int numAttrs;
} CUlaunchConfig;

typedef struct CUDA_KERNEL_NODE_PARAMS_st {
    CUfunction func;
    unsigned int gridDimX;
    unsigned int gridDimY;
    unsigned int gridDimZ;
    unsigned int blockDimX;
    unsigned int blockDimY;
    unsigned int blockDimZ;
    unsigned int sharedMemBytes;
    void **kernelParams;
    void **extra;
} CUDA_KERNEL_NODE_PARAMS_v1;

typedef struct CUDA_KERNEL_NODE_PARAMS_v2_st {
    CUfunction func;
    unsigned int gridDimX;
    unsigned int gridDimY;
    unsigned int gridDimZ;
    unsigned int blockDimX;
    unsigned int blockDimY;
    unsigned int blockDimZ;
    unsigned int sharedMemBytes;
    void **kernelParams;
    void **extra;
    CUkernel kern;
    CUcontext ctx;
} CUDA_KERNEL_NODE_PARAMS_v2;

typedef struct CUDA_GRAPH_INSTANTIATE_PARAMS_st {
    cuuint64_t flags;
    CUstream hUploadStream;
    CUgraphNode hErrNode_out;
    CUgraphInstantiateResult result_out;
} CUDA_GRAPH_INSTANTIATE_PARAMS;

#else /* SAIR_USE_REAL_CUDA_H: undo cuda.h's renaming so every ABI name is itself. */

#include <cuda.h>

#undef cuGetProcAddress
#undef cuGetProcAddress_v2
#undef cuLaunchKernel
#undef cuLaunchKernelEx
#undef cuLaunchCooperativeKernel
#undef cuGraphLaunch
#undef cuGraphInstantiate
#undef cuGraphInstantiateWithParams
#undef cuGraphAddKernelNode

#endif /* SAIR_USE_REAL_CUDA_H */

/* ---- function pointer types, one per ABI symbol (cudaTypedefs.h names in comments) ---- */

/* PFN_cuGetProcAddress_v11030 */
typedef CUresult (*sair_pfn_cuGetProcAddress)(const char *symbol, void **pfn, int cudaVersion,
                                              cuuint64_t flags);
/* PFN_cuGetProcAddress_v12000 */
typedef CUresult (*sair_pfn_cuGetProcAddress_v2)(const char *symbol, void **pfn,
                                                 int cudaVersion, cuuint64_t flags,
                                                 CUdriverProcAddressQueryResult *symbolStatus);
/* PFN_cuLaunchKernel_v4000, PFN_cuLaunchKernel_v7000_ptsz */
typedef CUresult (*sair_pfn_cuLaunchKernel)(CUfunction f, unsigned int gridDimX,
                                            unsigned int gridDimY, unsigned int gridDimZ,
                                            unsigned int blockDimX, unsigned int blockDimY,
                                            unsigned int blockDimZ, unsigned int sharedMemBytes,
                                            CUstream hStream, void **kernelParams, void **extra);
/* PFN_cuLaunchKernelEx_v11060(_ptsz) */
typedef CUresult (*sair_pfn_cuLaunchKernelEx)(const CUlaunchConfig *config, CUfunction f,
                                              void **kernelParams, void **extra);
/* PFN_cuLaunchCooperativeKernel_v9000(_ptsz) */
typedef CUresult (*sair_pfn_cuLaunchCooperativeKernel)(
    CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
    unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
    unsigned int sharedMemBytes, CUstream hStream, void **kernelParams);
/* PFN_cuGraphLaunch_v10000(_ptsz) */
typedef CUresult (*sair_pfn_cuGraphLaunch)(CUgraphExec hGraphExec, CUstream hStream);
/* PFN_cuGraphInstantiate_v10000, PFN_cuGraphInstantiate_v11000 */
typedef CUresult (*sair_pfn_cuGraphInstantiate)(CUgraphExec *phGraphExec, CUgraph hGraph,
                                                CUgraphNode *phErrorNode, char *logBuffer,
                                                size_t bufferSize);
/* PFN_cuGraphInstantiateWithFlags_v11040 */
typedef CUresult (*sair_pfn_cuGraphInstantiateWithFlags)(CUgraphExec *phGraphExec,
                                                         CUgraph hGraph,
                                                         unsigned long long flags);
/* PFN_cuGraphInstantiateWithParams_v12000(_ptsz) */
typedef CUresult (*sair_pfn_cuGraphInstantiateWithParams)(
    CUgraphExec *phGraphExec, CUgraph hGraph, CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams);
/* PFN_cuGraphExecDestroy_v10000 */
typedef CUresult (*sair_pfn_cuGraphExecDestroy)(CUgraphExec hGraphExec);
/* PFN_cuGraphGetNodes_v10000 */
typedef CUresult (*sair_pfn_cuGraphGetNodes)(CUgraph hGraph, CUgraphNode *nodes,
                                             size_t *numNodes);
/* PFN_cuGraphNodeGetType_v10000 */
typedef CUresult (*sair_pfn_cuGraphNodeGetType)(CUgraphNode hNode, CUgraphNodeType *type);
/* PFN_cuGraphChildGraphNodeGetGraph_v10000 */
typedef CUresult (*sair_pfn_cuGraphChildGraphNodeGetGraph)(CUgraphNode hNode, CUgraph *phGraph);

/* ---- ABI prototypes (the real driver's exported names) ---- */

CUresult cuInit(unsigned int Flags);
CUresult cuDriverGetVersion(int *driverVersion);
CUresult cuGetExportTable(const void **ppExportTable, const CUuuid *pExportTableId);

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                             CUdriverProcAddressQueryResult *symbolStatus);

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                        unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                        unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                        void **kernelParams, void **extra);
CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                             unsigned int gridDimZ, unsigned int blockDimX,
                             unsigned int blockDimY, unsigned int blockDimZ,
                             unsigned int sharedMemBytes, CUstream hStream, void **kernelParams,
                             void **extra);
CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                          void **extra);
CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                               void **extra);
CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                   unsigned int gridDimZ, unsigned int blockDimX,
                                   unsigned int blockDimY, unsigned int blockDimZ,
                                   unsigned int sharedMemBytes, CUstream hStream,
                                   void **kernelParams);
CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                        unsigned int gridDimY, unsigned int gridDimZ,
                                        unsigned int blockDimX, unsigned int blockDimY,
                                        unsigned int blockDimZ, unsigned int sharedMemBytes,
                                        CUstream hStream, void **kernelParams);
CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream);
CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream);

CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags);
CUresult cuGraphDestroy(CUgraph hGraph);
CUresult cuGraphAddKernelNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                              const CUgraphNode *dependencies, size_t numDependencies,
                              const CUDA_KERNEL_NODE_PARAMS_v1 *nodeParams);
CUresult cuGraphAddKernelNode_v2(CUgraphNode *phGraphNode, CUgraph hGraph,
                                 const CUgraphNode *dependencies, size_t numDependencies,
                                 const CUDA_KERNEL_NODE_PARAMS_v2 *nodeParams);
CUresult cuGraphAddEmptyNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                             const CUgraphNode *dependencies, size_t numDependencies);
CUresult cuGraphAddChildGraphNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                                  const CUgraphNode *dependencies, size_t numDependencies,
                                  CUgraph childGraph);
CUresult cuGraphChildGraphNodeGetGraph(CUgraphNode hNode, CUgraph *phGraph);
CUresult cuGraphGetNodes(CUgraph hGraph, CUgraphNode *nodes, size_t *numNodes);
CUresult cuGraphNodeGetType(CUgraphNode hNode, CUgraphNodeType *type);
CUresult cuGraphInstantiate(CUgraphExec *phGraphExec, CUgraph hGraph, CUgraphNode *phErrorNode,
                            char *logBuffer, size_t bufferSize);
CUresult cuGraphInstantiate_v2(CUgraphExec *phGraphExec, CUgraph hGraph,
                               CUgraphNode *phErrorNode, char *logBuffer, size_t bufferSize);
CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph,
                                     unsigned long long flags);
CUresult cuGraphInstantiateWithParams(CUgraphExec *phGraphExec, CUgraph hGraph,
                                      CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams);
CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *phGraphExec, CUgraph hGraph,
                                           CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams);
CUresult cuGraphExecDestroy(CUgraphExec hGraphExec);

#endif /* SAIR_CUDA_H */
