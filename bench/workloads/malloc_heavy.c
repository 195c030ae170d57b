/* malloc-heavy: PAIRS free+malloc pairs (sizes 16-4096 B) over 1,024 live slots,
 * plus LEAKS blocks of 1,000 B leaked from leak_here() while it churns.
 * usage: malloc_heavy [PAIRS [LEAKS [THREADS]]]   (defaults 2000000 10000 1)
 * With THREADS > 1 the pairs and leaks are split between threads that share the
 * slots under one mutex. Ground truth after the hot phase: LEAKS blocks,
 * LEAKS * 1000 bytes outstanding, all from leak_here. */
#include <pthread.h>
#include <stdlib.h>
#include "gate.h"

#define SLOTS 1024
#define LEAK_SIZE 1000

static void *slots[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int use_lock;
static long pairs_per_thread, leaks_per_thread;
static void *volatile sink;   /* keeps the compiler from dropping the leaked malloc */

__attribute__((noinline)) void leak_here(void) {
    char *p = malloc(LEAK_SIZE);
    p[0] = 1;
    sink = p;   /* overwritten by the next leak: the block becomes unreachable */
}

static void *churn(void *arg) {
    uint64_t seed = 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)arg;
    long every = leaks_per_thread ? pairs_per_thread / leaks_per_thread : 0;
    for (long i = 0; i < pairs_per_thread; i++) {
        uint64_t r = xorshift(&seed);
        size_t size = 16 + (size_t)(r % 4081);
        unsigned slot = (unsigned)(r >> 32) % SLOTS;
        if (use_lock)
            pthread_mutex_lock(&lock);
        free(slots[slot]);
        char *p = malloc(size);
        p[0] = (char)i;
        slots[slot] = p;
        if (every && i % every == every - 1)
            leak_here();
        if (use_lock)
            pthread_mutex_unlock(&lock);
    }
    return NULL;
}

int main(int argc, char **argv) {
    long pairs = argc > 1 ? atol(argv[1]) : 2000000;
    long leaks = argc > 2 ? atol(argv[2]) : 10000;
    int threads = argc > 3 ? atoi(argv[3]) : 1;
    if (threads < 1 || threads > 64 || leaks > pairs)
        return 2;
    pairs_per_thread = pairs / threads;
    leaks_per_thread = leaks / threads;
    use_lock = threads > 1;
    for (int i = 0; i < SLOTS; i++)
        slots[i] = malloc(16);
    gate_ready();

    uint64_t t0 = now_ns();
    pthread_t tids[64];
    if (threads == 1) {
        churn(0);
    } else {
        for (int t = 0; t < threads; t++)
            pthread_create(&tids[t], NULL, churn, (void *)(uintptr_t)(t + 1));
        for (int t = 0; t < threads; t++)
            pthread_join(tids[t], NULL);
    }
    uint64_t t1 = now_ns();
    long done_pairs = pairs_per_thread * threads, done_leaks = leaks_per_thread * threads;
    gate_hot_done(t1 - t0, (uint64_t)(2 * done_pairs + done_leaks));

    for (int i = 0; i < SLOTS; i++)
        free(slots[i]);
    sink = NULL;
    gate_idle();
    return 0;
}
