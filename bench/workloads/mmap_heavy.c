/* mmap-heavy: anonymous mmap, first-page touch, mprotect of half, munmap, over
 * mixed sizes with 8 mappings live at a time.
 * usage: mmap_heavy [ITERS [RATE]]   (default 50000)
 * With RATE given, the loop is the event-pipeline throughput driver: mmap and
 * munmap only (no touch, no mprotect: as many streamed events as it can make),
 * paced to RATE events per second, or unpaced when RATE is 0.
 * calls = syscalls made. */
#include <stdlib.h>
#include <sys/mman.h>
#include "gate.h"

#define LIVE 8

static const size_t sizes[] = {4096, 16384, 65536, 262144, 1 << 20, (2 << 20) + 4096};

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 100000;
    int light = argc > 2;
    double rate = light ? atof(argv[2]) : 0;
    void *live[LIVE] = {0};
    size_t live_len[LIVE] = {0};
    gate_ready();
    uint64_t t0 = now_ns();
    double ns_per_iter = rate > 0 ? 2e9 / rate : 0;   /* two events per iteration */
    for (long i = 0; i < iters; i++) {
        if (ns_per_iter > 0) {
            uint64_t due = t0 + (uint64_t)(ns_per_iter * (double)i);
            while (now_ns() < due) {
            }
        }
        int slot = (int)(i % LIVE);
        if (live[slot])
            munmap(live[slot], live_len[slot]);
        size_t len = sizes[i % (sizeof(sizes) / sizeof(sizes[0]))];
        char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return 1;
        if (!light) {
            size_t half = len / 2 & ~(size_t)4095;
            p[0] = (char)i;
            mprotect(p, half ? half : 4096, PROT_READ);
        }
        live[slot] = p;
        live_len[slot] = len;
    }
    uint64_t t1 = now_ns();
    uint64_t munmaps = iters > LIVE ? (uint64_t)(iters - LIVE) : 0;
    gate_hot_done(t1 - t0, (uint64_t)iters * (light ? 1 : 2) + munmaps);
    for (int s = 0; s < LIVE; s++)
        if (live[s])
            munmap(live[s], live_len[s]);
    gate_idle();
    return 0;
}
