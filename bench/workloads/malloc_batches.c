/* malloc-heavy's loop (free + malloc of 16-4096 B over 1,024 live slots), in batches
 * for SECONDS: one line per batch, "start_ns end_ns wall_ns_per_call cpu_ns_per_call"
 * (CLOCK_MONOTONIC, the thread's CPU), so a tool's cost can be compared within one run
 * while something is switched on and off (bench/syscallpath.py).
 * usage: malloc_batches [PAIRS_PER_BATCH [SECONDS]]   (defaults 100000 40)
 * Prints "ready pid=N", starts at a byte on stdin (or EOF), exits 0 when done. */
#include <stdlib.h>
#include "gate.h"

#define SLOTS 1024

static void *slots[SLOTS];

static uint64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
    long batch = argc > 1 ? atol(argv[1]) : 100000;
    double seconds = argc > 2 ? atof(argv[2]) : 40;
    if (batch < 1)
        return 2;
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < SLOTS; i++)
        slots[i] = malloc(16);
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    wait_byte();
    uint64_t start = now_ns();
    for (;;) {
        uint64_t w0 = now_ns(), c0 = thread_cpu_ns();
        for (long i = 0; i < batch; i++) {
            uint64_t r = xorshift(&seed);
            unsigned slot = (unsigned)(r >> 32) % SLOTS;
            free(slots[slot]);
            char *p = malloc(16 + (size_t)(r % 4081));
            p[0] = (char)i;
            slots[slot] = p;
        }
        uint64_t w1 = now_ns(), c1 = thread_cpu_ns();
        printf("%llu %llu %.1f %.1f\n", (unsigned long long)w0, (unsigned long long)w1,
               (double)(w1 - w0) / (2.0 * batch), (double)(c1 - c0) / (2.0 * batch));
        fflush(stdout);
        if ((double)(w1 - start) / 1e9 >= seconds)
            break;
    }
    for (int i = 0; i < SLOTS; i++)
        free(slots[i]);
    return 0;
}
