/* futex-heavy: THREADS threads (default 4) each take one shared mutex ITERS times
 * (default 400000) for a short critical section, with thread-local work between.
 * usage: futex_heavy [ITERS [THREADS [WORK]]] */
#include <pthread.h>
#include <stdlib.h>
#include "gate.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile uint64_t shared;
static long iters;
static int work;

static void *worker(void *arg) {
    uint64_t seed = 0xD1B54A32D192ED03ull ^ (uint64_t)(uintptr_t)arg, local = 0;
    for (long i = 0; i < iters; i++) {
        pthread_mutex_lock(&lock);
        shared += i;
        pthread_mutex_unlock(&lock);
        for (int w = 0; w < work; w++)
            local += xorshift(&seed);
    }
    return (void *)(uintptr_t)local;
}

int main(int argc, char **argv) {
    iters = argc > 1 ? atol(argv[1]) : 400000;
    int threads = argc > 2 ? atoi(argv[2]) : 4;
    work = argc > 3 ? atoi(argv[3]) : 40;
    if (threads < 1 || threads > 64)
        return 2;
    gate_ready();
    uint64_t t0 = now_ns();
    pthread_t tids[64];
    for (int t = 0; t < threads; t++)
        pthread_create(&tids[t], NULL, worker, (void *)(uintptr_t)(t + 1));
    for (int t = 0; t < threads; t++)
        pthread_join(tids[t], NULL);
    gate_hot_done(now_ns() - t0, (uint64_t)iters * (uint64_t)threads);
    gate_idle();
    return 0;
}
