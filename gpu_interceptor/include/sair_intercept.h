/*
 * sair_intercept.h: what a worker can read from libsair_intercept.so.
 *
 * Two ways, same numbers:
 *   1. In-process C API: sair_intercept_stats(&out) (dlsym it from the preloaded shim).
 *   2. A shared-memory file (env SAIR_GPU_STATS_PATH): the shim mmaps it MAP_SHARED and keeps
 *      a `struct sair_intercept_stats` at offset 0 up to date; any process can read it with
 *      mmap + struct (gpu_interceptor/stats.py does, in pure Python).
 *
 * Layout (little-endian, no padding): every field is a uint64_t, in the order of
 * SAIR_STATS_FIELDS below. Version 1. The Python reader keeps the same list; a test compares
 * the two (tests/interceptor/test_stats_layout.py via `stats_layout`).
 */
#ifndef SAIR_INTERCEPT_H
#define SAIR_INTERCEPT_H

#include <stdint.h>

#define SAIR_STATS_MAGIC 0x3155504752494153ULL /* "SAIRGPU1" read as little-endian bytes */
#define SAIR_STATS_VERSION 1u

/* Current mode of the shim (the `mode` counter). */
enum sair_mode {
    SAIR_MODE_STARTING = 0,     /* no answer from Redis yet: launches wait for the first one */
    SAIR_MODE_THROTTLED = 1,    /* tokens come from the stage's Redis bucket */
    SAIR_MODE_UNCONFIGURED = 2, /* the bucket key does not exist: unthrottled */
    SAIR_MODE_OPEN = 3,         /* Redis unreachable, SAIR_GPU_FAIL_MODE=open: unthrottled */
    SAIR_MODE_HOLD = 4,         /* Redis unreachable, SAIR_GPU_FAIL_MODE=hold: last rate, local */
    SAIR_MODE_DISABLED = 5,     /* SAIR_REDIS_URL/SAIR_PIPELINE/SAIR_STAGE unset: pass-through */
};

/*
 * X(name, description). Counters are totals since the process (or fork child) started,
 * except the gauges mode, local_tokens, rate_milli and batch.
 */
#define SAIR_STATS_FIELDS(X)                                                                   \
    X(magic, "SAIR_STATS_MAGIC once the page is initialised")                                  \
    X(version, "SAIR_STATS_VERSION")                                                           \
    X(pid, "process that owns this page")                                                      \
    X(mode, "enum sair_mode (gauge)")                                                          \
    X(tokens_used, "tokens charged to launches (a graph launch costs its kernel nodes)")       \
    X(wait_ns, "total time launches spent waiting for tokens, ns")                             \
    X(waits, "launches that had to wait")                                                      \
    X(launches_kernel, "cuLaunchKernel calls")                                                 \
    X(launches_kernel_ptsz, "cuLaunchKernel_ptsz calls")                                       \
    X(launches_kernel_ex, "cuLaunchKernelEx calls")                                            \
    X(launches_kernel_ex_ptsz, "cuLaunchKernelEx_ptsz calls")                                  \
    X(launches_cooperative, "cuLaunchCooperativeKernel calls")                                 \
    X(launches_cooperative_ptsz, "cuLaunchCooperativeKernel_ptsz calls")                       \
    X(launches_graph, "cuGraphLaunch calls")                                                   \
    X(launches_graph_ptsz, "cuGraphLaunch_ptsz calls")                                         \
    X(graph_kernel_nodes, "kernel nodes run by graph launches (sum of their token costs)")     \
    X(graph_execs_tracked, "graph execs whose kernel-node count is known (gauge)")             \
    X(graph_launches_untracked, "graph launches of an exec the shim never saw instantiated")   \
    X(refills, "Redis take calls that granted at least one token")                             \
    X(redis_calls, "Redis take calls (EVALSHA or EVAL)")                                       \
    X(redis_errors, "failed Redis connects or calls")                                          \
    X(tokens_granted, "tokens granted by Redis in total")                                      \
    X(hold_tokens, "tokens credited locally in hold mode")                                     \
    X(local_tokens, "tokens in the local bucket, two's complement int64 (gauge)")              \
    X(rate_milli, "last refill rate seen in Redis, thousandths of a token per second (gauge)") \
    X(batch, "current refill batch size in tokens (gauge)")                                    \
    X(wrapped_proc_address, "pointers swapped for wrappers in cuGetProcAddress(_v2)")          \
    X(wrapped_dlsym, "pointers swapped for wrappers in dlsym")                                 \
    X(recursion_avoided, "lookups that handed back the shim's own function")                   \
    X(missing_real, "calls whose real driver entry point could not be found")

struct sair_intercept_stats {
#define SAIR_STATS_MEMBER(name, doc) uint64_t name;
    SAIR_STATS_FIELDS(SAIR_STATS_MEMBER)
#undef SAIR_STATS_MEMBER
};

#define SAIR_STATS_FIELD_COUNT_(name, doc) +1
enum { SAIR_STATS_FIELD_COUNT = 0 SAIR_STATS_FIELDS(SAIR_STATS_FIELD_COUNT_) };
#undef SAIR_STATS_FIELD_COUNT_

_Static_assert(sizeof(struct sair_intercept_stats) == SAIR_STATS_FIELD_COUNT * sizeof(uint64_t),
               "stats layout must be uint64_t fields without padding");

/* Copy the current counters into *out. Returns 0, or -1 when out is NULL. */
int sair_intercept_stats(struct sair_intercept_stats *out);

#endif /* SAIR_INTERCEPT_H */
