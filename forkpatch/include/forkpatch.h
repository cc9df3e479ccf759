/*
 * forkpatch.h - C ABI of the forkpatch async-fork engine (libforkpatch.a).
 *
 * The engine keeps the heap in a memfd mapped shared at a reserved,
 * 1 GiB-aligned address range. forkpatch_fork() replaces fork(): it switches
 * the heap to a private copy-on-write view of the memfd in O(1) (page tables
 * are moved, not copied) and forks; the child sees the heap as of the fork
 * instant. After the child has been reaped, forkpatch_child_exited() starts a
 * background fold that copies the parent's copied-on-write pages back into
 * the memfd and makes the heap shared again. Writers never stop, except
 * during the fold's short final step (a write fault then waits for it).
 *
 * Only memory obtained from forkpatch_region_alloc() gets this treatment;
 * everything else is forked the ordinary way.
 *
 * Requirements probed by forkpatch_init(): Linux >= 6.7 (PAGEMAP_SCAN),
 * userfaultfd with write-protect and minor faults on shmem, and a
 * userfaultfd that sees kernel-mode faults (CAP_SYS_PTRACE,
 * vm.unprivileged_userfaultfd=1, or access to /dev/userfaultfd). If any is
 * missing the engine stays inactive, forkpatch_fork() is plain fork() and
 * forkpatch_disabled_reason() says why.
 *
 * Threads: any function may be called from any thread once
 * forkpatch_init() has returned. The engine runs two threads of its own
 * (a userfaultfd handler and a fold/cleanup worker); the handler never
 * allocates or takes locks, so threads blocked in a fault may hold any lock.
 * The fold thread allocates only with the system malloc, never while
 * writers are parked.
 */
#ifndef FORKPATCH_H
#define FORKPATCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Values of forkpatch_stats.state. */
#define FORKPATCH_STATE_IDLE 0      /* heap shared, no snapshot */
#define FORKPATCH_STATE_SWITCHING 1 /* inside forkpatch_fork() */
#define FORKPATCH_STATE_SNAPSHOT 2  /* child alive, heap private */
#define FORKPATCH_STATE_FOLDING 3   /* child gone, fold running */
#define FORKPATCH_STATE_DEGRADED 4  /* a fold failed: heap stays private,
                                       forks are stock fork(); data intact */
#define FORKPATCH_STATE_STOCK 5     /* async fork switched off at run time:
                                       heap private, forks are stock fork() */

struct forkpatch_stats {
    uint32_t state;
    uint64_t forks;
    uint64_t fork_failures;
    uint64_t last_fork_usec;      /* whole caller stall of the last fork */
    uint64_t max_fork_usec;
    uint64_t last_switch_usec;    /* page-table switch part of it */
    uint64_t folds;
    uint64_t fold_errors;
    uint64_t last_fold_usec;      /* child exit -> heap shared again */
    uint64_t last_fold_rounds;
    uint64_t last_fold_final_usec;  /* writers could wait this long */
    uint64_t last_fold_final_pages;
    uint64_t last_fold_final_cpu_usec; /* CPU time of that final step: far
                                          below last_fold_final_usec means
                                          the fold thread waited for a CPU */
    uint64_t last_fold_final_priority; /* SCHED_FIFO priority it ran at
                                          (0: normal scheduling) */
    uint64_t last_fold_lock_wait_usec; /* waited, parking nobody, for the
                                          address-space lock to be free
                                          before the final step */
    uint64_t last_overlay_bytes;  /* bytes copied-on-write during the last
                                     snapshot: its true COW cost */
    uint64_t total_overlay_bytes;
    uint64_t purge_refused;
    uint64_t region_bytes;        /* current size of the heap memfd */
    uint64_t region_limit;
    uint64_t flips_with_kept_tables; /* flips that moved the shared heap's
                                        page tables back instead of mapping
                                        it fresh */
};

/* Set the engine up. Call once, early, before other threads exist and before
 * any memory is placed in the region. reserve_bytes: address space for the
 * heap (0 = 64 GiB; costs no memory). max_bytes: most the heap may grow to
 * (0 = reserve). Returns 1 if active, 0 if not. Later calls return the first
 * call's result. */
int forkpatch_init(size_t reserve_bytes, size_t max_bytes);

/* Run the engine's background thread (fold-back, teardown) on the CPUs of
 * cpulist, in Redis' format ("0-3,8,10-14:2"), e.g. bio_cpulist, so it stays
 * off a pinned main thread's CPU. The fault handler is not restricted: the
 * thread it serves waits in the fault, so that thread's CPU suits it best. 0 on success (or engine inactive),
 * -1 with errno set (EINVAL: malformed list, nothing changed). */
int forkpatch_set_thread_cpulist(const char *cpulist);

/* Run the engine's userfaultfd fault handler SCHED_FIFO at priority (1-99),
 * or with normal scheduling (0). During a fold-back every first write to a
 * heap page waits for a round trip through that thread; as a normal task it
 * may first wait out another task's time slice on a busy CPU, while a
 * real-time one runs at once, for a few microseconds per fault. 0 on success
 * (or engine inactive), -1 with errno set (EINVAL: out of range; EPERM:
 * no CAP_SYS_NICE / RLIMIT_RTPRIO); nothing changes on error. */
int forkpatch_set_rt_priority(int priority);

/* The priority set by forkpatch_set_rt_priority (0 = normal scheduling). */
int forkpatch_rt_priority(void);

/* 1 if the engine is active. */
int forkpatch_active(void);

/* Why the engine is inactive (static string), or NULL if it is active. */
const char *forkpatch_disabled_reason(void);

/* 1 if a fold failed and forks now use stock fork() (data intact). */
int forkpatch_degraded(void);

/* Why the engine degraded (static string), or NULL if it did not. */
const char *forkpatch_degraded_reason(void);

/* 1 if p lies in the heap region. */
int forkpatch_region_contains(const void *p);

/* size bytes of the region aligned to align (power of two; at least a page),
 * zero-filled when first handed out. NULL when the region cannot grow (treat
 * as out of memory), when the engine is inactive, or in a snapshot child
 * (which must use anonymous memory: it may not change the memfd). Region
 * memory is never returned; reuse it or purge it. */
void *forkpatch_region_alloc(size_t size, size_t align);

/* Release the pages of [p, p+len) (page aligned, inside the region); they
 * read as zero afterwards. Returns 1 on success, 0 if refused: during a
 * snapshot or fold (the memfd is frozen), in a child, or for a bad range.
 * When refused the contents are unchanged. */
int forkpatch_region_purge(void *p, size_t len);

/* fork() replacement; returns like fork(). If the previous snapshot is still
 * being folded it waits for that first (check forkpatch_busy() to avoid the
 * wait). Inactive engine: plain fork(). */
pid_t forkpatch_fork(void);

/* Call after reaping (waitpid) the child of forkpatch_fork(), whatever its
 * exit status. pid <= 0: the current child. Starts the background fold.
 * Returns 1 if this ended a snapshot. */
int forkpatch_child_exited(pid_t pid);

/* 1 while a snapshot is alive or being folded. */
int forkpatch_busy(void);

/* Wait up to timeout_ms for a running fold; 1 if none is running. */
int forkpatch_wait_fold(uint64_t timeout_ms);

/* async-fork yes|no at run time. 0: the heap becomes a private mapping (at
 * once, or when the current snapshot/fold ends) and forks are stock fork(),
 * with stock latency and copy-on-write; purges are refused meanwhile.
 * 1: the heap is folded back in the background once no stock child is
 * alive, then forks are async again. */
void forkpatch_set_async(int on);

/* Overlay bytes as last measured in the background (refreshed about once a
 * second while a child lives; 0 otherwise). Cheap: use it for INFO. */
size_t forkpatch_overlay_bytes_cached(void);

/* Bytes of memory held by the heap memfd's pages, mapped or not. After a
 * fold-back the heap mapping is fresh and only the pages touched since count
 * in the process RSS: RSS - RssShmem + this is the truthful figure. */
uint64_t forkpatch_region_resident_bytes(void);

/* 1 in a child created by forkpatch_fork(). */
int forkpatch_in_child(void);

/* Bytes currently copied-on-write by the parent (0 without a snapshot).
 * Walks page tables (~16 ms/GiB): call rarely, not per command. */
size_t forkpatch_overlay_bytes(void);

/* Fill *out with the counters (zeros if inactive). */
void forkpatch_stats(struct forkpatch_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* FORKPATCH_H */
