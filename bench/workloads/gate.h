/* The protocol every benchmark workload follows, so a tracer's start-up stays
 * outside the timed phase:
 *   1. set up, print "ready pid=N", wait for a byte on stdin (EOF also starts);
 *   2. run the hot phase, print "hot_ns=T calls=C cpu_ns=U" (C: the operations a tracer
 *      sees; U: the process's own CPU since the gate opened, all threads, user + system:
 *      a tracer's probes run in the process, waiting for a CPU does not count);
 *   3. tidy up (free the live working set: what remains is the leak), print
 *      "idle", wait for another byte on stdin (or EOF), exit 0.
 */
#ifndef BENCH_GATE_H
#define BENCH_GATE_H
#include <stdio.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t gate_cpu0;  /* the process's CPU when the gate opened */

static inline void wait_byte(void) {
    char c;
    while (read(0, &c, 1) < 0) {
    }
}

static inline void gate_ready(void) {
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    wait_byte();
    gate_cpu0 = cpu_ns();
}

static inline void gate_hot_done(uint64_t ns, uint64_t calls) {
    printf("hot_ns=%llu calls=%llu cpu_ns=%llu\n", (unsigned long long)ns,
           (unsigned long long)calls, (unsigned long long)(cpu_ns() - gate_cpu0));
    fflush(stdout);
}

static inline void gate_idle(void) {
    printf("idle\n");
    fflush(stdout);
    wait_byte();
}

static inline uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}
#endif
