/* natrace's bundled demo: a pretend request loop with one native leak.
 *
 * handle_request() builds a response and frees it; cache_response() keeps one
 * 4 KiB copy of every 8th response "for later" and never frees it. After 2,048
 * requests it has leaked exactly 256 x 4,096 = 1,048,576 bytes, which is what
 * `natrace run` reports at the top. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUESTS 2048
#define RESPONSE_SIZE 4096

char *cache[REQUESTS];   /* global: the optimizer must keep every copy */
int cached;

__attribute__((noinline)) static void cache_response(const char *body) {
    char *copy = malloc(RESPONSE_SIZE);    /* never freed: the leak */
    memcpy(copy, body, RESPONSE_SIZE);
    cache[cached++] = copy;
}

__attribute__((noinline)) static char *build_response(int id) {
    char *body = calloc(1, RESPONSE_SIZE);
    snprintf(body, RESPONSE_SIZE, "HTTP/1.1 200 OK\r\n\r\nrequest %d", id);
    return body;
}

__attribute__((noinline)) static void handle_request(int id) {
    char *body = build_response(id);
    char *headers = strdup("Content-Type: text/plain");
    if (id % 8 == 0)
        cache_response(body);
    free(headers);
    free(body);
}

int main(void) {
    for (int id = 0; id < REQUESTS; id++)
        handle_request(id);
    long check = 0;
    for (int i = 0; i < cached; i++)
        check += cache[i][0];
    printf("served %d requests, cached %d responses (%ld)\n", REQUESTS, cached, check);
    return 0;
}
