/* Smoke test of the C ABI against libforkpatch.a: a snapshot child sees the
 * heap as of the fork, the parent's later writes survive the fold. */
#include "forkpatch.h"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define LEN (16u << 20)
#define CHECK(c) do { if (!(c)) { fprintf(stderr, "FAIL %s:%d %s\n", __FILE__, __LINE__, #c); return 1; } } while (0)

int main(void) {
    CHECK(sizeof(struct forkpatch_stats) == 168);
    if (!forkpatch_init(1u << 30, 0)) {
        printf("inactive: %s\n", forkpatch_disabled_reason());
        CHECK(forkpatch_disabled_reason() != NULL);
        CHECK(forkpatch_region_alloc(4096, 4096) == NULL);
        return 0;
    }
    CHECK(forkpatch_disabled_reason() == NULL);
    CHECK(forkpatch_rt_priority() == 0);
    CHECK(forkpatch_set_rt_priority(100) == -1 && errno == EINVAL);
    CHECK(forkpatch_set_rt_priority(0) == 0 && forkpatch_rt_priority() == 0);
    unsigned char *p = forkpatch_region_alloc(LEN, 1u << 21);
    CHECK(p && forkpatch_region_contains(p) && !forkpatch_region_contains(&p));
    memset(p, 0x11, LEN);
    pid_t pid = forkpatch_fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        usleep(20000); /* let the parent write first */
        for (size_t i = 0; i < LEN; i++)
            if (p[i] != 0x11) _exit(2);
        memset(p, 0x22, LEN); /* must stay private to the child */
        _exit(forkpatch_in_child() && forkpatch_region_alloc(4096, 4096) == NULL ? 0 : 3);
    }
    CHECK(forkpatch_busy());
    memset(p, 0x33, LEN / 2);
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(forkpatch_child_exited(pid) == 1);
    CHECK(forkpatch_wait_fold(10000) == 1);
    for (size_t i = 0; i < LEN; i++)
        CHECK(p[i] == (i < LEN / 2 ? 0x33 : 0x11));
    struct forkpatch_stats s;
    forkpatch_stats(&s);
    CHECK(s.state == FORKPATCH_STATE_IDLE && s.forks == 1 && s.folds == 1);
    CHECK(s.last_overlay_bytes >= LEN / 2);
    CHECK(forkpatch_region_purge(p, LEN) == 1 && p[0] == 0);
    printf("ok: fork stall %llu us, fold %llu us, overlay %llu bytes\n",
           (unsigned long long)s.last_fork_usec, (unsigned long long)s.last_fold_usec,
           (unsigned long long)s.last_overlay_bytes);
    return 0;
}
