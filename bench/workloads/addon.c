/* N-API addon for the node workload: work(n) makes n malloc/free pairs in C. */
#include <node_api.h>
#include <stdlib.h>

static napi_value work(napi_env env, napi_callback_info info) {
    size_t argc = 1;
    napi_value argv[1];
    int32_t n = 0;
    napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
    napi_get_value_int32(env, argv[0], &n);
    uint32_t sum = 0;
    for (int32_t i = 0; i < n; i++) {
        volatile char *p = malloc(32 + (size_t)(i * 37) % 480);
        p[0] = (char)i;
        sum += (uint32_t)p[0];
        free((void *)p);
    }
    napi_value out;
    napi_create_uint32(env, sum, &out);
    return out;
}

NAPI_MODULE_INIT() {
    napi_value fn;
    napi_create_function(env, "work", NAPI_AUTO_LENGTH, work, NULL, &fn);
    napi_set_named_property(env, exports, "work", fn);
    return exports;
}
