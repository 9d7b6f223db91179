/*
 * hooks.h: THE list of driver entry points the shim defines. Everything per-hook is
 * generated from SAIR_HOOKS: the enum (SAIR_HOOK_<symbol>), the name/wrapper table in
 * shim.c (designated initialisers), the dlsym dispatch (by exact ABI name) and, through
 * sair_proc_versions[] in shim.c, the cuGetProcAddress dispatch (by name, version, flags).
 *
 * X(symbol, kind, counter)
 *   symbol   the exported ABI name, defined in shim.c with the driver's signature
 *   kind     what the wrapper does besides calling the driver (enum sair_hook_kind)
 *   counter  the stats field counting calls (SAIR_STAT_<field>), or SAIR_STAT_NONE
 *
 * Adding an entry: add the row here, a wrapper in shim.c, rows in sair_proc_versions[] for
 * every (name, version, flags) under which cuGetProcAddress hands it out, and bump
 * SAIR_HOOK_EXPECTED_COUNT (the _Static_assert catches a forgotten one).
 */
#ifndef SAIR_HOOKS_H
#define SAIR_HOOKS_H

enum sair_hook_kind {
    SAIR_KIND_PROC_ADDRESS,      /* cuGetProcAddress(_v2): swaps returned pointers */
    SAIR_KIND_LAUNCH,            /* one kernel: one token */
    SAIR_KIND_GRAPH_LAUNCH,      /* a graph exec: as many tokens as its kernel nodes */
    SAIR_KIND_GRAPH_INSTANTIATE, /* records the new exec's kernel-node count */
    SAIR_KIND_GRAPH_DESTROY,     /* forgets an exec */
};

#define SAIR_HOOKS(X)                                                                     \
    X(cuGetProcAddress, SAIR_KIND_PROC_ADDRESS, SAIR_STAT_NONE)                           \
    X(cuGetProcAddress_v2, SAIR_KIND_PROC_ADDRESS, SAIR_STAT_NONE)                        \
    X(cuLaunchKernel, SAIR_KIND_LAUNCH, SAIR_STAT_launches_kernel)                        \
    X(cuLaunchKernel_ptsz, SAIR_KIND_LAUNCH, SAIR_STAT_launches_kernel_ptsz)              \
    X(cuLaunchKernelEx, SAIR_KIND_LAUNCH, SAIR_STAT_launches_kernel_ex)                   \
    X(cuLaunchKernelEx_ptsz, SAIR_KIND_LAUNCH, SAIR_STAT_launches_kernel_ex_ptsz)         \
    X(cuLaunchCooperativeKernel, SAIR_KIND_LAUNCH, SAIR_STAT_launches_cooperative)        \
    X(cuLaunchCooperativeKernel_ptsz, SAIR_KIND_LAUNCH, SAIR_STAT_launches_cooperative_ptsz) \
    X(cuGraphLaunch, SAIR_KIND_GRAPH_LAUNCH, SAIR_STAT_launches_graph)                    \
    X(cuGraphLaunch_ptsz, SAIR_KIND_GRAPH_LAUNCH, SAIR_STAT_launches_graph_ptsz)          \
    X(cuGraphInstantiate, SAIR_KIND_GRAPH_INSTANTIATE, SAIR_STAT_NONE)                    \
    X(cuGraphInstantiate_v2, SAIR_KIND_GRAPH_INSTANTIATE, SAIR_STAT_NONE)                 \
    X(cuGraphInstantiateWithFlags, SAIR_KIND_GRAPH_INSTANTIATE, SAIR_STAT_NONE)           \
    X(cuGraphInstantiateWithParams, SAIR_KIND_GRAPH_INSTANTIATE, SAIR_STAT_NONE)          \
    X(cuGraphInstantiateWithParams_ptsz, SAIR_KIND_GRAPH_INSTANTIATE, SAIR_STAT_NONE)     \
    X(cuGraphExecDestroy, SAIR_KIND_GRAPH_DESTROY, SAIR_STAT_NONE)

#define SAIR_HOOK_EXPECTED_COUNT 16

enum sair_hook {
#define SAIR_HOOK_ENUM(symbol, kind, counter) SAIR_HOOK_##symbol,
    SAIR_HOOKS(SAIR_HOOK_ENUM)
#undef SAIR_HOOK_ENUM
        SAIR_HOOK_COUNT
};

_Static_assert(SAIR_HOOK_COUNT == SAIR_HOOK_EXPECTED_COUNT,
               "SAIR_HOOKS changed: update SAIR_HOOK_EXPECTED_COUNT, wrappers and versions");

/*
 * Driver functions the shim calls itself but does not hook (to count a graph's kernel
 * nodes). Resolved from the driver's handle on first use. X(symbol)
 */
#define SAIR_DRIVER_HELPERS(X) \
    X(cuGraphGetNodes)         \
    X(cuGraphNodeGetType)      \
    X(cuGraphChildGraphNodeGetGraph)

enum sair_helper {
#define SAIR_HELPER_ENUM(symbol) SAIR_HELPER_##symbol,
    SAIR_DRIVER_HELPERS(SAIR_HELPER_ENUM)
#undef SAIR_HELPER_ENUM
        SAIR_HELPER_COUNT
};

#endif /* SAIR_HOOKS_H */
