/*
 * shim.c: libsair_intercept.so, an LD_PRELOAD shim that rate-limits CUDA kernel launches
 * with tokens from the stage's Redis bucket (docs/gpu-interceptor.md).
 *
 * How a launch is charged:
 *   launch wrapper -> charge(): one atomic compare-and-swap on the local bucket
 *   (st.tokens). Only when the bucket is empty does it take st.lock and wait on st.cv.
 *   A background refill thread (refill_main) moves tokens from Redis into the local bucket
 *   in batches; the Redis round trip never sits on the path of a launch that has a token.
 *
 * How the shim gets in the way of every launch:
 *   - exported symbols with the driver's ABI names (cuLaunchKernel, ...): programs linked
 *     with -lcuda bind to them first because the shim is preloaded;
 *   - dlsym: dlopen + dlsym(handle, "cuLaunchKernel") gets our wrapper;
 *   - cuGetProcAddress / cuGetProcAddress_v2: the pointer the driver returns for a launch
 *     entry point, or for cuGetProcAddress itself, is swapped for our wrapper (that is how
 *     libcudart, hence PyTorch and everything built with nvcc, reaches the driver).
 *
 * All mutable state is in `st` below, one documented struct. The hooked entry points come
 * from the single X-macro list in hooks.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "hooks.h"
#include "redis_bucket.h"
#include "sair_cuda.h"
#include "sair_intercept.h"

#define SAIR_EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------------------------ */
/* Constants                                                                             */
/* ------------------------------------------------------------------------------------ */

enum {
    DEFAULT_MAX_BATCH = 65536,   /* SAIR_GPU_BATCH: most tokens one Redis call asks for */
    DEFAULT_BATCH_MS = 10,       /* SAIR_GPU_BATCH_MS: a batch is this long at the last rate */
    FIRST_BATCH = 8,             /* tokens asked for before any rate is known */
    DEFAULT_TIMEOUT_MS = 200,    /* SAIR_REDIS_TIMEOUT_MS: connect and per-command timeout */
    DEFAULT_RECONNECT_MS = 250,  /* SAIR_REDIS_RECONNECT_MS: retry period while unreachable */
    UNCONFIGURED_POLL_MS = 200,  /* how often an unconfigured bucket is looked at again */
    IDLE_WAKE_MS = 100,          /* refill thread wakes at least this often */
    WAITER_RECHECK_MS = 20,      /* a waiting launch re-checks the mode this often */
    SHORT_GRANT_MIN_US = 1000,   /* after a short grant, wait at least this long ... */
    SHORT_GRANT_MAX_US = 20000,  /* ... and at most this long before asking again */
    HOLD_TICK_MIN_US = 200,      /* hold mode credits tokens at most this often ... */
    HOLD_TICK_MAX_US = 10000,    /* ... and at least this often */
    HOLD_CAP_MS = 50,            /* hold mode's local bucket holds this long at the rate */
    GRAPH_MAX_DEPTH = 8,         /* child graphs nested deeper than this are not counted */
    STATS_FILE_BYTES = 4096,     /* size of the SAIR_GPU_STATS_PATH file */
};

#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL
#define NS_PER_US 1000LL

/* Stats slots: SAIR_STAT_<field> indexes the page as an array of uint64_t. */
enum sair_stat {
    SAIR_STAT_NONE = -1,
#define SAIR_STAT_ENUM(name, doc) SAIR_STAT_##name,
    SAIR_STATS_FIELDS(SAIR_STAT_ENUM)
#undef SAIR_STAT_ENUM
};

#define SAIR_STAT_OFFSET_CHECK(name, doc)                                                    \
    _Static_assert(offsetof(struct sair_intercept_stats, name) ==                            \
                       (size_t)SAIR_STAT_##name * sizeof(uint64_t),                          \
                   "stats field " #name " is not at its index");
SAIR_STATS_FIELDS(SAIR_STAT_OFFSET_CHECK)
#undef SAIR_STAT_OFFSET_CHECK

/* The shared page as the shim writes it: the public struct's fields, as atomics. */
struct sair_stats_page {
    _Atomic uint64_t v[SAIR_STATS_FIELD_COUNT];
};
_Static_assert(sizeof(struct sair_stats_page) == sizeof(struct sair_intercept_stats),
               "atomic page and public struct must have the same layout");
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
_Static_assert(sizeof(struct sair_stats_page) <= STATS_FILE_BYTES, "stats page too big");

/* One log line per kind per process (SAIR_GPU_LOG=0 silences them). */
enum sair_log_once {
    LOG_DISABLED,
    LOG_BAD_CONFIG,
    LOG_UNCONFIGURED,
    LOG_OPEN,
    LOG_HOLD,
    LOG_HOLD_NO_RATE,
    LOG_RECOVERED,
    LOG_THREAD,
    LOG_STATS_PAGE,
    LOG_STATS_FORK,
    LOG_POINTER_MISMATCH,
    LOG_CONDITIONAL_NODE,
    LOG_GRAPH_COUNT,
    LOG_GRAPH_TABLE,
    LOG_NO_DLSYM,
    LOG_KIND_COUNT
};

/* ------------------------------------------------------------------------------------ */
/* The hook table (generated from hooks.h)                                               */
/* ------------------------------------------------------------------------------------ */

struct sair_hook_info {
    const char *name;         /* ABI symbol name */
    enum sair_hook_kind kind; /* what the wrapper does */
    enum sair_stat counter;   /* calls counted here, or SAIR_STAT_NONE */
    void *wrapper;            /* our definition of `name` (the address handed out) */
};

/* The wrappers are the exported ABI functions themselves (declared in sair_cuda.h). */
static const struct sair_hook_info sair_hooks[SAIR_HOOK_COUNT] = {
#define SAIR_HOOK_ROW(symbol, hook_kind, stat)                                               \
    [SAIR_HOOK_##symbol] = {                                                                 \
        .name = #symbol, .kind = hook_kind, .counter = stat, .wrapper = (void *)&symbol},
    SAIR_HOOKS(SAIR_HOOK_ROW)
#undef SAIR_HOOK_ROW
};
_Static_assert(sizeof(sair_hooks) / sizeof(sair_hooks[0]) == SAIR_HOOK_COUNT,
               "one row per hook");

static const char *const sair_helper_names[SAIR_HELPER_COUNT] = {
#define SAIR_HELPER_ROW(symbol) [SAIR_HELPER_##symbol] = #symbol,
    SAIR_DRIVER_HELPERS(SAIR_HELPER_ROW)
#undef SAIR_HELPER_ROW
};

/*
 * Which of our wrappers cuGetProcAddress(_v2) hands out, as data: for a request
 * (proc_name, version, flags), the row with that name, the highest min_version <= version,
 * and ptsz matching CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM in flags (when the name
 * has such a row). Versions are the ones of cudaTypedefs.h (PFN_<name>_v<version>).
 */
struct sair_proc_version {
    const char *proc_name; /* the name passed to cuGetProcAddress */
    int min_version;       /* CUDA version from which this ABI symbol answers to it */
    bool ptsz;             /* the per-thread-default-stream variant */
    enum sair_hook hook;
};

static const struct sair_proc_version sair_proc_versions[] = {
    {.proc_name = "cuGetProcAddress", .min_version = 11030, .hook = SAIR_HOOK_cuGetProcAddress},
    {.proc_name = "cuGetProcAddress", .min_version = 12000,
     .hook = SAIR_HOOK_cuGetProcAddress_v2},
    {.proc_name = "cuLaunchKernel", .min_version = 4000, .hook = SAIR_HOOK_cuLaunchKernel},
    {.proc_name = "cuLaunchKernel", .min_version = 7000, .ptsz = true,
     .hook = SAIR_HOOK_cuLaunchKernel_ptsz},
    {.proc_name = "cuLaunchKernelEx", .min_version = 11060, .hook = SAIR_HOOK_cuLaunchKernelEx},
    {.proc_name = "cuLaunchKernelEx", .min_version = 11060, .ptsz = true,
     .hook = SAIR_HOOK_cuLaunchKernelEx_ptsz},
    {.proc_name = "cuLaunchCooperativeKernel", .min_version = 9000,
     .hook = SAIR_HOOK_cuLaunchCooperativeKernel},
    {.proc_name = "cuLaunchCooperativeKernel", .min_version = 9000, .ptsz = true,
     .hook = SAIR_HOOK_cuLaunchCooperativeKernel_ptsz},
    {.proc_name = "cuGraphLaunch", .min_version = 10000, .hook = SAIR_HOOK_cuGraphLaunch},
    {.proc_name = "cuGraphLaunch", .min_version = 10000, .ptsz = true,
     .hook = SAIR_HOOK_cuGraphLaunch_ptsz},
    {.proc_name = "cuGraphInstantiate", .min_version = 10000,
     .hook = SAIR_HOOK_cuGraphInstantiate},
    {.proc_name = "cuGraphInstantiate", .min_version = 11000,
     .hook = SAIR_HOOK_cuGraphInstantiate_v2},
    {.proc_name = "cuGraphInstantiate", .min_version = 12000,
     .hook = SAIR_HOOK_cuGraphInstantiateWithFlags},
    {.proc_name = "cuGraphInstantiateWithFlags", .min_version = 11040,
     .hook = SAIR_HOOK_cuGraphInstantiateWithFlags},
    {.proc_name = "cuGraphInstantiateWithParams", .min_version = 12000,
     .hook = SAIR_HOOK_cuGraphInstantiateWithParams},
    {.proc_name = "cuGraphInstantiateWithParams", .min_version = 12000, .ptsz = true,
     .hook = SAIR_HOOK_cuGraphInstantiateWithParams_ptsz},
    {.proc_name = "cuGraphExecDestroy", .min_version = 10000,
     .hook = SAIR_HOOK_cuGraphExecDestroy},
};
#define SAIR_PROC_VERSION_COUNT (sizeof(sair_proc_versions) / sizeof(sair_proc_versions[0]))
/* Every hook is handed out for at least one request; cuGraphInstantiate has 3 versions. */
_Static_assert(SAIR_PROC_VERSION_COUNT == SAIR_HOOK_COUNT + 1,
               "every hook needs its cuGetProcAddress row(s)");

/* ------------------------------------------------------------------------------------ */
/* The state                                                                             */
/* ------------------------------------------------------------------------------------ */

/* Read from the environment once, by init_once; read-only afterwards. */
struct sair_config {
    bool enabled;                    /* SAIR_REDIS_URL, SAIR_PIPELINE, SAIR_STAGE set and valid */
    struct sair_redis_target target; /* parsed SAIR_REDIS_URL */
    char key[512];                   /* sair:gpu:<SAIR_PIPELINE>:<SAIR_STAGE> */
    bool fail_hold;                  /* SAIR_GPU_FAIL_MODE=hold (default open) */
    int64_t max_batch;               /* SAIR_GPU_BATCH */
    int64_t batch_ms;                /* SAIR_GPU_BATCH_MS */
    int timeout_ms;                  /* SAIR_REDIS_TIMEOUT_MS */
    int reconnect_ms;                /* SAIR_REDIS_RECONNECT_MS */
    bool log;                        /* SAIR_GPU_LOG != "0" */
    bool trace;                      /* SAIR_GPU_TRACE=1: log every wrapper handed out */
    char stats_path[1024];           /* SAIR_GPU_STATS_PATH ("{pid}" -> pid), "" for none */
    char driver[1024];               /* SAIR_CUDA_DRIVER, default libcuda.so.1 */
};

/* CUgraphExec -> number of kernel nodes it runs (open addressing, linear probing). */
struct sair_graph_entry {
    CUgraphExec exec; /* NULL: empty; SAIR_GRAPH_TOMBSTONE: deleted */
    int64_t kernel_nodes;
};
#define SAIR_GRAPH_TOMBSTONE ((CUgraphExec)(uintptr_t)1)

/*
 * All mutable state of the shim. Fork: on_fork_child() runs in the child of fork() (only
 * the forking thread survives there); what it does to each field is said per field.
 */
static struct sair_state {
    /* Guards init_once. After fork: stays "done": the child inherits the config. */
    pthread_once_t init_once;
    /* Guards the lookup of the real dlsym (needed before, and without, init_once). */
    pthread_once_t dlsym_once;
    /* init_once writes, everyone reads after pthread_once. After fork: inherited. */
    struct sair_config cfg;
    /* The process that ran init_once. After fork: inherited, so a child sees its parent's
     * pid here (that is how ensure_refill_thread knows it runs in a fork child). */
    pid_t init_pid;
    /* The libc dlsym. dlsym_once writes once. After fork: inherited (same address space). */
    void *(*real_dlsym)(void *, const char *);
    /* Handle of the real driver (dlopen of cfg.driver). Any thread publishes with a
     * compare-and-swap; never closed. After fork: inherited. */
    _Atomic(void *) driver;
    /* The driver's own entry point per hook, never one of our wrappers. Any thread
     * publishes with a compare-and-swap (first one wins). After fork: inherited. */
    _Atomic(void *) real[SAIR_HOOK_COUNT];
    /* Driver functions used to count graph nodes; as `real`. After fork: inherited. */
    _Atomic(void *) helper[SAIR_HELPER_COUNT];

    /* The local bucket, in tokens; negative after a graph launch costlier than what was
     * there (debt, repaid by later refills). Launches subtract with a compare-and-swap; the
     * refill thread adds. After fork: 0 in the child. */
    _Atomic int64_t tokens;
    /* enum sair_mode. init_once and the refill thread write; launches read. After fork:
     * STARTING in the child (unless DISABLED), so its first launch starts a refill thread. */
    _Atomic int mode;
    /* Below this many local tokens a launch pokes the refill thread. Refill thread writes.
     * After fork: inherited. */
    _Atomic int64_t low_watermark;
    /* Set by the launch that posts refill_sem, cleared by the refill thread, so that one
     * drop below the watermark posts once. After fork: false in the child. */
    atomic_bool refill_poked;
    /* Wakes the refill thread. Launches post, the refill thread waits. After fork:
     * re-initialised in the child. */
    sem_t refill_sem;
    /* Guards thread_running, thread_pid, the hold_* fields, and waiting on cv. After fork:
     * re-initialised. */
    pthread_mutex_t lock;
    /* Launches without a token wait here (CLOCK_MONOTONIC, set up by init_once); the refill
     * thread broadcasts after adding tokens or changing mode. After fork: re-initialised. */
    pthread_cond_t cv;
    /* Launches waiting on cv. Changed under lock by waiting launches; read without lock by
     * the refill thread. After fork: 0 in the child. */
    _Atomic int waiters;
    /* Hold mode's local refill: the bucket refills from elapsed time at the last rate seen,
     * credited by whoever looks first, the refill thread or a waiting launch, so a refill
     * thread stuck in a Redis timeout does not starve launches. Under lock: the refill
     * thread sets them on entering hold; hold_credit_locked advances them. After fork:
     * inherited, unused until the child's refill thread enters hold itself. */
    double hold_rate;      /* tokens/s */
    int64_t hold_cap;      /* credit while the local bucket holds fewer tokens */
    int64_t hold_last_ns;  /* credited up to this time */
    double hold_carry;     /* fraction of a token not yet credited */
    /* Whether this process has a refill thread, and for which pid. Under lock. After fork:
     * false in the child (threads do not survive fork). */
    bool thread_running;
    pid_t thread_pid;
    /* Socket of the refill thread's Redis connection, or -1. Refill thread writes. After
     * fork: the child closes its copy (the connection belongs to the parent). */
    _Atomic int redis_fd;

    /* Graph exec table. Under graph_lock (instantiate, destroy and graph launches). After
     * fork: lock re-initialised, table inherited. */
    pthread_mutex_t graph_lock;
    struct sair_graph_entry *graph_tab;
    size_t graph_cap;   /* slots, a power of two, or 0 */
    size_t graph_used;  /* live entries + tombstones */
    size_t graph_live;  /* live entries */

    /* Where counters go: the mmap'd SAIR_GPU_STATS_PATH file or local_page. Published by
     * init_once (and by the child's first refill-thread start, for a "{pid}" path). After
     * fork: local_page in the child until then (the parent's file stays the parent's). */
    _Atomic(struct sair_stats_page *) page;
    /* Counters when there is no file. Atomics. After fork: zeroed in the child. */
    struct sair_stats_page local_page;

    /* One log line per kind / per hook / per helper. Any thread sets. After fork:
     * inherited (a child does not repeat its parent's lines). */
    atomic_bool logged[LOG_KIND_COUNT];
    atomic_bool logged_missing[SAIR_HOOK_COUNT];
    atomic_bool logged_helper[SAIR_HELPER_COUNT];
} st = {
    .init_once = PTHREAD_ONCE_INIT,
    .dlsym_once = PTHREAD_ONCE_INIT,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .graph_lock = PTHREAD_MUTEX_INITIALIZER,
    .redis_fd = -1,
};

/* ------------------------------------------------------------------------------------ */
/* Small helpers                                                                         */
/* ------------------------------------------------------------------------------------ */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static int64_t clamp64(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static struct timespec monotonic_deadline(int64_t at_ns)
{
    struct timespec ts = {.tv_sec = at_ns / NS_PER_S, .tv_nsec = at_ns % NS_PER_S};
    return ts;
}

static void logf_always(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_always(const char *fmt, ...)
{
    if (!st.cfg.log) {
        return;
    }
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "sair-intercept[%d]: %s\n", (int)getpid(), line);
}

#define LOG_ONCE(kind, ...)                                                                  \
    do {                                                                                     \
        if (!atomic_exchange(&st.logged[(kind)], true)) {                                    \
            logf_always(__VA_ARGS__);                                                        \
        }                                                                                    \
    } while (0)

static struct sair_stats_page *page(void)
{
    return atomic_load_explicit(&st.page, memory_order_acquire);
}

static void stat_add(enum sair_stat stat, uint64_t n)
{
    if (stat != SAIR_STAT_NONE) {
        atomic_fetch_add_explicit(&page()->v[stat], n, memory_order_relaxed);
    }
}

static void stat_set(enum sair_stat stat, uint64_t value)
{
    atomic_store_explicit(&page()->v[stat], value, memory_order_relaxed);
}

static void set_mode(enum sair_mode mode)
{
    atomic_store(&st.mode, (int)mode);
    stat_set(SAIR_STAT_mode, (uint64_t)mode);
}

static bool mode_is_unthrottled(int mode)
{
    return mode == SAIR_MODE_UNCONFIGURED || mode == SAIR_MODE_OPEN ||
           mode == SAIR_MODE_DISABLED;
}

static int64_t env_int(const char *name, int64_t fallback, int64_t lo, int64_t hi)
{
    const char *s = getenv(name);
    if (s == NULL || *s == '\0') {
        return fallback;
    }
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (*end != '\0' || v < lo || v > hi) {
        logf_always("%s='%s' is not an integer in [%lld, %lld]; using %lld", name, s,
                    (long long)lo, (long long)hi, (long long)fallback);
        return fallback;
    }
    return v;
}

/* ------------------------------------------------------------------------------------ */
/* Stats page                                                                            */
/* ------------------------------------------------------------------------------------ */

static void page_reset(struct sair_stats_page *p)
{
    for (int i = 0; i < SAIR_STATS_FIELD_COUNT; i++) {
        atomic_store_explicit(&p->v[i], 0, memory_order_relaxed);
    }
    atomic_store_explicit(&p->v[SAIR_STAT_version], SAIR_STATS_VERSION, memory_order_relaxed);
    atomic_store_explicit(&p->v[SAIR_STAT_pid], (uint64_t)getpid(), memory_order_relaxed);
    atomic_store_explicit(&p->v[SAIR_STAT_mode], (uint64_t)atomic_load(&st.mode),
                          memory_order_relaxed);
    /* Magic last: a reader that sees it sees an initialised page. */
    atomic_store_explicit(&p->v[SAIR_STAT_magic], SAIR_STATS_MAGIC, memory_order_release);
}

/* Expand "{pid}" in the template. Returns false when the result does not fit. */
static bool stats_path_for_pid(char *out, size_t outlen, bool *has_pid)
{
    const char *tmpl = st.cfg.stats_path;
    const char *mark = strstr(tmpl, "{pid}");
    *has_pid = mark != NULL;
    int n = mark == NULL ? snprintf(out, outlen, "%s", tmpl)
                         : snprintf(out, outlen, "%.*s%d%s", (int)(mark - tmpl), tmpl,
                                    (int)getpid(), mark + 5);
    return n >= 0 && (size_t)n < outlen;
}

/* The page for this process: the mmap'd file, or NULL (caller uses local_page). */
static struct sair_stats_page *map_stats_file(void)
{
    if (st.cfg.stats_path[0] == '\0') {
        return NULL;
    }
    char path[1100];
    bool has_pid = false;
    if (!stats_path_for_pid(path, sizeof(path), &has_pid)) {
        LOG_ONCE(LOG_STATS_PAGE, "SAIR_GPU_STATS_PATH too long; counters stay in-process");
        return NULL;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        LOG_ONCE(LOG_STATS_PAGE, "cannot open stats file %s: %s; counters stay in-process",
                 path, strerror(errno));
        return NULL;
    }
    void *mem = MAP_FAILED;
    if (ftruncate(fd, STATS_FILE_BYTES) == 0) {
        mem = mmap(NULL, STATS_FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    int saved = errno;
    close(fd);
    if (mem == MAP_FAILED) {
        LOG_ONCE(LOG_STATS_PAGE, "cannot map stats file %s: %s; counters stay in-process",
                 path, strerror(saved));
        return NULL;
    }
    struct sair_stats_page *p = mem;
    page_reset(p);
    return p;
}

/* ------------------------------------------------------------------------------------ */
/* Initialisation and fork                                                               */
/* ------------------------------------------------------------------------------------ */

static void resolve_real_dlsym(void)
{
    /* glibc 2.34 moved dlsym into libc under a new version; older ones only have 2.2.5. */
    void *p = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (p == NULL) {
        p = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    }
    st.real_dlsym = (void *(*)(void *, const char *))p;
}

static void *(*real_dlsym(void))(void *, const char *)
{
    pthread_once(&st.dlsym_once, resolve_real_dlsym);
    return st.real_dlsym;
}

static void on_fork_child(void);

static void read_config(struct sair_config *cfg)
{
    const char *log = getenv("SAIR_GPU_LOG");
    cfg->log = !(log != NULL && strcmp(log, "0") == 0);
    const char *trace = getenv("SAIR_GPU_TRACE");
    cfg->trace = trace != NULL && strcmp(trace, "1") == 0;
    const char *url = getenv("SAIR_REDIS_URL");
    const char *pipeline = getenv("SAIR_PIPELINE");
    const char *stage = getenv("SAIR_STAGE");
    const char *fail = getenv("SAIR_GPU_FAIL_MODE");
    const char *stats = getenv("SAIR_GPU_STATS_PATH");
    const char *driver = getenv("SAIR_CUDA_DRIVER");
    cfg->fail_hold = fail != NULL && strcmp(fail, "hold") == 0;
    if (fail != NULL && *fail != '\0' && strcmp(fail, "hold") != 0 && strcmp(fail, "open") != 0) {
        logf_always("SAIR_GPU_FAIL_MODE='%s' is neither open nor hold; using open", fail);
    }
    cfg->max_batch = env_int("SAIR_GPU_BATCH", DEFAULT_MAX_BATCH, 1, 1LL << 30);
    cfg->batch_ms = env_int("SAIR_GPU_BATCH_MS", DEFAULT_BATCH_MS, 1, 10000);
    cfg->timeout_ms = (int)env_int("SAIR_REDIS_TIMEOUT_MS", DEFAULT_TIMEOUT_MS, 1, 60000);
    cfg->reconnect_ms = (int)env_int("SAIR_REDIS_RECONNECT_MS", DEFAULT_RECONNECT_MS, 1, 60000);
    snprintf(cfg->stats_path, sizeof(cfg->stats_path), "%s", stats ? stats : "");
    snprintf(cfg->driver, sizeof(cfg->driver), "%s",
             driver != NULL && *driver != '\0' ? driver : "libcuda.so.1");

    if (url == NULL || *url == '\0' || pipeline == NULL || *pipeline == '\0' || stage == NULL ||
        *stage == '\0') {
        cfg->enabled = false;
        return;
    }
    char err[256];
    if (sair_redis_parse_url(url, &cfg->target, err, sizeof(err)) != 0) {
        LOG_ONCE(LOG_BAD_CONFIG, "%s; launches pass through unthrottled", err);
        cfg->enabled = false;
        return;
    }
    int n = snprintf(cfg->key, sizeof(cfg->key), "sair:gpu:%s:%s", pipeline, stage);
    if (n < 0 || (size_t)n >= sizeof(cfg->key)) {
        LOG_ONCE(LOG_BAD_CONFIG, "SAIR_PIPELINE/SAIR_STAGE too long; launches pass through");
        cfg->enabled = false;
        return;
    }
    cfg->enabled = true;
}

static void init_once(void)
{
    st.init_pid = getpid();
    read_config(&st.cfg);
    struct sair_stats_page *file = map_stats_file();
    atomic_store_explicit(&st.page, file != NULL ? file : &st.local_page, memory_order_release);
    if (file == NULL) {
        page_reset(&st.local_page);
    }

    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&st.cv, &attr);
    pthread_condattr_destroy(&attr);
    sem_init(&st.refill_sem, 0, 0);
    atomic_store(&st.low_watermark, 1);
    stat_set(SAIR_STAT_batch, FIRST_BATCH);
    pthread_atfork(NULL, NULL, on_fork_child);

    if (!st.cfg.enabled) {
        set_mode(SAIR_MODE_DISABLED);
        LOG_ONCE(LOG_DISABLED, "SAIR_REDIS_URL, SAIR_PIPELINE or SAIR_STAGE unset: "
                               "launches pass through unthrottled");
    } else {
        set_mode(SAIR_MODE_STARTING);
    }
}

static void ensure_init(void)
{
    pthread_once(&st.init_once, init_once);
}

/* Runs in the child of fork(), where only the forking thread exists. */
static void on_fork_child(void)
{
    pthread_mutex_init(&st.lock, NULL);
    pthread_mutex_init(&st.graph_lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&st.cv, &attr);
    pthread_condattr_destroy(&attr);
    sem_init(&st.refill_sem, 0, 0);
    st.thread_running = false;
    atomic_store(&st.waiters, 0);
    atomic_store(&st.refill_poked, false);
    atomic_store(&st.tokens, 0);
    int fd = atomic_exchange(&st.redis_fd, -1);
    if (fd >= 0) {
        close(fd);
    }
    /* The parent's file stays the parent's: count privately until the child's refill
     * thread maps a page of its own ("{pid}" paths) in ensure_refill_thread. */
    page_reset(&st.local_page);
    atomic_store_explicit(&st.page, &st.local_page, memory_order_release);
    if (atomic_load(&st.mode) != SAIR_MODE_DISABLED) {
        set_mode(SAIR_MODE_STARTING);
    }
}

/* ------------------------------------------------------------------------------------ */
/* Real entry points                                                                     */
/* ------------------------------------------------------------------------------------ */

static bool is_our_wrapper(const void *p)
{
    for (int i = 0; i < SAIR_HOOK_COUNT; i++) {
        if (sair_hooks[i].wrapper == p) {
            return true;
        }
    }
    return p == (const void *)&dlsym;
}

/* The real driver's handle, loading it if needed (never inside dlsym: see callers). */
static void *driver_handle(bool may_load)
{
    void *h = atomic_load_explicit(&st.driver, memory_order_acquire);
    if (h != NULL) {
        return h;
    }
    h = dlopen(st.cfg.driver, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (h == NULL && may_load) {
        h = dlopen(st.cfg.driver, RTLD_NOW | RTLD_LOCAL);
    }
    if (h != NULL) {
        void *expected = NULL;
        if (!atomic_compare_exchange_strong(&st.driver, &expected, h)) {
            dlclose(h); /* another thread won; drop our extra reference */
            h = expected;
        }
    }
    return h;
}

/* Look `name` up in the driver itself: dlsym on its handle searches the driver (and its
 * dependencies) first, never the global scope where our wrappers sit. */
static void *lookup_in_driver(const char *name, bool may_load)
{
    void *(*dl)(void *, const char *) = real_dlsym();
    void *h = driver_handle(may_load);
    if (dl == NULL || h == NULL) {
        return NULL;
    }
    void *p = dl(h, name);
    return is_our_wrapper(p) ? NULL : p;
}

/* Publish p as the real entry point of hook unless one is already known; returns the
 * published value. p is never one of ours. */
static void *publish_real(enum sair_hook hook, void *p)
{
    void *expected = NULL;
    if (p == NULL || is_our_wrapper(p)) {
        return atomic_load(&st.real[hook]);
    }
    if (atomic_compare_exchange_strong(&st.real[hook], &expected, p)) {
        return p;
    }
    return expected;
}

/* The driver's function behind `hook`, resolving it on first use; NULL if none. */
static void *real_entry(enum sair_hook hook, bool may_load)
{
    void *p = atomic_load_explicit(&st.real[hook], memory_order_acquire);
    if (p != NULL) {
        return p;
    }
    return publish_real(hook, lookup_in_driver(sair_hooks[hook].name, may_load));
}

static void log_missing(enum sair_hook hook)
{
    stat_add(SAIR_STAT_missing_real, 1);
    if (!atomic_exchange(&st.logged_missing[hook], true)) {
        logf_always("no driver entry point for %s (driver '%s'); returning "
                    "CUDA_ERROR_NOT_FOUND",
                    sair_hooks[hook].name, st.cfg.driver);
    }
}

static void *helper_entry(enum sair_helper helper)
{
    void *p = atomic_load_explicit(&st.helper[helper], memory_order_acquire);
    if (p != NULL) {
        return p;
    }
    p = lookup_in_driver(sair_helper_names[helper], true);
    if (p == NULL) {
        if (!atomic_exchange(&st.logged_helper[helper], true)) {
            logf_always("no driver entry point for %s: graph launches of new execs cost 1 "
                        "token",
                        sair_helper_names[helper]);
        }
        return NULL;
    }
    atomic_store_explicit(&st.helper[helper], p, memory_order_release);
    return p;
}

/* ------------------------------------------------------------------------------------ */
/* The local bucket                                                                      */
/* ------------------------------------------------------------------------------------ */

static void poke_refill(void)
{
    if (!atomic_exchange(&st.refill_poked, true)) {
        sem_post(&st.refill_sem);
    }
}

/* One compare-and-swap: a token is there when the bucket holds at least one; the launch
 * subtracts its whole cost (a costly graph may leave debt). */
static bool try_take(int64_t cost)
{
    int64_t t = atomic_load_explicit(&st.tokens, memory_order_relaxed);
    while (t >= 1) {
        if (atomic_compare_exchange_weak_explicit(&st.tokens, &t, t - cost,
                                                  memory_order_acq_rel,
                                                  memory_order_relaxed)) {
            if (t - cost < atomic_load_explicit(&st.low_watermark, memory_order_relaxed)) {
                poke_refill();
            }
            return true;
        }
    }
    return false;
}

static void *refill_main(void *arg);

/* Start this process's refill thread if it has none (first launch, or first in a fork
 * child). On failure the shim fails open: it must never hang the program. */
static void ensure_refill_thread(void)
{
    pthread_mutex_lock(&st.lock);
    if (st.thread_running && st.thread_pid == getpid()) {
        pthread_mutex_unlock(&st.lock);
        return;
    }
    if (st.cfg.stats_path[0] != '\0' && page() == &st.local_page && st.init_pid != getpid()) {
        /* A fork child: map a page of its own when the path has "{pid}". */
        bool has_pid = false;
        char path[1100];
        if (stats_path_for_pid(path, sizeof(path), &has_pid) && has_pid) {
            struct sair_stats_page *file = map_stats_file();
            if (file != NULL) {
                atomic_store_explicit(&st.page, file, memory_order_release);
            }
        } else {
            LOG_ONCE(LOG_STATS_FORK, "fork child: SAIR_GPU_STATS_PATH has no {pid}, counters "
                                     "of this child stay in-process");
        }
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread never takes the app's signals */
    pthread_t tid;
    int rc = pthread_create(&tid, &attr, refill_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    st.thread_pid = getpid();
    if (rc == 0) {
        st.thread_running = true;
        pthread_mutex_unlock(&st.lock);
        return;
    }
    pthread_mutex_unlock(&st.lock);
    LOG_ONCE(LOG_THREAD, "cannot start the refill thread (%s): launches run unthrottled",
             strerror(rc));
    set_mode(SAIR_MODE_OPEN);
}

/* Hold mode, under st.lock: credit the local bucket at the last rate seen, for the time
 * since the last credit, up to hold_cap tokens (beyond that they are lost, as in Redis). */
static void hold_credit_locked(int64_t now)
{
    if (atomic_load(&st.mode) != SAIR_MODE_HOLD || now <= st.hold_last_ns) {
        return;
    }
    double add = st.hold_rate * (double)(now - st.hold_last_ns) / (double)NS_PER_S + st.hold_carry;
    st.hold_last_ns = now;
    int64_t local = atomic_load(&st.tokens);
    if (local >= st.hold_cap) {
        st.hold_carry = 0;
        return;
    }
    int64_t whole = (int64_t)floor(add);
    if (whole > st.hold_cap - local) {
        whole = st.hold_cap - local;
        add = (double)whole;
    }
    st.hold_carry = add - (double)whole;
    if (whole > 0) {
        int64_t after = atomic_fetch_add(&st.tokens, whole) + whole;
        stat_add(SAIR_STAT_hold_tokens, (uint64_t)whole);
        stat_set(SAIR_STAT_local_tokens, (uint64_t)after);
        pthread_cond_broadcast(&st.cv);
    }
}

/* Hold mode: how long until the next whole token accrues (bounded). */
static int64_t hold_tick_ns(void)
{
    int64_t us = st.hold_rate > 0 ? (int64_t)(1e6 / st.hold_rate) : HOLD_TICK_MAX_US;
    return clamp64(us, HOLD_TICK_MIN_US, HOLD_TICK_MAX_US) * NS_PER_US;
}

/* The slow path: no token in the local bucket. Waits until there is one, or until the
 * mode no longer throttles. */
static void wait_for_tokens(int64_t cost)
{
    ensure_refill_thread();
    int64_t start = now_ns();
    bool took = false;
    pthread_mutex_lock(&st.lock);
    atomic_fetch_add(&st.waiters, 1);
    for (;;) {
        int mode = atomic_load(&st.mode);
        if (mode_is_unthrottled(mode)) {
            break;
        }
        int64_t now = now_ns();
        hold_credit_locked(now);
        if (try_take(cost)) {
            took = true;
            break;
        }
        poke_refill();
        int64_t recheck = mode == SAIR_MODE_HOLD ? hold_tick_ns() : WAITER_RECHECK_MS * NS_PER_MS;
        struct timespec until = monotonic_deadline(now + recheck);
        pthread_cond_timedwait(&st.cv, &st.lock, &until);
    }
    atomic_fetch_sub(&st.waiters, 1);
    pthread_mutex_unlock(&st.lock);
    if (took) {
        stat_add(SAIR_STAT_tokens_used, (uint64_t)cost);
    }
    stat_add(SAIR_STAT_wait_ns, (uint64_t)(now_ns() - start));
    stat_add(SAIR_STAT_waits, 1);
}

/* Charge a launch through `hook` `cost` tokens. The fast path is one mode load and one
 * compare-and-swap (plus two relaxed counter increments). */
static void charge(enum sair_hook hook, int64_t cost)
{
    stat_add(sair_hooks[hook].counter, 1);
    if (cost <= 0 || mode_is_unthrottled(atomic_load_explicit(&st.mode, memory_order_acquire))) {
        return;
    }
    if (try_take(cost)) {
        stat_add(SAIR_STAT_tokens_used, (uint64_t)cost);
        return;
    }
    wait_for_tokens(cost);
}

static void wake_waiters(void)
{
    if (atomic_load(&st.waiters) > 0) {
        pthread_mutex_lock(&st.lock);
        pthread_cond_broadcast(&st.cv);
        pthread_mutex_unlock(&st.lock);
    }
}

static void add_tokens(int64_t n)
{
    int64_t now = atomic_fetch_add(&st.tokens, n) + n;
    stat_set(SAIR_STAT_local_tokens, (uint64_t)now);
    wake_waiters();
}

/* ------------------------------------------------------------------------------------ */
/* The refill thread                                                                     */
/* ------------------------------------------------------------------------------------ */

/* The refill thread's own variables (its stack; nobody else touches them). */
struct refill_ctx {
    redisContext *redis;
    int64_t batch;         /* tokens per Redis call at the last rate */
    double rate;           /* tokens/s last seen in Redis; < 0 before the first answer */
    int64_t next_take_ns;  /* not before: after a short grant Redis needs time to refill */
    int64_t next_connect_ns;
    int64_t last_ok_ns;    /* when Redis last answered a take */
    bool outage;           /* Redis unreachable since the last good answer */
};

/* Tokens for batch_ms at `rate`: enough that one Redis call serves several ms of launches,
 * few enough that a rate change shows within a batch. */
static int64_t batch_for_rate(double rate)
{
    if (rate < 0) {
        return clamp64(FIRST_BATCH, 1, st.cfg.max_batch);
    }
    double b = rate * (double)st.cfg.batch_ms / 1000.0;
    return clamp64(b >= (double)st.cfg.max_batch ? st.cfg.max_batch : llround(b), 1,
                   st.cfg.max_batch);
}

static void drop_connection(struct refill_ctx *rc)
{
    if (rc->redis != NULL) {
        atomic_store(&st.redis_fd, -1);
        redisFree(rc->redis);
        rc->redis = NULL;
    }
}

static void enter_outage(struct refill_ctx *rc, const char *why, int64_t now)
{
    stat_add(SAIR_STAT_redis_errors, 1);
    drop_connection(rc);
    rc->next_connect_ns = now + st.cfg.reconnect_ms * NS_PER_MS;
    if (rc->outage) {
        return;
    }
    rc->outage = true;
    if (st.cfg.fail_hold && rc->rate >= 0) {
        LOG_ONCE(LOG_HOLD, "Redis unreachable (%s): holding the last rate, %.3f tokens/s", why,
                 rc->rate);
        pthread_mutex_lock(&st.lock);
        st.hold_rate = rc->rate;
        st.hold_cap = clamp64((int64_t)ceil(rc->rate * HOLD_CAP_MS / 1000.0), rc->batch,
                              INT64_C(1) << 40);
        /* Tokens accrue from the last good answer: the time spent finding out that Redis
         * is gone (up to a timeout) is credited too. */
        st.hold_last_ns = rc->last_ok_ns > 0 ? rc->last_ok_ns : now;
        st.hold_carry = 0;
        set_mode(SAIR_MODE_HOLD);
        pthread_mutex_unlock(&st.lock);
    } else {
        if (st.cfg.fail_hold) {
            LOG_ONCE(LOG_HOLD_NO_RATE, "Redis unreachable (%s) before any rate was seen: "
                                       "running unthrottled (open) until it answers", why);
        } else {
            LOG_ONCE(LOG_OPEN, "Redis unreachable (%s): running unthrottled (open)", why);
        }
        set_mode(SAIR_MODE_OPEN);
    }
    wake_waiters();
}

static void try_connect(struct refill_ctx *rc, int64_t now)
{
    char err[256];
    rc->redis = sair_redis_connect(&st.cfg.target, st.cfg.timeout_ms, err, sizeof(err));
    if (rc->redis == NULL) {
        enter_outage(rc, err, now);
        return;
    }
    atomic_store(&st.redis_fd, rc->redis->fd);
}

/* One Redis take; sets when the next one may happen (rc->next_take_ns). */
static void take_once(struct refill_ctx *rc, int64_t now)
{
    int64_t local = atomic_load(&st.tokens);
    int64_t want = clamp64(rc->batch - local, 1, INT64_C(1) << 40);
    char err[256];
    struct sair_take_result r = sair_redis_take(rc->redis, st.cfg.key, want, err, sizeof(err));
    stat_add(SAIR_STAT_redis_calls, 1);
    if (r.status == SAIR_TAKE_ERROR) {
        enter_outage(rc, err, now_ns());
        return;
    }
    if (rc->outage) {
        rc->outage = false;
        LOG_ONCE(LOG_RECOVERED, "Redis answers again: throttling from its bucket");
    }
    if (r.status == SAIR_TAKE_UNCONFIGURED) {
        if (atomic_load(&st.mode) != SAIR_MODE_UNCONFIGURED) {
            LOG_ONCE(LOG_UNCONFIGURED, "bucket %s is not configured in Redis: running "
                                       "unthrottled until it is",
                     st.cfg.key);
            set_mode(SAIR_MODE_UNCONFIGURED);
            wake_waiters();
        }
        rc->next_take_ns = now + UNCONFIGURED_POLL_MS * NS_PER_MS;
        return;
    }
    rc->last_ok_ns = now_ns();
    rc->rate = (double)r.rate_milli / 1000.0;
    rc->batch = batch_for_rate(rc->rate);
    atomic_store(&st.low_watermark, (rc->batch + 1) / 2);
    stat_set(SAIR_STAT_batch, (uint64_t)rc->batch);
    stat_set(SAIR_STAT_rate_milli, (uint64_t)r.rate_milli);
    if (atomic_load(&st.mode) != SAIR_MODE_THROTTLED) {
        if (atomic_load(&st.mode) == SAIR_MODE_OPEN) {
            /* Launches ran free during the outage; start counting afresh. */
            atomic_store(&st.tokens, 0);
        }
        set_mode(SAIR_MODE_THROTTLED);
    }
    if (r.granted > 0) {
        stat_add(SAIR_STAT_refills, 1);
        stat_add(SAIR_STAT_tokens_granted, (uint64_t)r.granted);
        add_tokens(r.granted);
    } else {
        wake_waiters(); /* mode may have changed */
    }
    if (r.granted < want) {
        /* Redis is short. Ask again when what is missing has accrued there, but no later
         * than when as much as it just gave has accrued again: it may have given all its
         * burst, and tokens beyond the burst are lost. */
        int64_t missing = want - r.granted;
        int64_t again = r.granted == 0 ? 1 : missing < r.granted ? missing : r.granted;
        int64_t wait_us =
            rc->rate > 0 ? (int64_t)((double)again / rc->rate * 1e6) : SHORT_GRANT_MAX_US;
        rc->next_take_ns =
            now + clamp64(wait_us, SHORT_GRANT_MIN_US, SHORT_GRANT_MAX_US) * NS_PER_US;
    } else {
        rc->next_take_ns = now;
    }
}

static void *refill_main(void *arg)
{
    (void)arg;
    struct refill_ctx rc = {.batch = batch_for_rate(-1), .rate = -1};
    for (;;) {
        int64_t now = now_ns();
        atomic_store(&st.refill_poked, false);
        int mode = atomic_load(&st.mode);
        bool below = atomic_load(&st.tokens) < atomic_load(&st.low_watermark);
        bool want = below || atomic_load(&st.waiters) > 0 || mode == SAIR_MODE_STARTING ||
                    mode == SAIR_MODE_UNCONFIGURED || mode == SAIR_MODE_OPEN ||
                    mode == SAIR_MODE_HOLD;

        if (rc.redis == NULL && now >= rc.next_connect_ns) {
            try_connect(&rc, now);
        }
        if (rc.redis != NULL && want && now >= rc.next_take_ns) {
            take_once(&rc, now);
        }
        mode = atomic_load(&st.mode);
        now = now_ns();
        if (mode == SAIR_MODE_HOLD) {
            pthread_mutex_lock(&st.lock);
            hold_credit_locked(now);
            pthread_mutex_unlock(&st.lock);
        }

        /* Sleep until the next thing to do, or until a launch pokes. */
        int64_t wake = now + IDLE_WAKE_MS * NS_PER_MS;
        if (rc.redis == NULL && rc.next_connect_ns < wake) {
            wake = rc.next_connect_ns;
        }
        below = atomic_load(&st.tokens) < atomic_load(&st.low_watermark);
        if (rc.redis != NULL && (below || atomic_load(&st.waiters) > 0 ||
                                 mode == SAIR_MODE_UNCONFIGURED)) {
            if (rc.next_take_ns < wake) {
                wake = rc.next_take_ns;
            }
        }
        if (mode == SAIR_MODE_HOLD && now + hold_tick_ns() < wake) {
            wake = now + hold_tick_ns();
        }
        if (wake > now) {
            struct timespec until = monotonic_deadline(wake);
            while (sem_clockwait(&st.refill_sem, CLOCK_MONOTONIC, &until) != 0 && errno == EINTR) {
            }
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* Graph execs                                                                           */
/* ------------------------------------------------------------------------------------ */

static size_t graph_slot(CUgraphExec exec, size_t cap)
{
    uintptr_t h = (uintptr_t)exec;
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    return (size_t)h & (cap - 1);
}

/* Under graph_lock. Returns the slot holding exec, or SIZE_MAX. */
static size_t graph_find(CUgraphExec exec)
{
    if (st.graph_cap == 0) {
        return SIZE_MAX;
    }
    for (size_t i = graph_slot(exec, st.graph_cap), n = 0; n < st.graph_cap;
         i = (i + 1) & (st.graph_cap - 1), n++) {
        if (st.graph_tab[i].exec == NULL) {
            return SIZE_MAX;
        }
        if (st.graph_tab[i].exec == exec) {
            return i;
        }
    }
    return SIZE_MAX;
}

/* Under graph_lock. Returns false when out of memory. */
static bool graph_grow(void)
{
    size_t cap = st.graph_cap == 0 ? 64 : st.graph_cap * 2;
    if (st.graph_live * 4 < st.graph_cap) {
        cap = st.graph_cap; /* mostly tombstones: rehash at the same size */
    }
    struct sair_graph_entry *tab = calloc(cap, sizeof(*tab));
    if (tab == NULL) {
        return false;
    }
    for (size_t i = 0; i < st.graph_cap; i++) {
        CUgraphExec e = st.graph_tab[i].exec;
        if (e != NULL && e != SAIR_GRAPH_TOMBSTONE) {
            size_t j = graph_slot(e, cap);
            while (tab[j].exec != NULL) {
                j = (j + 1) & (cap - 1);
            }
            tab[j] = st.graph_tab[i];
        }
    }
    free(st.graph_tab);
    st.graph_tab = tab;
    st.graph_cap = cap;
    st.graph_used = st.graph_live;
    return true;
}

static void graph_remember(CUgraphExec exec, int64_t kernel_nodes)
{
    pthread_mutex_lock(&st.graph_lock);
    size_t i = graph_find(exec);
    if (i != SIZE_MAX) {
        st.graph_tab[i].kernel_nodes = kernel_nodes; /* exec address reused */
        pthread_mutex_unlock(&st.graph_lock);
        return;
    }
    if ((st.graph_used + 1) * 2 > st.graph_cap && !graph_grow()) {
        pthread_mutex_unlock(&st.graph_lock);
        LOG_ONCE(LOG_GRAPH_TABLE, "out of memory for the graph table: new graph execs cost "
                                  "1 token per launch");
        return;
    }
    size_t j = graph_slot(exec, st.graph_cap);
    while (st.graph_tab[j].exec != NULL && st.graph_tab[j].exec != SAIR_GRAPH_TOMBSTONE) {
        j = (j + 1) & (st.graph_cap - 1);
    }
    if (st.graph_tab[j].exec == NULL) {
        st.graph_used++;
    }
    st.graph_tab[j] = (struct sair_graph_entry){.exec = exec, .kernel_nodes = kernel_nodes};
    st.graph_live++;
    stat_set(SAIR_STAT_graph_execs_tracked, st.graph_live);
    pthread_mutex_unlock(&st.graph_lock);
}

static void graph_forget(CUgraphExec exec)
{
    pthread_mutex_lock(&st.graph_lock);
    size_t i = graph_find(exec);
    if (i != SIZE_MAX) {
        st.graph_tab[i].exec = SAIR_GRAPH_TOMBSTONE;
        st.graph_live--;
        stat_set(SAIR_STAT_graph_execs_tracked, st.graph_live);
    }
    pthread_mutex_unlock(&st.graph_lock);
}

/* Kernel nodes of exec, or -1 when the shim never saw it instantiated. */
static int64_t graph_kernel_nodes(CUgraphExec exec)
{
    pthread_mutex_lock(&st.graph_lock);
    size_t i = graph_find(exec);
    int64_t n = i == SIZE_MAX ? -1 : st.graph_tab[i].kernel_nodes;
    pthread_mutex_unlock(&st.graph_lock);
    return n;
}

/* Kernel nodes of a graph, child graphs included; -1 when the driver cannot tell.
 * A conditional node counts as one token: how often its body runs is decided on the GPU. */
static int64_t count_kernel_nodes(CUgraph graph, int depth)
{
    sair_pfn_cuGraphGetNodes get_nodes =
        (sair_pfn_cuGraphGetNodes)helper_entry(SAIR_HELPER_cuGraphGetNodes);
    sair_pfn_cuGraphNodeGetType get_type =
        (sair_pfn_cuGraphNodeGetType)helper_entry(SAIR_HELPER_cuGraphNodeGetType);
    if (get_nodes == NULL || get_type == NULL || depth > GRAPH_MAX_DEPTH) {
        return -1;
    }
    size_t n = 0;
    if (get_nodes(graph, NULL, &n) != CUDA_SUCCESS) {
        return -1;
    }
    if (n == 0) {
        return 0;
    }
    CUgraphNode *nodes = calloc(n, sizeof(*nodes));
    if (nodes == NULL || get_nodes(graph, nodes, &n) != CUDA_SUCCESS) {
        free(nodes);
        return -1;
    }
    int64_t total = 0;
    for (size_t i = 0; i < n && total >= 0; i++) {
        CUgraphNodeType type;
        if (get_type(nodes[i], &type) != CUDA_SUCCESS) {
            total = -1;
        } else if (type == CU_GRAPH_NODE_TYPE_KERNEL) {
            total += 1;
        } else if (type == CU_GRAPH_NODE_TYPE_CONDITIONAL) {
            LOG_ONCE(LOG_CONDITIONAL_NODE, "conditional graph node: charged 1 token per "
                                           "launch, whatever its body runs");
            total += 1;
        } else if (type == CU_GRAPH_NODE_TYPE_GRAPH) {
            sair_pfn_cuGraphChildGraphNodeGetGraph child_of =
                (sair_pfn_cuGraphChildGraphNodeGetGraph)helper_entry(
                    SAIR_HELPER_cuGraphChildGraphNodeGetGraph);
            CUgraph child = NULL;
            int64_t c = -1;
            if (child_of != NULL && child_of(nodes[i], &child) == CUDA_SUCCESS) {
                c = count_kernel_nodes(child, depth + 1);
            }
            total = c < 0 ? -1 : total + c;
        }
    }
    free(nodes);
    return total;
}

static void after_instantiate(CUresult r, CUgraphExec *exec, CUgraph graph)
{
    if (r != CUDA_SUCCESS || exec == NULL || *exec == NULL) {
        return;
    }
    int64_t n = count_kernel_nodes(graph, 0);
    if (n < 0) {
        LOG_ONCE(LOG_GRAPH_COUNT, "cannot count a graph's kernel nodes: its launches cost 1 "
                                  "token each");
        return;
    }
    graph_remember(*exec, n);
}

/* Tokens for one launch of exec: its kernel nodes, or 1 if it is unknown. */
static int64_t graph_cost(CUgraphExec exec)
{
    int64_t n = graph_kernel_nodes(exec);
    if (n < 0) {
        stat_add(SAIR_STAT_graph_launches_untracked, 1);
        return 1;
    }
    stat_add(SAIR_STAT_graph_kernel_nodes, (uint64_t)n);
    return n;
}

/* ------------------------------------------------------------------------------------ */
/* Handing out wrappers (dlsym, cuGetProcAddress)                                        */
/* ------------------------------------------------------------------------------------ */

static int hook_by_name(const char *name)
{
    for (int i = 0; i < SAIR_HOOK_COUNT; i++) {
        if (strcmp(sair_hooks[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

/* The row of sair_proc_versions for a cuGetProcAddress request, or -1. */
static int hook_by_proc(const char *symbol, int version, cuuint64_t flags)
{
    bool want_ptsz = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    int best = -1;
    for (size_t i = 0; i < SAIR_PROC_VERSION_COUNT; i++) {
        const struct sair_proc_version *row = &sair_proc_versions[i];
        if (row->min_version > version || strcmp(row->proc_name, symbol) != 0) {
            continue;
        }
        if (best < 0) {
            best = (int)i;
            continue;
        }
        const struct sair_proc_version *cur = &sair_proc_versions[best];
        bool row_match = row->ptsz == want_ptsz, cur_match = cur->ptsz == want_ptsz;
        if ((row_match && !cur_match) ||
            (row_match == cur_match && row->min_version > cur->min_version)) {
            best = (int)i;
        }
    }
    return best < 0 ? -1 : (int)sair_proc_versions[best].hook;
}

/*
 * The driver answered `p` for a lookup that maps to `hook`: return what the caller gets.
 *   - p is one of ours (a driver without -Bsymbolic resolved its own name through the
 *     global scope, where the shim comes first): hand it back unchanged and never record it
 *     as real; the real one is looked up in the driver's own handle at first call.
 *   - p is the real entry point of a sibling variant (a DEFAULT-flag request answered with
 *     the _ptsz function): hand out that sibling's wrapper.
 *   - otherwise p becomes the real entry point (if none is known yet) and the caller gets
 *     our wrapper.
 */
static void *hand_out(enum sair_hook hook, void *p, enum sair_stat counter, bool may_load)
{
    if (is_our_wrapper(p)) {
        if (counter == SAIR_STAT_wrapped_proc_address) {
            stat_add(SAIR_STAT_recursion_avoided, 1);
        }
        return p;
    }
    void *real = real_entry(hook, may_load);
    if (real != NULL && real != p) {
        for (int i = 0; i < SAIR_HOOK_COUNT; i++) {
            if (i != (int)hook && real_entry((enum sair_hook)i, may_load) == p) {
                stat_add(counter, 1);
                return sair_hooks[i].wrapper;
            }
        }
        LOG_ONCE(LOG_POINTER_MISMATCH, "the driver answered %p for %s, its exported symbol is "
                                       "%p; the wrapper calls the exported one",
                 p, sair_hooks[hook].name, real);
    } else if (real == NULL) {
        publish_real(hook, p);
    }
    stat_add(counter, 1);
    return sair_hooks[hook].wrapper;
}

/* SAIR_GPU_TRACE=1: one line per lookup of a hooked name (what the caller got). */
static void trace_lookup(const char *via, const char *symbol, int version, cuuint64_t flags,
                         const void *driver_answer, const void *handed_out)
{
    if (!st.cfg.trace) {
        return;
    }
    const char *got = "the driver's own pointer";
    for (int i = 0; i < SAIR_HOOK_COUNT; i++) {
        if (sair_hooks[i].wrapper == handed_out) {
            got = sair_hooks[i].name;
        }
    }
    logf_always("trace: %s(\"%s\", version %d, flags %llu): driver %p -> %s%s", via, symbol,
                version, (unsigned long long)flags, driver_answer,
                handed_out == driver_answer && is_our_wrapper(handed_out) ? "(already ours) " : "",
                got);
}

static void *swap_proc_address(const char *symbol, int version, cuuint64_t flags, void *p)
{
    if (symbol == NULL || p == NULL || symbol[0] != 'c' || symbol[1] != 'u') {
        return p;
    }
    int hook = hook_by_proc(symbol, version, flags);
    if (hook < 0) {
        return p;
    }
    void *out = hand_out((enum sair_hook)hook, p, SAIR_STAT_wrapped_proc_address, true);
    trace_lookup("cuGetProcAddress", symbol, version, flags, p, out);
    return out;
}

SAIR_EXPORT void *dlsym(void *handle, const char *name)
{
    void *(*dl)(void *, const char *) = real_dlsym();
    if (dl == NULL) {
        return NULL; /* no libc dlsym found: nothing sensible to return */
    }
    void *p = dl(handle, name);
    if (p == NULL || name[0] != 'c' || name[1] != 'u') {
        return p;
    }
    int hook = hook_by_name(name);
    if (hook < 0) {
        return p;
    }
    ensure_init();
    /* Inside dlsym: never load a library here, only look at one already loaded. */
    void *out = hand_out((enum sair_hook)hook, p, SAIR_STAT_wrapped_dlsym, false);
    trace_lookup("dlsym", name, 0, 0, p, out);
    return out;
}

/* ------------------------------------------------------------------------------------ */
/* The wrappers: the driver's ABI names                                                  */
/* ------------------------------------------------------------------------------------ */

SAIR_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                      cuuint64_t flags)
{
    ensure_init();
    sair_pfn_cuGetProcAddress real =
        (sair_pfn_cuGetProcAddress)real_entry(SAIR_HOOK_cuGetProcAddress, true);
    if (real == NULL) {
        log_missing(SAIR_HOOK_cuGetProcAddress);
        return CUDA_ERROR_NOT_FOUND;
    }
    CUresult r = real(symbol, pfn, cudaVersion, flags);
    if (r == CUDA_SUCCESS && pfn != NULL) {
        *pfn = swap_proc_address(symbol, cudaVersion, flags, *pfn);
    }
    return r;
}

SAIR_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                         cuuint64_t flags,
                                         CUdriverProcAddressQueryResult *symbolStatus)
{
    ensure_init();
    sair_pfn_cuGetProcAddress_v2 real =
        (sair_pfn_cuGetProcAddress_v2)real_entry(SAIR_HOOK_cuGetProcAddress_v2, true);
    if (real == NULL) {
        log_missing(SAIR_HOOK_cuGetProcAddress_v2);
        return CUDA_ERROR_NOT_FOUND;
    }
    CUresult r = real(symbol, pfn, cudaVersion, flags, symbolStatus);
    if (r == CUDA_SUCCESS && pfn != NULL &&
        (symbolStatus == NULL || *symbolStatus == CU_GET_PROC_ADDRESS_SUCCESS)) {
        *pfn = swap_proc_address(symbol, cudaVersion, flags, *pfn);
    }
    return r;
}

/* The classic launch: same signature for the legacy and the per-thread stream variant. */
static CUresult launch_kernel(enum sair_hook hook, CUfunction f, unsigned int gx,
                              unsigned int gy, unsigned int gz, unsigned int bx,
                              unsigned int by, unsigned int bz, unsigned int shared,
                              CUstream stream, void **params, void **extra)
{
    ensure_init();
    sair_pfn_cuLaunchKernel real = (sair_pfn_cuLaunchKernel)real_entry(hook, true);
    if (real == NULL) {
        log_missing(hook);
        return CUDA_ERROR_NOT_FOUND;
    }
    charge(hook, 1);
    return real(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra);
}

SAIR_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                    unsigned int gridDimZ, unsigned int blockDimX,
                                    unsigned int blockDimY, unsigned int blockDimZ,
                                    unsigned int sharedMemBytes, CUstream hStream,
                                    void **kernelParams, void **extra)
{
    return launch_kernel(SAIR_HOOK_cuLaunchKernel, f, gridDimX, gridDimY, gridDimZ, blockDimX,
                         blockDimY, blockDimZ, sharedMemBytes, hStream, kernelParams, extra);
}

SAIR_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                         unsigned int gridDimY, unsigned int gridDimZ,
                                         unsigned int blockDimX, unsigned int blockDimY,
                                         unsigned int blockDimZ, unsigned int sharedMemBytes,
                                         CUstream hStream, void **kernelParams, void **extra)
{
    return launch_kernel(SAIR_HOOK_cuLaunchKernel_ptsz, f, gridDimX, gridDimY, gridDimZ,
                         blockDimX, blockDimY, blockDimZ, sharedMemBytes, hStream, kernelParams,
                         extra);
}

static CUresult launch_kernel_ex(enum sair_hook hook, const CUlaunchConfig *config,
                                 CUfunction f, void **params, void **extra)
{
    ensure_init();
    sair_pfn_cuLaunchKernelEx real = (sair_pfn_cuLaunchKernelEx)real_entry(hook, true);
    if (real == NULL) {
        log_missing(hook);
        return CUDA_ERROR_NOT_FOUND;
    }
    charge(hook, 1);
    return real(config, f, params, extra);
}

SAIR_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                      void **kernelParams, void **extra)
{
    return launch_kernel_ex(SAIR_HOOK_cuLaunchKernelEx, config, f, kernelParams, extra);
}

SAIR_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                           void **kernelParams, void **extra)
{
    return launch_kernel_ex(SAIR_HOOK_cuLaunchKernelEx_ptsz, config, f, kernelParams, extra);
}

static CUresult launch_cooperative(enum sair_hook hook, CUfunction f, unsigned int gx,
                                   unsigned int gy, unsigned int gz, unsigned int bx,
                                   unsigned int by, unsigned int bz, unsigned int shared,
                                   CUstream stream, void **params)
{
    ensure_init();
    sair_pfn_cuLaunchCooperativeKernel real =
        (sair_pfn_cuLaunchCooperativeKernel)real_entry(hook, true);
    if (real == NULL) {
        log_missing(hook);
        return CUDA_ERROR_NOT_FOUND;
    }
    charge(hook, 1);
    return real(f, gx, gy, gz, bx, by, bz, shared, stream, params);
}

SAIR_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX,
                                               unsigned int gridDimY, unsigned int gridDimZ,
                                               unsigned int blockDimX, unsigned int blockDimY,
                                               unsigned int blockDimZ,
                                               unsigned int sharedMemBytes, CUstream hStream,
                                               void **kernelParams)
{
    return launch_cooperative(SAIR_HOOK_cuLaunchCooperativeKernel, f, gridDimX, gridDimY,
                              gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                              hStream, kernelParams);
}

SAIR_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                                    unsigned int gridDimY,
                                                    unsigned int gridDimZ,
                                                    unsigned int blockDimX,
                                                    unsigned int blockDimY,
                                                    unsigned int blockDimZ,
                                                    unsigned int sharedMemBytes,
                                                    CUstream hStream, void **kernelParams)
{
    return launch_cooperative(SAIR_HOOK_cuLaunchCooperativeKernel_ptsz, f, gridDimX, gridDimY,
                              gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                              hStream, kernelParams);
}

static CUresult graph_launch(enum sair_hook hook, CUgraphExec exec, CUstream stream)
{
    ensure_init();
    sair_pfn_cuGraphLaunch real = (sair_pfn_cuGraphLaunch)real_entry(hook, true);
    if (real == NULL) {
        log_missing(hook);
        return CUDA_ERROR_NOT_FOUND;
    }
    charge(hook, graph_cost(exec));
    return real(exec, stream);
}

SAIR_EXPORT CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    return graph_launch(SAIR_HOOK_cuGraphLaunch, hGraphExec, hStream);
}

SAIR_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    return graph_launch(SAIR_HOOK_cuGraphLaunch_ptsz, hGraphExec, hStream);
}

static CUresult graph_instantiate_log(enum sair_hook hook, CUgraphExec *exec, CUgraph graph,
                                      CUgraphNode *err_node, char *log, size_t log_size)
{
    ensure_init();
    sair_pfn_cuGraphInstantiate real = (sair_pfn_cuGraphInstantiate)real_entry(hook, true);
    if (real == NULL) {
        log_missing(hook);
        return CUDA_ERROR_NOT_FOUND;
    }
    CUresult r = real(exec, graph, err_node, log, log_size);
    after_instantiate(r, exec, graph);
    return r;
}

SAIR_EXPORT CUresult cuGraphInstantiate(CUgraphExec *phGraphExec, CUgraph hGraph,
                                        CUgraphNode *phErrorNode, char *logBuffer,
                                        size_t bufferSize)
{
    return graph_instantiate_log(SAIR_HOOK_cuGraphInstantiate, phGraphExec, hGraph,
                                 phErrorNode, logBuffer, bufferSize);
}

SAIR_EXPORT CUresult cuGraphInstantiate_v2(CUgraphExec *phGraphExec, CUgraph hGraph,
                                           CUgraphNode *phErrorNode, char *logBuffer,
                                           size_t bufferSize)
{
    return graph_instantiate_log(SAIR_HOOK_cuGraphInstantiate_v2, phGraphExec, hGraph,
                                 phErrorNode, logBuffer, bufferSize);
}

SAIR_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph,
                                                 unsigned long long flags)
{
    ensure_init();
    sair_pfn_cuGraphInstantiateWithFlags real = (sair_pfn_cuGraphInstantiateWithFlags)real_entry(
        SAIR_HOOK_cuGraphInstantiateWithFlags, true);
    if (real == NULL) {
        log_missing(SAIR_HOOK_cuGraphInstantiateWithFlags);
        return CUDA_ERROR_NOT_FOUND;
    }
    CUresult r = real(phGraphExec, hGraph, flags);
    after_instantiate(r, phGraphExec, hGraph);
    return r;
}

static CUresult graph_instantiate_params(enum sair_hook hook, CUgraphExec *exec, CUgraph graph,
                                         CUDA_GRAPH_INSTANTIATE_PARAMS *params)
{
    ensure_init();
    sair_pfn_cuGraphInstantiateWithParams real =
        (sair_pfn_cuGraphInstantiateWithParams)real_entry(hook, true);
    if (real == NULL) {
        log_missing(hook);
        return CUDA_ERROR_NOT_FOUND;
    }
    CUresult r = real(exec, graph, params);
    after_instantiate(r, exec, graph);
    return r;
}

SAIR_EXPORT CUresult cuGraphInstantiateWithParams(CUgraphExec *phGraphExec, CUgraph hGraph,
                                                  CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams)
{
    return graph_instantiate_params(SAIR_HOOK_cuGraphInstantiateWithParams, phGraphExec, hGraph,
                                    instantiateParams);
}

SAIR_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(
    CUgraphExec *phGraphExec, CUgraph hGraph, CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams)
{
    return graph_instantiate_params(SAIR_HOOK_cuGraphInstantiateWithParams_ptsz, phGraphExec,
                                    hGraph, instantiateParams);
}

SAIR_EXPORT CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
{
    ensure_init();
    sair_pfn_cuGraphExecDestroy real =
        (sair_pfn_cuGraphExecDestroy)real_entry(SAIR_HOOK_cuGraphExecDestroy, true);
    if (real == NULL) {
        log_missing(SAIR_HOOK_cuGraphExecDestroy);
        return CUDA_ERROR_NOT_FOUND;
    }
    graph_forget(hGraphExec);
    return real(hGraphExec);
}

/* ------------------------------------------------------------------------------------ */
/* Stats API                                                                             */
/* ------------------------------------------------------------------------------------ */

SAIR_EXPORT int sair_intercept_stats(struct sair_intercept_stats *out)
{
    if (out == NULL) {
        return -1;
    }
    ensure_init();
    struct sair_stats_page *p = page();
    uint64_t *dst = (uint64_t *)out;
    for (int i = 0; i < SAIR_STATS_FIELD_COUNT; i++) {
        dst[i] = atomic_load_explicit(&p->v[i], memory_order_relaxed);
    }
    return 0;
}
