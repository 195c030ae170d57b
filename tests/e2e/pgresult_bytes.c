/* Ground truth for the e2e scenario's libpq leak, measured by glibc itself.
 *
 * Does exactly what vault.c's vault_keep_results() does once (connect, run QUERIES
 * queries, keep every KEEP_EVERY-th PGresult, PQfinish) under glibc's mtrace, and
 * prints the bytes still allocated afterwards: what one keepResults() call leaks.
 *
 *   LD_PRELOAD=libc_malloc_debug.so.0 MALLOC_TRACE=FILE pgresult_bytes CONNINFO Q K
 * then the test sums FILE's unfreed allocations. */
#include <libpq-fe.h>
#include <mcheck.h>
#include <stdio.h>
#include <stdlib.h>

#define VAULT_QUERY "SELECT g, repeat('x', 200) FROM generate_series(1, 20) AS g"

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int queries = atoi(argv[2]), keep_every = atoi(argv[3]);
    static PGresult *kept[100000];
    int n = 0;
    PQconninfoFree(PQconndefaults());   /* libpq's one-time setup, outside the trace */
    mtrace();
    PGconn *conn = PQconnectdb(argv[1]);
    if (PQstatus(conn) != CONNECTION_OK) return 1;
    for (int i = 0; i < queries; i++) {
        PGresult *res = PQexec(conn, VAULT_QUERY);
        if (i % keep_every == 0) kept[n++] = res;
        else PQclear(res);
    }
    PQfinish(conn);
    muntrace();
    printf("%d\n", n);
    return 0;
}
