/*
 * c-hello: a Baton plugin written in C. GET /c/hello answers with a greeting from the
 * plugin's settings ([plugins.settings.c_hello] greeting = "...", default "hello from C")
 * and the generation and pid that served it.
 *
 * Build: cc -std=c11 -O2 -fPIC -shared -I plugins/api/include \
 *            plugins/c-hello/hello.c -o plugins.d/c_hello.so
 * (-DC_HELLO_VERSION='"x.y.z"' and -DC_HELLO_GREETING='"..."' change the defaults.)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "baton_plugin.h"

#ifndef C_HELLO_VERSION
#define C_HELLO_VERSION "1.0.0"
#endif
#ifndef C_HELLO_GREETING
#define C_HELLO_GREETING "hello from C"
#endif

struct state {
    char greeting[128];
};

static baton_str_t str(const char *s) {
    baton_str_t v = { (const uint8_t *)s, strlen(s) };
    return v;
}

/* Finds "greeting":"..." in the settings JSON (a flat object of strings is all we need). */
static void read_greeting(baton_str_t json, char *out, size_t cap) {
    const char *key = "\"greeting\"";
    size_t klen = strlen(key);
    snprintf(out, cap, "%s", C_HELLO_GREETING);
    for (size_t i = 0; i + klen < json.len; i++) {
        if (memcmp(json.ptr + i, key, klen) != 0) continue;
        size_t j = i + klen;
        while (j < json.len && (json.ptr[j] == ' ' || json.ptr[j] == ':')) j++;
        if (j >= json.len || json.ptr[j] != '"') return;
        size_t start = ++j;
        while (j < json.len && json.ptr[j] != '"') j++;
        size_t n = j - start < cap - 1 ? j - start : cap - 1;
        memcpy(out, json.ptr + start, n);
        out[n] = '\0';
        return;
    }
}

static int32_t c_hello_init(const baton_init_t *init, void **state) {
    struct state *s = calloc(1, sizeof *s);
    if (s == NULL) {
        init->host->set_error(init->error, str("c_hello: out of memory"));
        return 1;
    }
    read_greeting(init->settings_json, s->greeting, sizeof s->greeting);
    *state = s;
    return 0;
}

static int32_t c_hello_handle(void *state, const baton_request_t *req,
                              const baton_host_api_t *host, baton_response_t *resp) {
    const struct state *s = state;
    char body[256];
    int n = snprintf(body, sizeof body, "%s! (generation %llu, pid %u, version %s)\n",
                     s->greeting, (unsigned long long)req->generation, req->worker_pid,
                     C_HELLO_VERSION);
    if (n < 0) return 1;
    baton_str_t b = { (const uint8_t *)body, (size_t)n < sizeof body ? (size_t)n : sizeof body - 1 };
    host->add_header(resp, str("content-type"), str("text/plain; charset=utf-8"));
    return host->write_body(resp, b) == 0 ? 0 : 1;
}

static void c_hello_shutdown(void *state) {
    free(state);
}

static const baton_route_t routes[] = {
    { BATON_GET, 0, "/c/hello" },
};

static const baton_plugin_v1_t descriptor = {
    .magic = BATON_PLUGIN_MAGIC,
    .abi_major = BATON_ABI_MAJOR,
    .abi_minor = BATON_ABI_MINOR,
    .struct_size = sizeof(baton_plugin_v1_t),
    .flags = BATON_FLAG_NONBLOCKING,
    .name = "c_hello",
    .version = C_HELLO_VERSION,
    .routes = routes,
    .routes_len = sizeof routes / sizeof routes[0],
    .init = c_hello_init,
    .handle = c_hello_handle,
    .shutdown = c_hello_shutdown,
};

const baton_plugin_v1_t *baton_plugin_v1(void) {
    return &descriptor;
}
