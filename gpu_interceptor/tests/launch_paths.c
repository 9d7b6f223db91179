/*
 * launch_paths: launch fake kernels through one access path and report, as one JSON line
 * on stdout, how many launches the program made, how many the driver saw, what the shim
 * counted (when preloaded), and the kernels run per time window.
 *
 *   launch_paths PATH [--seconds S] [--launches N] [--window-ms W] [--graph-kernels K]
 *                     [--threads T] [--fork]
 *   launch_paths --layout        print the shim's stats layout as JSON (name -> offset)
 *
 * PATH (the driver counter that must see the launches in brackets):
 *   direct            cuLaunchKernel, linked with -lcuda                    [KERNEL]
 *   direct_ptsz       cuLaunchKernel_ptsz, linked                           [KERNEL_PTSZ]
 *   dlsym             dlopen("libcuda.so.1") + dlsym(h, "cuLaunchKernel")   [KERNEL]
 *   proc              cuGetProcAddress("cuLaunchKernel", 12000, 0), linked  [KERNEL]
 *   proc_v2_ptsz      dlsym(h, "cuGetProcAddress_v2"), then through it "cuGetProcAddress"
 *                     (12000) and "cuLaunchKernel" with flag 2: what libcudart does
 *                                                                           [KERNEL_PTSZ]
 *   ex                cuLaunchKernelEx, linked                              [EX]
 *   ex_ptsz_proc      cuGetProcAddress_v2("cuLaunchKernelEx", flag 2)       [EX_PTSZ]
 *   coop              cuLaunchCooperativeKernel, linked                     [COOP]
 *   coop_ptsz_proc    cuGetProcAddress_v2("cuLaunchCooperativeKernel", 2)   [COOP_PTSZ]
 *   graph             graph of K kernel nodes + 1 empty node + a child graph of 1 kernel,
 *                     cuGraphInstantiateWithFlags + cuGraphLaunch, linked   [GRAPH]
 *   graph_proc_ptsz   the same graph, instantiated and launched through
 *                     cuGetProcAddress_v2 ("cuGraphInstantiate" 12000, "cuGraphLaunch" 2)
 *                                                                           [GRAPH_PTSZ]
 * A graph launch runs K + 1 kernels.
 *
 * With --seconds the program launches until that much time has passed (and at least
 * --launches). With --fork it forks once before launching; parent and child each print
 * their own JSON line (the child's has "forked_child": true).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fake_cuda.h"
#include "sair_cuda.h"
#include "sair_intercept.h"

#define MAX_WINDOWS 4096

struct path_info {
    const char *name;
    enum fake_cuda_counter driver_counter;
};

static const struct path_info paths[] = {
    {"direct", FAKE_COUNT_KERNEL},
    {"direct_ptsz", FAKE_COUNT_KERNEL_PTSZ},
    {"dlsym", FAKE_COUNT_KERNEL},
    {"proc", FAKE_COUNT_KERNEL},
    {"proc_v2_ptsz", FAKE_COUNT_KERNEL_PTSZ},
    {"ex", FAKE_COUNT_EX},
    {"ex_ptsz_proc", FAKE_COUNT_EX_PTSZ},
    {"coop", FAKE_COUNT_COOP},
    {"coop_ptsz_proc", FAKE_COUNT_COOP_PTSZ},
    {"graph", FAKE_COUNT_GRAPH},
    {"graph_proc_ptsz", FAKE_COUNT_GRAPH_PTSZ},
};

/* The program's state: set up in main before threads start, counters atomic. */
static struct {
    const struct path_info *path;
    double seconds;
    long long min_launches;
    int window_ms;
    int graph_kernels;
    int threads;
    int64_t t0_ns;
    int64_t end_ns;
    sair_pfn_cuLaunchKernel launch_kernel;
    sair_pfn_cuLaunchKernelEx launch_ex;
    sair_pfn_cuLaunchCooperativeKernel launch_coop;
    sair_pfn_cuGraphLaunch graph_launch;
    CUgraphExec exec;
    int kernels_per_call;
    _Atomic long long launches;
    _Atomic long long errors;
    _Atomic int first_error;
    _Atomic long long windows[MAX_WINDOWS];
} prog;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *msg)
{
    fprintf(stderr, "launch_paths: %s\n", msg);
    exit(2);
}

static void check(CUresult r, const char *what)
{
    if (r != CUDA_SUCCESS) {
        char msg[256];
        snprintf(msg, sizeof(msg), "%s failed: %d", what, (int)r);
        die(msg);
    }
}

static void *driver_handle(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        die(dlerror());
    }
    return h;
}

/* cuGetProcAddress_v2 as libcudart finds it: dlsym on the driver's handle, then asking it
 * for "cuGetProcAddress" itself (version 12000). */
static sair_pfn_cuGetProcAddress_v2 proc_v2(void)
{
    sair_pfn_cuGetProcAddress_v2 first =
        (sair_pfn_cuGetProcAddress_v2)dlsym(driver_handle(), "cuGetProcAddress_v2");
    if (first == NULL) {
        die("dlsym cuGetProcAddress_v2");
    }
    void *self = NULL;
    CUdriverProcAddressQueryResult status;
    check(first("cuGetProcAddress", &self, 12000, 0, &status), "cuGetProcAddress(self)");
    return (sair_pfn_cuGetProcAddress_v2)self;
}

static void *lookup_v2(const char *name, int version, cuuint64_t flags)
{
    void *fn = NULL;
    CUdriverProcAddressQueryResult status;
    check(proc_v2()(name, &fn, version, flags, &status), name);
    if (fn == NULL || status != CU_GET_PROC_ADDRESS_SUCCESS) {
        die(name);
    }
    return fn;
}

static CUgraphExec build_graph(sair_pfn_cuGraphInstantiateWithFlags instantiate)
{
    CUgraph graph, child;
    CUgraphNode node;
    CUDA_KERNEL_NODE_PARAMS_v2 params = {.gridDimX = 1, .gridDimY = 1, .gridDimZ = 1,
                                         .blockDimX = 32, .blockDimY = 1, .blockDimZ = 1};
    check(cuGraphCreate(&graph, 0), "cuGraphCreate");
    for (int i = 0; i < prog.graph_kernels; i++) {
        check(cuGraphAddKernelNode_v2(&node, graph, NULL, 0, &params), "cuGraphAddKernelNode");
    }
    check(cuGraphAddEmptyNode(&node, graph, NULL, 0), "cuGraphAddEmptyNode");
    check(cuGraphCreate(&child, 0), "cuGraphCreate(child)");
    check(cuGraphAddKernelNode_v2(&node, child, NULL, 0, &params), "cuGraphAddKernelNode");
    check(cuGraphAddChildGraphNode(&node, graph, NULL, 0, child), "cuGraphAddChildGraphNode");
    CUgraphExec exec;
    check(instantiate(&exec, graph, 0), "cuGraphInstantiate");
    cuGraphDestroy(child);
    prog.kernels_per_call = prog.graph_kernels + 1;
    return exec;
}

static void set_up_path(void)
{
    const char *p = prog.path->name;
    prog.kernels_per_call = 1;
    if (strcmp(p, "direct") == 0) {
        prog.launch_kernel = cuLaunchKernel;
    } else if (strcmp(p, "direct_ptsz") == 0) {
        prog.launch_kernel = cuLaunchKernel_ptsz;
    } else if (strcmp(p, "dlsym") == 0) {
        prog.launch_kernel = (sair_pfn_cuLaunchKernel)dlsym(driver_handle(), "cuLaunchKernel");
    } else if (strcmp(p, "proc") == 0) {
        void *fn = NULL;
        check(cuGetProcAddress("cuLaunchKernel", &fn, 12000, 0), "cuGetProcAddress");
        prog.launch_kernel = (sair_pfn_cuLaunchKernel)fn;
    } else if (strcmp(p, "proc_v2_ptsz") == 0) {
        prog.launch_kernel = (sair_pfn_cuLaunchKernel)lookup_v2(
            "cuLaunchKernel", 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM);
    } else if (strcmp(p, "ex") == 0) {
        prog.launch_ex = cuLaunchKernelEx;
    } else if (strcmp(p, "ex_ptsz_proc") == 0) {
        prog.launch_ex = (sair_pfn_cuLaunchKernelEx)lookup_v2(
            "cuLaunchKernelEx", 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM);
    } else if (strcmp(p, "coop") == 0) {
        prog.launch_coop = cuLaunchCooperativeKernel;
    } else if (strcmp(p, "coop_ptsz_proc") == 0) {
        prog.launch_coop = (sair_pfn_cuLaunchCooperativeKernel)lookup_v2(
            "cuLaunchCooperativeKernel", 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM);
    } else if (strcmp(p, "graph") == 0) {
        prog.exec = build_graph(cuGraphInstantiateWithFlags);
        prog.graph_launch = cuGraphLaunch;
    } else if (strcmp(p, "graph_proc_ptsz") == 0) {
        prog.exec = build_graph(
            (sair_pfn_cuGraphInstantiateWithFlags)lookup_v2("cuGraphInstantiate", 12000, 0));
        prog.graph_launch = (sair_pfn_cuGraphLaunch)lookup_v2(
            "cuGraphLaunch", 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM);
    }
    if (prog.launch_kernel == NULL && prog.launch_ex == NULL && prog.launch_coop == NULL &&
        prog.graph_launch == NULL) {
        die("path not set up");
    }
}

static CUresult launch_once(void)
{
    static const CUlaunchConfig config = {.gridDimX = 1, .gridDimY = 1, .gridDimZ = 1,
                                          .blockDimX = 32, .blockDimY = 1, .blockDimZ = 1};
    if (prog.launch_kernel != NULL) {
        return prog.launch_kernel(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
    }
    if (prog.launch_ex != NULL) {
        return prog.launch_ex(&config, NULL, NULL, NULL);
    }
    if (prog.launch_coop != NULL) {
        return prog.launch_coop(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL);
    }
    return prog.graph_launch(prog.exec, NULL);
}

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        long long done = atomic_load(&prog.launches);
        int64_t t = now_ns();
        if (t >= prog.end_ns && done >= prog.min_launches) {
            break;
        }
        if (prog.seconds <= 0 && done >= prog.min_launches) {
            break;
        }
        CUresult r = launch_once();
        t = now_ns();
        atomic_fetch_add(&prog.launches, 1);
        if (r != CUDA_SUCCESS) {
            if (atomic_fetch_add(&prog.errors, 1) == 0) {
                atomic_store(&prog.first_error, (int)r);
            }
        }
        int64_t w = (t - prog.t0_ns) / ((int64_t)prog.window_ms * 1000000);
        if (w >= 0 && w < MAX_WINDOWS) {
            atomic_fetch_add(&prog.windows[w], prog.kernels_per_call);
        }
    }
    return NULL;
}

static void print_layout(void)
{
    printf("{\"size\": %zu, \"fields\": [", sizeof(struct sair_intercept_stats));
    const char *sep = "";
#define PRINT_FIELD(name, doc)                                                               \
    printf("%s[\"%s\", %zu]", sep, #name, offsetof(struct sair_intercept_stats, name));      \
    sep = ", ";
    SAIR_STATS_FIELDS(PRINT_FIELD)
#undef PRINT_FIELD
    printf("], \"magic\": %llu, \"version\": %u}\n", (unsigned long long)SAIR_STATS_MAGIC,
           SAIR_STATS_VERSION);
}

static void report(bool forked_child)
{
    double elapsed = (double)(now_ns() - prog.t0_ns) / 1e9;
    void *driver = driver_handle();
    fake_cuda_count_fn count = (fake_cuda_count_fn)dlsym(driver, "fake_cuda_count");
    int (*stats_fn)(struct sair_intercept_stats *) =
        (int (*)(struct sair_intercept_stats *))dlsym(RTLD_DEFAULT, "sair_intercept_stats");

    printf("{\"path\": \"%s\", \"pid\": %d, \"forked_child\": %s, \"threads\": %d, "
           "\"launches\": %lld, \"kernels_per_call\": %d, \"errors\": %lld, \"first_error\": %d, "
           "\"elapsed_s\": %.6f, \"t0_mono_s\": %.6f, \"window_ms\": %d",
           prog.path->name, (int)getpid(), forked_child ? "true" : "false", prog.threads,
           atomic_load(&prog.launches), prog.kernels_per_call, atomic_load(&prog.errors),
           atomic_load(&prog.first_error), elapsed, (double)prog.t0_ns / 1e9, prog.window_ms);
    if (count != NULL) {
        printf(", \"driver_path_calls\": %llu, \"driver_kernels\": %llu, "
               "\"driver_export_table_calls\": %llu",
               count(prog.path->driver_counter), count(FAKE_COUNT_KERNELS),
               count(FAKE_COUNT_EXPORT_TABLE));
    }
    struct sair_intercept_stats s;
    if (stats_fn != NULL && stats_fn(&s) == 0) {
        printf(", \"shim\": {");
        const char *sep = "";
#define PRINT_STAT(name, doc)                                                                \
    printf("%s\"%s\": %llu", sep, #name, (unsigned long long)s.name);                        \
    sep = ", ";
        SAIR_STATS_FIELDS(PRINT_STAT)
#undef PRINT_STAT
        printf("}");
    } else {
        printf(", \"shim\": null");
    }
    int64_t last = (int64_t)(elapsed * 1000.0) / prog.window_ms + 1;
    if (last > MAX_WINDOWS) {
        last = MAX_WINDOWS;
    }
    printf(", \"windows\": [");
    for (int64_t i = 0; i < last; i++) {
        printf("%s%lld", i ? ", " : "", atomic_load(&prog.windows[i]));
    }
    printf("]}\n");
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "--layout") == 0) {
        print_layout();
        return 0;
    }
    if (argc < 2) {
        die("usage: launch_paths PATH [--seconds S] [--launches N] [--window-ms W] "
            "[--graph-kernels K] [--threads T] [--fork]");
    }
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        if (strcmp(paths[i].name, argv[1]) == 0) {
            prog.path = &paths[i];
        }
    }
    if (prog.path == NULL) {
        die("unknown path");
    }
    prog.window_ms = 10;
    prog.graph_kernels = 3;
    prog.threads = 1;
    bool do_fork = false;
    for (int i = 2; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : "";
        if (strcmp(argv[i], "--seconds") == 0) {
            prog.seconds = atof(next), i++;
        } else if (strcmp(argv[i], "--launches") == 0) {
            prog.min_launches = atoll(next), i++;
        } else if (strcmp(argv[i], "--window-ms") == 0) {
            prog.window_ms = atoi(next), i++;
        } else if (strcmp(argv[i], "--graph-kernels") == 0) {
            prog.graph_kernels = atoi(next), i++;
        } else if (strcmp(argv[i], "--threads") == 0) {
            prog.threads = atoi(next), i++;
        } else if (strcmp(argv[i], "--fork") == 0) {
            do_fork = true;
        } else {
            die("unknown option");
        }
    }
    if (prog.window_ms <= 0 || prog.threads <= 0 || prog.threads > 64) {
        die("bad option value");
    }
    check(cuInit(0), "cuInit");
    set_up_path();

    bool child = false;
    pid_t pid = 0;
    if (do_fork) {
        fflush(stdout);
        pid = fork();
        if (pid < 0) {
            die("fork");
        }
        child = pid == 0;
    }
    prog.t0_ns = now_ns();
    prog.end_ns = prog.t0_ns + (int64_t)(prog.seconds * 1e9);
    pthread_t tids[64];
    for (int i = 0; i < prog.threads; i++) {
        pthread_create(&tids[i], NULL, worker, NULL);
    }
    for (int i = 0; i < prog.threads; i++) {
        pthread_join(tids[i], NULL);
    }
    report(child);
    if (do_fork && !child) {
        int status = 0;
        waitpid(pid, &status, 0);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 3;
    }
    return 0;
}
