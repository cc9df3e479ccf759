/*
 * forkpatch_shim.h - glue between redis-server and the forkpatch engine.
 *
 * Two parts, both in forkpatch_shim.c, compiled inside the Redis source tree
 * (it needs server.h and the bundled jemalloc with the je_ prefix):
 *
 * 1. jemalloc extent hooks. Installed on every automatic arena, they place
 *    every new extent in the engine's region (forkpatch_region_alloc), so the
 *    dataset lives in the memfd the engine snapshots. Extents jemalloc got
 *    before the hooks existed (start-up, config parsing) stay anonymous and
 *    are handled by jemalloc's default hooks; merges across the two kinds are
 *    refused. Region extents are never unmapped (jemalloc retains them);
 *    purges become hole punches, refused while the memfd is frozen (jemalloc
 *    then keeps the pages). In a snapshot child new extents come from
 *    anonymous memory: the child must never change the memfd. If the region
 *    cannot grow, allocation fails as a failing mmap does (Redis' OOM path).
 *    The shim sets je_malloc_conf "oversize_threshold:0" so that huge
 *    allocations do not go to jemalloc's separate huge arena, which would be
 *    created later without the hooks.
 *
 * 2. Thin wrappers the Redis patch calls (the fp* functions below), which
 *    keep the patch itself to a few lines per call site.
 */
#ifndef FORKPATCH_SHIM_H
#define FORKPATCH_SHIM_H

#include <stddef.h>
#include <sys/types.h>
#include "sds.h"

/* Start-up, after the config is loaded and after daemonize(), before
 * initServer(): sets the engine up if `async-fork yes` and installs the
 * extent hooks. Logs once whether async fork is active and, if not, why.
 * Never fails: without the engine Redis uses stock fork(). */
void fpInit(void);

/* The fork() used by redisFork(). Returns like fork(). */
pid_t fpFork(void);

/* 1 while the engine folds the last snapshot back (or a snapshot lives):
 * a fork now would block the main thread until the fold ends (up to ~1 s
 * per GiB written during the save). serverCron's own forks (save points,
 * scheduled BGSAVE / AOF rewrite, replication's pending BGSAVE) check this
 * and retry on a later cron tick instead; forks asked for by a command
 * (BGSAVE, BGREWRITEAOF, SYNC, module fork) still wait. */
int fpForkDeferred(void);

/* Call for every child pid returned by waitpid(), whatever its status. */
void fpChildReaped(pid_t pid);

/* CONFIG SET async-fork apply function. */
int fpApplyConfig(const char **err);

/* CONFIG SET async-fork-rt-priority apply function: fails (the old value
 * stays) when the priority cannot be set, e.g. without CAP_SYS_NICE. */
int fpApplyRtPriority(const char **err);

/* The copy-on-write figure the child reports, corrected for async fork:
 * the parent's copied-on-write pages (the overlay) are the real cost, the
 * child's own private dirty pages are added. */
size_t fpAdjustCow(size_t child_cow);

/* In a child: its copy-on-write bytes (replaces zmalloc_get_private_dirty,
 * which would count the memfd pages the child maps as private dirty). */
size_t fpChildPrivateDirty(void);

/* Process RSS corrected for the heap memfd: its pages count whether mapped
 * right now or not (after a fold-back only pages touched since are mapped). */
size_t fpAdjustRss(size_t rss);

/* Appends the async_fork_* fields to INFO persistence. */
sds fpInfoPersistence(sds info);

#endif
