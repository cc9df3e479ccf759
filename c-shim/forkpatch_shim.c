/*
 * forkpatch_shim.c - jemalloc extent hooks and Redis glue for forkpatch.
 * See forkpatch_shim.h for what each part does and why.
 */
#include "server.h"
#include "forkpatch.h"
#include "forkpatch_shim.h"

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(USE_JEMALLOC)
#error "forkpatch needs Redis built with its bundled jemalloc (MALLOC=jemalloc)"
#endif

/* oversize_threshold:0 keeps huge allocations in the ordinary arenas:
 * jemalloc would otherwise create a dedicated huge arena on first use, after
 * our hooks are installed, and put every allocation >= 8 MiB outside the
 * region.
 * narenas:1: jemalloc's atfork handlers lock and unlock every mutex of every
 * arena around fork(). Arena metadata created after the hooks lives in the
 * region, which fork() has just switched to a fresh private mapping, so each
 * metadata page they touch costs a page fault inside the fork stall
 * (measured: 0.5-0.8 ms with the default 4 arenas per CPU). Redis allocates
 * almost only from its main thread. Keeping that metadata in anonymous
 * memory instead costs more: fork() must then copy its page tables, and it
 * grows with the dataset (~40 MB for a 1.1 GB dataset, +0.5 ms per fork). */
const char *je_malloc_conf = "oversize_threshold:0,narenas:1";

#define FP_PAGE 4096

/* jemalloc's default hooks, used for every extent outside the region. */
static extent_hooks_t *fp_default;
static int fp_hooks_installed;
static int fp_init_done;
static int fp_degraded_logged;

static int inRegion(void *p) { return forkpatch_region_contains(p); }

static void *fpExtentAlloc(extent_hooks_t *h, void *new_addr, size_t size, size_t alignment,
                           bool *zero, bool *commit, unsigned arena_ind) {
    (void)h;
    if (new_addr == NULL) {
        void *p = forkpatch_region_alloc(size, alignment < FP_PAGE ? FP_PAGE : alignment);
        if (p) {
            *zero = true; /* fresh region pages read as zero */
            *commit = true;
            return p;
        }
        /* Region full in the parent: fail like a failing mmap (OOM). */
        if (!forkpatch_in_child()) return NULL;
    } else if (inRegion(new_addr)) {
        return NULL; /* never asked with retain; refuse rather than guess */
    }
    return fp_default->alloc(fp_default, new_addr, size, alignment, zero, commit, arena_ind);
}

static bool fpExtentDalloc(extent_hooks_t *h, void *addr, size_t size, bool committed,
                           unsigned arena_ind) {
    (void)h;
    if (inRegion(addr)) return true; /* opt out: jemalloc retains it */
    if (!fp_default->dalloc) return true;
    return fp_default->dalloc(fp_default, addr, size, committed, arena_ind);
}

static void fpExtentDestroy(extent_hooks_t *h, void *addr, size_t size, bool committed,
                            unsigned arena_ind) {
    (void)h;
    if (inRegion(addr)) {
        forkpatch_region_purge(addr, size); /* best effort; refused = kept */
        return;
    }
    if (fp_default->destroy) fp_default->destroy(fp_default, addr, size, committed, arena_ind);
}

static bool fpExtentCommit(extent_hooks_t *h, void *addr, size_t size, size_t offset,
                           size_t length, unsigned arena_ind) {
    (void)h;
    if (inRegion(addr)) return false; /* region memory is always committed */
    if (!fp_default->commit) return true;
    return fp_default->commit(fp_default, addr, size, offset, length, arena_ind);
}

static bool fpExtentDecommit(extent_hooks_t *h, void *addr, size_t size, size_t offset,
                             size_t length, unsigned arena_ind) {
    (void)h;
    if (inRegion(addr)) return true; /* refuse: stays committed */
    if (!fp_default->decommit) return true;
    return fp_default->decommit(fp_default, addr, size, offset, length, arena_ind);
}

static bool fpExtentPurgeLazy(extent_hooks_t *h, void *addr, size_t size, size_t offset,
                              size_t length, unsigned arena_ind) {
    (void)h;
    if (inRegion(addr)) return true; /* jemalloc falls back to a forced purge */
    if (!fp_default->purge_lazy) return true;
    return fp_default->purge_lazy(fp_default, addr, size, offset, length, arena_ind);
}

static bool fpExtentPurgeForced(extent_hooks_t *h, void *addr, size_t size, size_t offset,
                                size_t length, unsigned arena_ind) {
    (void)h;
    if (inRegion(addr))
        return !forkpatch_region_purge((char *)addr + offset, length);
    if (!fp_default->purge_forced) return true;
    return fp_default->purge_forced(fp_default, addr, size, offset, length, arena_ind);
}

static bool fpExtentSplit(extent_hooks_t *h, void *addr, size_t size, size_t size_a,
                          size_t size_b, bool committed, unsigned arena_ind) {
    (void)h;
    if (inRegion(addr)) return false;
    if (!fp_default->split) return true;
    return fp_default->split(fp_default, addr, size, size_a, size_b, committed, arena_ind);
}

static bool fpExtentMerge(extent_hooks_t *h, void *addr_a, size_t size_a, void *addr_b,
                          size_t size_b, bool committed, unsigned arena_ind) {
    (void)h;
    int ra = inRegion(addr_a), rb = inRegion(addr_b);
    if (ra && rb) return false;
    if (ra || rb) return true; /* never join region and anonymous memory */
    if (!fp_default->merge) return true;
    return fp_default->merge(fp_default, addr_a, size_a, addr_b, size_b, committed, arena_ind);
}

static extent_hooks_t fp_hooks = {
    fpExtentAlloc,     fpExtentDalloc,      fpExtentDestroy,
    fpExtentCommit,    fpExtentDecommit,    fpExtentPurgeLazy,
    fpExtentPurgeForced, fpExtentSplit,     fpExtentMerge,
};

/* Installs the hooks on every automatic arena (initialising those not yet
 * used, so their metadata lands in the region too). */
static int fpInstallHooks(char *err, size_t errlen) {
    size_t sz = sizeof(fp_default);
    if (je_mallctl("arena.0.extent_hooks", &fp_default, &sz, NULL, 0) != 0) {
        snprintf(err, errlen, "cannot read jemalloc's default extent hooks");
        return 0;
    }
    unsigned narenas = 0;
    sz = sizeof(narenas);
    if (je_mallctl("opt.narenas", &narenas, &sz, NULL, 0) != 0 || narenas == 0) {
        snprintf(err, errlen, "cannot read opt.narenas");
        return 0;
    }
    for (unsigned i = 0; i < narenas; i++) {
        char name[64];
        extent_hooks_t *h = &fp_hooks;
        snprintf(name, sizeof(name), "arena.%u.extent_hooks", i);
        if (je_mallctl(name, NULL, NULL, &h, sizeof(h)) != 0) {
            snprintf(err, errlen, "cannot install extent hooks on arena %u", i);
            /* Arenas already switched keep working: the hooks delegate
             * everything outside the region to the defaults. */
            return 0;
        }
    }
    return 1;
}

static size_t fpReserveBytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES);
    size_t ram = pages > 0 ? (size_t)pages * FP_PAGE : 0;
    size_t reserve = (size_t)64 << 30;
    if (ram * 2 > reserve) reserve = ram * 2;
    return reserve;
}

void fpInit(void) {
    if (fp_init_done || !server.async_fork) return;
    fp_init_done = 1;
    /* Sentinel forks script children with plain fork() while their argv
     * lives in the heap: keep its heap anonymous. */
    if (server.sentinel_mode) {
        serverLog(LL_NOTICE, "async-fork: not used in sentinel mode");
        return;
    }
    if (!forkpatch_init(fpReserveBytes(), 0)) {
        serverLog(LL_WARNING, "async-fork: unavailable (%s); using stock fork()",
                  forkpatch_disabled_reason());
        return;
    }
    char err[128];
    if (!fpInstallHooks(err, sizeof(err))) {
        serverLog(LL_WARNING, "async-fork: %s; using stock fork()", err);
        forkpatch_set_async(0);
        return;
    }
    fp_hooks_installed = 1;
    serverLog(LL_NOTICE, "async-fork: active (heap in a memfd region, O(1) fork)");
    /* The engine's fold thread does bio-like background work (page-table
     * walks and teardown of milliseconds): keep it where bio threads run. */
    if (server.bio_cpulist) {
        if (forkpatch_set_thread_cpulist(server.bio_cpulist) == 0)
            serverLog(LL_NOTICE, "async-fork: fold thread on bio_cpulist %s", server.bio_cpulist);
        else
            serverLog(LL_WARNING, "async-fork: cannot pin the fold thread to bio_cpulist %s: %s",
                      server.bio_cpulist, strerror(errno));
    }
    /* Apply functions do not run for the config file's values. */
    int prio = server.async_fork_rt_priority;
    if (forkpatch_set_rt_priority(prio) == 0) {
        if (prio > 0)
            serverLog(LL_NOTICE, "async-fork: fault handler runs SCHED_FIFO at priority %d", prio);
    } else {
        serverLog(LL_WARNING, "async-fork: fault handler stays at normal priority "
                  "(async-fork-rt-priority %d: %s); first writes during a fold-back "
                  "may wait for a busy CPU", prio, strerror(errno));
    }
}

static void fpLogDegradedOnce(void) {
    const char *why;
    if (fp_degraded_logged || !(why = forkpatch_degraded_reason())) return;
    fp_degraded_logged = 1;
    serverLog(LL_WARNING, "async-fork: %s; using stock fork() from now on", why);
}

pid_t fpFork(void) {
    fpLogDegradedOnce();
    return forkpatch_fork();
}

int fpForkDeferred(void) {
    return forkpatch_busy();
}

void fpChildReaped(pid_t pid) {
    if (pid > 0) forkpatch_child_exited(pid);
}

int fpApplyConfig(const char **err) {
    (void)err;
    if (!fp_init_done) {
        fpInit(); /* extents already allocated stay anonymous */
    } else if (fp_hooks_installed) {
        forkpatch_set_async(server.async_fork);
    }
    return 1;
}

int fpApplyRtPriority(const char **err) {
    if (!fp_init_done) return 1; /* fpInit applies it */
    if (forkpatch_set_rt_priority(server.async_fork_rt_priority) != 0) {
        *err = errno == EPERM ? "cannot set a real-time priority (needs CAP_SYS_NICE or RLIMIT_RTPRIO)"
                              : "cannot set the fault handler's priority";
        return 0;
    }
    return 1;
}

/* RssShmem from /proc/self/status, in bytes (0 if unreadable). */
static size_t fpRssShmem(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "RssShmem:", 9)) {
            kb = strtoul(line + 9, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb * 1024;
}

size_t fpAdjustRss(size_t rss) {
    if (!fp_hooks_installed) return rss;
    size_t shmem = fpRssShmem();
    if (shmem > rss) shmem = rss;
    return rss - shmem + (size_t)forkpatch_region_resident_bytes();
}

size_t fpAdjustCow(size_t child_cow) {
    if (!fp_hooks_installed) return child_cow;
    return child_cow + forkpatch_overlay_bytes_cached();
}

/* In a child, /proc/self/smaps counts every memfd page the child maps
 * alone as Private_Dirty (shmem pages are always dirty), although nothing
 * was copied. For the heap mapping count only the child's own
 * copied-on-write pages (Anonymous); elsewhere keep Private_Dirty, as
 * zmalloc_get_private_dirty() does. */
size_t fpChildPrivateDirty(void) {
    if (!fp_hooks_installed) return zmalloc_get_private_dirty(-1);
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[1024];
    size_t total = 0;
    int in_heap = 0;
    while (fgets(line, sizeof(line), f)) {
        char c = line[0];
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) {
            unsigned long start = strtoul(line, NULL, 16);
            in_heap = forkpatch_region_contains((void *)start);
        } else if (!in_heap && !strncmp(line, "Private_Dirty:", 14)) {
            total += strtoul(line + 14, NULL, 10) * 1024;
        } else if (in_heap && !strncmp(line, "Anonymous:", 10)) {
            total += strtoul(line + 10, NULL, 10) * 1024;
        }
    }
    fclose(f);
    return total;
}

static const char *fpStateName(uint32_t st) {
    switch (st) {
    case FORKPATCH_STATE_IDLE: return "idle";
    case FORKPATCH_STATE_SWITCHING: return "switching";
    case FORKPATCH_STATE_SNAPSHOT: return "snapshot";
    case FORKPATCH_STATE_FOLDING: return "folding";
    case FORKPATCH_STATE_DEGRADED: return "degraded";
    case FORKPATCH_STATE_STOCK: return "stock";
    default: return "unknown";
    }
}

/* INFO values are single-line: no CR/LF in reasons. */
static sds fpCatReason(sds info, const char *why) {
    for (const char *p = why; *p; p++) {
        char c = (*p == '\r' || *p == '\n') ? ' ' : *p;
        info = sdscatlen(info, &c, 1);
    }
    return info;
}

sds fpInfoPersistence(sds info) {
    struct forkpatch_stats s;
    forkpatch_stats(&s);
    int active = fp_hooks_installed && server.async_fork &&
                 s.state != FORKPATCH_STATE_DEGRADED && s.state != FORKPATCH_STATE_STOCK;
    info = sdscatprintf(info, "async_fork:%s\r\nasync_fork_active:%d\r\nasync_fork_status:",
                        server.async_fork ? "yes" : "no", active);
    fpLogDegradedOnce();
    if (active) {
        info = sdscat(info, "ok");
    } else if (!server.async_fork) {
        info = sdscat(info, "disabled by config");
    } else if (!fp_init_done) {
        info = sdscat(info, "not initialised");
    } else if (!forkpatch_active()) {
        info = fpCatReason(info, forkpatch_disabled_reason());
    } else if (forkpatch_degraded_reason()) {
        info = fpCatReason(info, forkpatch_degraded_reason());
    } else if (!fp_hooks_installed) {
        info = sdscat(info, "jemalloc extent hooks could not be installed");
    } else {
        info = sdscat(info, "switching back from stock fork");
    }
    info = sdscatprintf(info,
        "\r\n"
        "async_fork_state:%s\r\n"
        "async_fork_last_switch_usec:%llu\r\n"
        "async_fork_last_fold_usec:%llu\r\n"
        "async_fork_last_fold_final_usec:%llu\r\n"
        "async_fork_last_fold_final_cpu_usec:%llu\r\n"
        "async_fork_last_fold_final_pages:%llu\r\n"
        "async_fork_last_fold_lock_wait_usec:%llu\r\n"
        "async_fork_last_overlay_bytes:%llu\r\n"
        "async_fork_current_overlay_bytes:%zu\r\n"
        "async_fork_folds:%llu\r\n"
        "async_fork_fold_errors:%llu\r\n"
        "async_fork_region_bytes:%llu\r\n"
        "async_fork_rt_priority:%d\r\n",
        fpStateName(s.state),
        (unsigned long long)s.last_switch_usec,
        (unsigned long long)s.last_fold_usec,
        (unsigned long long)s.last_fold_final_usec,
        (unsigned long long)s.last_fold_final_cpu_usec,
        (unsigned long long)s.last_fold_final_pages,
        (unsigned long long)s.last_fold_lock_wait_usec,
        (unsigned long long)s.last_overlay_bytes,
        forkpatch_overlay_bytes_cached(),
        (unsigned long long)s.folds,
        (unsigned long long)s.fold_errors,
        (unsigned long long)s.region_bytes,
        forkpatch_rt_priority());
    return info;
}
