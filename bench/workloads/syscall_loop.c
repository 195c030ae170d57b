/* N getppid() calls, timed on this thread's CPU clock: the cost of one cheap syscall
 * to a process natrace does not trace (bench/syscalls.py). Prints "ns=<per call>". */
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 2000000;
    struct timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);   /* not glibc's getppid(): never cached, always a syscall */
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("ns=%.1f\n", ns / n);
    return 0;
}
