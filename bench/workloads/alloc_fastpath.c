/* The allocator's per-call cost on its own: ns per malloc and per free of small blocks,
 * for comparing bare glibc with the in-process sampler dormant or traced.
 * usage: alloc_fastpath [ROUNDS [SIZE]]   (defaults 20000 64)
 * Each round mallocs BATCH blocks (timed), then frees them in a shuffled order (timed).
 * Follows gate.h; its hot_ns= line also has malloc_ns=X free_ns=Y. */
#include <stdlib.h>
#include "gate.h"

#define BATCH 1024

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    size_t size = argc > 2 ? (size_t)atol(argv[2]) : 64;
    static void *blocks[BATCH];
    static unsigned order[BATCH];
    uint64_t seed = 0x2545F4914F6CDD1Dull;
    for (unsigned i = 0; i < BATCH; i++)
        order[i] = i;
    for (unsigned i = BATCH - 1; i > 0; i--) {
        unsigned j = (unsigned)(xorshift(&seed) % (i + 1)), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    gate_ready();
    uint64_t t_malloc = 0, t_free = 0, t0 = now_ns();
    for (long r = 0; r < rounds; r++) {
        uint64_t a = now_ns();
        for (unsigned i = 0; i < BATCH; i++) {
            blocks[i] = malloc(size);
            *(volatile char *)blocks[i] = 1;
        }
        uint64_t b = now_ns();
        for (unsigned i = 0; i < BATCH; i++)
            free(blocks[order[i]]);
        t_free += now_ns() - b;
        t_malloc += b - a;
    }
    uint64_t hot = now_ns() - t0, calls = (uint64_t)rounds * BATCH;
    printf("hot_ns=%llu calls=%llu malloc_ns=%.2f free_ns=%.2f cpu_ns=%llu\n",
           (unsigned long long)hot, (unsigned long long)(2 * calls),
           (double)t_malloc / (double)calls, (double)t_free / (double)calls,
           (unsigned long long)(cpu_ns() - gate_cpu0));
    fflush(stdout);
    gate_idle();
    return 0;
}
