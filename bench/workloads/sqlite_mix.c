/* A realistic program: an in-memory SQLite database of 20,000 orders, then ITERS rounds
 * of a query mix (insert, point select, range aggregate with GROUP BY, update, delete),
 * each statement prepared and finalized as an application using sqlite3_exec-style calls
 * would. It works between allocations: SQLite's own page cache, parser and VM.
 * usage: sqlite_mix [ITERS]   (default 20000). Follows gate.h; calls = statements. */
#include <sqlite3.h>
#include <stdlib.h>
#include "gate.h"

static sqlite3 *db;

static void run(const char *sql, long a, long b) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        exit(3);
    sqlite3_bind_int64(st, 1, a);
    sqlite3_bind_int64(st, 2, b);
    while (sqlite3_step(st) == SQLITE_ROW) {
    }
    sqlite3_finalize(st);
}

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 20000;
    uint64_t seed = 0x853C49E6748FEA9Bull;
    if (sqlite3_open(":memory:", &db) != SQLITE_OK)
        return 3;
    sqlite3_exec(db, "CREATE TABLE orders(id INTEGER PRIMARY KEY, customer INTEGER, "
                     "amount INTEGER, note TEXT); CREATE INDEX by_customer ON orders(customer);",
                 NULL, NULL, NULL);
    sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
    for (long i = 0; i < 20000; i++)
        run("INSERT INTO orders(customer, amount, note) VALUES (?1, ?2, "
            "printf('order %d of customer %d', ?2, ?1))", (long)(xorshift(&seed) % 500),
            (long)(xorshift(&seed) % 10000));
    sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    gate_ready();

    uint64_t t0 = now_ns();
    long calls = 0;
    for (long i = 0; i < iters; i++) {
        long c = (long)(xorshift(&seed) % 500), v = (long)(xorshift(&seed) % 10000);
        run("INSERT INTO orders(customer, amount, note) VALUES (?1, ?2, "
            "printf('order %d of customer %d', ?2, ?1))", c, v);
        run("SELECT amount, note FROM orders WHERE id = ?1", v + 1, 0);
        run("SELECT customer, count(*), sum(amount) FROM orders WHERE customer BETWEEN ?1 "
            "AND ?1 + 5 GROUP BY customer", c, 0);
        run("UPDATE orders SET amount = amount + 1 WHERE id = ?1", v + 2, 0);
        run("DELETE FROM orders WHERE id = (SELECT min(id) FROM orders WHERE customer = ?1)",
            c, 0);
        calls += 5;
    }
    gate_hot_done(now_ns() - t0, (uint64_t)calls);
    sqlite3_close(db);
    gate_idle();
    return 0;
}
