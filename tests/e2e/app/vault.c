/* "vault": the scenario's own N-API addon, with three known misbehaviours.
 *
 *   stash(n)                 vault_stash_blocks() leaks n blocks of 4,000 B
 *   keepResults(conninfo, queries, keepEvery)
 *                            vault_keep_results() runs `queries` queries through
 *                            libpq and keeps every keepEvery-th PGresult without
 *                            PQclear (a real libpq leak); returns how many it kept
 *   contend(threads, rounds) vault_locked_work() runs on `threads` threads that
 *                            fight over one mutex; returns when all are done
 *
 * Built with gcc against /usr/include/node (no node-gyp, no download). */
#include <node_api.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STASH_BLOCK 4000
#define VAULT_QUERY "SELECT g, repeat('x', 200) FROM generate_series(1, 20) AS g"

static void *volatile stash_sink;
static PGresult *kept[100000];
static int nkept;
static pthread_mutex_t vault_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile unsigned long shared_counter;

__attribute__((noinline)) static void vault_stash_blocks(int n) {
    for (int i = 0; i < n; i++) {
        char *p = malloc(STASH_BLOCK);
        memset(p, i, 64);
        stash_sink = p;
    }
}

__attribute__((noinline)) static int vault_keep_results(const char *conninfo, int queries,
                                                         int keep_every) {
    PGconn *conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        PQfinish(conn);
        return -1;
    }
    int kept_now = 0;
    for (int i = 0; i < queries; i++) {
        PGresult *res = PQexec(conn, VAULT_QUERY);
        if (i % keep_every == 0 && nkept < 100000) {
            kept[nkept++] = res;   /* the leak: never PQclear'd */
            kept_now++;
        } else {
            PQclear(res);
        }
    }
    PQfinish(conn);
    return kept_now;
}

__attribute__((noinline)) static void vault_locked_work(long rounds) {
    for (long i = 0; i < rounds; i++) {
        pthread_mutex_lock(&vault_lock);
        for (int k = 0; k < 2000; k++)   /* a long critical section: real contention */
            shared_counter++;
        if (i % 4000 == 0) {   /* and a 1 ms hold now and then: the others wait for certain,
                                  however a busy machine schedules the threads */
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
        pthread_mutex_unlock(&vault_lock);
    }
}

static void *worker(void *arg) {
    vault_locked_work((long)arg);
    return NULL;
}

static int int_arg(napi_env env, napi_value v) {
    int32_t out = 0;
    napi_get_value_int32(env, v, &out);
    return out;
}

static napi_value Stash(napi_env env, napi_callback_info info) {
    size_t argc = 1;
    napi_value argv[1];
    napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
    vault_stash_blocks(int_arg(env, argv[0]));
    return NULL;
}

static napi_value KeepResults(napi_env env, napi_callback_info info) {
    size_t argc = 3;
    napi_value argv[3], out;
    char conninfo[512];
    size_t len;
    napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
    napi_get_value_string_utf8(env, argv[0], conninfo, sizeof conninfo, &len);
    napi_create_int32(env, vault_keep_results(conninfo, int_arg(env, argv[1]),
                                              int_arg(env, argv[2])), &out);
    return out;
}

static napi_value Contend(napi_env env, napi_callback_info info) {
    size_t argc = 2;
    napi_value argv[2];
    napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
    int n = int_arg(env, argv[0]);
    long rounds = int_arg(env, argv[1]);
    pthread_t t[64];
    if (n > 64) n = 64;
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, worker, (void *)rounds);
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    return NULL;
}

static napi_value Init(napi_env env, napi_value exports) {
    napi_property_descriptor props[] = {
        {"stash", NULL, Stash, NULL, NULL, NULL, napi_default, NULL},
        {"keepResults", NULL, KeepResults, NULL, NULL, NULL, napi_default, NULL},
        {"contend", NULL, Contend, NULL, NULL, NULL, napi_default, NULL},
    };
    napi_define_properties(env, exports, 3, props);
    return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
