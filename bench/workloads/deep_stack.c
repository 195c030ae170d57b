/* Allocation at a chosen stack depth, to price the stack walk per frame.
 * usage: deep_stack DEPTH PAIRS
 * Recurses DEPTH noinline frames, then makes PAIRS malloc+free pairs (64 B) there.
 * Built twice (bench/workloads/__init__.py): with frame pointers and -O2 without. */
#include <stdlib.h>
#include "gate.h"

static void *volatile sink;
static long pairs;

__attribute__((noinline)) static void bottom(void) {
    for (long i = 0; i < pairs; i++) {
        void *p = malloc(64);
        sink = p;
        free(p);
    }
}

__attribute__((noinline)) static void down(int depth) {
    if (depth > 1)
        down(depth - 1);
    else
        bottom();
    __asm__ volatile("" ::: "memory");   /* no tail call: every frame stays */
}

int main(int argc, char **argv) {
    int depth = argc > 1 ? atoi(argv[1]) : 16;
    pairs = argc > 2 ? atol(argv[2]) : 200000;
    gate_ready();
    uint64_t t0 = now_ns();
    down(depth);
    gate_hot_done(now_ns() - t0, 2 * (uint64_t)pairs);
    gate_idle();
    return 0;
}
