/*
 * A plugin as written for ABI 1.0, compiled against the FROZEN 1.0 header
 * (tests/harness/abi-1.0/baton_plugin.h), to prove that a newer host still loads and
 * serves it: GET /abi10/{name} answers "hello NAME from ABI 1.0" with the request's
 * method, the generation and the pid.
 */
#include <stdio.h>
#include <string.h>

#include "baton_plugin.h"

#if BATON_ABI_MINOR != 0
#error "this plugin must be built against the frozen 1.0 header"
#endif

static baton_str_t str(const char *s) {
    baton_str_t v = { (const uint8_t *)s, strlen(s) };
    return v;
}

static int32_t v10_init(const baton_init_t *init, void **state) {
    (void)init;
    *state = NULL;
    return 0;
}

static int32_t v10_handle(void *state, const baton_request_t *req,
                          const baton_host_api_t *host, baton_response_t *resp) {
    (void)state;
    const baton_str_t *name = NULL;
    for (size_t i = 0; i < req->params_len; i++) {
        if (req->params[i].name.len == 4 && memcmp(req->params[i].name.ptr, "name", 4) == 0) {
            name = &req->params[i].value;
        }
    }
    if (name == NULL) return 1;
    char body[256];
    int n = snprintf(body, sizeof body, "hello %.*s from ABI 1.0 (%.*s, generation %llu, pid %u)\n",
                     (int)name->len, (const char *)name->ptr, (int)req->method.len,
                     (const char *)req->method.ptr, (unsigned long long)req->generation,
                     req->worker_pid);
    if (n < 0 || (size_t)n >= sizeof body) return 1;
    baton_str_t b = { (const uint8_t *)body, (size_t)n };
    if (host->set_status(resp, 200) != 0) return 1;
    if (host->add_header(resp, str("content-type"), str("text/plain; charset=utf-8")) != 0) return 1;
    return host->write_body(resp, b) == 0 ? 0 : 1;
}

static void v10_shutdown(void *state) {
    (void)state;
}

static const baton_route_t routes[] = {
    { BATON_GET, 0, "/abi10/{name}" },
};

static const baton_plugin_v1_t descriptor = {
    .magic = BATON_PLUGIN_MAGIC,
    .abi_major = BATON_ABI_MAJOR,
    .abi_minor = BATON_ABI_MINOR,
    .struct_size = sizeof(baton_plugin_v1_t),
    .flags = BATON_FLAG_NONBLOCKING,
    .name = "abi10",
    .version = "1.0.0",
    .routes = routes,
    .routes_len = sizeof routes / sizeof routes[0],
    .init = v10_init,
    .handle = v10_handle,
    .shutdown = v10_shutdown,
};

const baton_plugin_v1_t *baton_plugin_v1(void) {
    return &descriptor;
}
