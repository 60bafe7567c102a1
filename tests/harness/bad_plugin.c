/*
 * A plugin that is wrong in exactly one way, chosen by a -D flag, for rollback tests:
 * NO_ENTRY, BAD_MAGIC, BAD_MAJOR, NEWER_MINOR, SMALL_STRUCT, NULL_HANDLE, INIT_FAILS,
 * DUP_ROUTE (claims GET /hello, which the hello example serves), CRASH_AFTER_MS=N (loads
 * fine, then aborts its worker N ms after init: a release that crash-loops once it
 * serves). Without a flag it is a valid plugin serving GET /bad/ok.
 */
#define _POSIX_C_SOURCE 200809L
#include <string.h>
#ifdef CRASH_AFTER_MS
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static void *crash_later(void *arg) {
    (void)arg;
    struct timespec delay = { CRASH_AFTER_MS / 1000, (CRASH_AFTER_MS % 1000) * 1000000L };
    nanosleep(&delay, NULL);
    abort();
    return NULL;
}
#endif

#include "baton_plugin.h"

static baton_str_t str(const char *s) {
    baton_str_t v = { (const uint8_t *)s, strlen(s) };
    return v;
}

static int32_t bad_init(const baton_init_t *init, void **state) {
    *state = NULL;
#ifdef INIT_FAILS
    init->host->set_error(init->error, str("bad: cannot connect to the database"));
    return 1;
#else
    (void)init;
#ifdef CRASH_AFTER_MS
    pthread_t thread;
    if (pthread_create(&thread, NULL, crash_later, NULL) != 0) {
        return 1;
    }
    pthread_detach(thread);
#endif
    return 0;
#endif
}

__attribute__((unused)) static int32_t bad_handle(void *state, const baton_request_t *req, const baton_host_api_t *host,
                          baton_response_t *resp) {
    (void)state;
    (void)req;
    return host->write_body(resp, str("ok\n"));
}

static void bad_shutdown(void *state) {
    (void)state;
}

static const baton_route_t routes[] = {
#ifdef DUP_ROUTE
    { BATON_GET, 0, "/hello" },
#else
    { BATON_GET, 0, "/bad/ok" },
#endif
};

static const baton_plugin_v1_t descriptor = {
#ifdef BAD_MAGIC
    .magic = UINT64_C(0x0123456789abcdef),
#else
    .magic = BATON_PLUGIN_MAGIC,
#endif
#ifdef BAD_MAJOR
    .abi_major = BATON_ABI_MAJOR + 1,
#else
    .abi_major = BATON_ABI_MAJOR,
#endif
#ifdef NEWER_MINOR
    .abi_minor = BATON_ABI_MINOR + 1,
#else
    .abi_minor = BATON_ABI_MINOR,
#endif
#ifdef SMALL_STRUCT
    .struct_size = 40,
#else
    .struct_size = sizeof(baton_plugin_v1_t),
#endif
    .flags = BATON_FLAG_NONBLOCKING,
    .name = "bad",
    .version = "0.0.1",
    .routes = routes,
    .routes_len = 1,
    .init = bad_init,
#ifdef NULL_HANDLE
    .handle = NULL,
#else
    .handle = bad_handle,
#endif
    .shutdown = bad_shutdown,
};

#ifdef NO_ENTRY
const baton_plugin_v1_t *not_the_entry_point(void) {
    return &descriptor;
}
#else
const baton_plugin_v1_t *baton_plugin_v1(void) {
    return &descriptor;
}
#endif
