/*
 * A WebSocket test plugin written against the 1.1 header alone (tests/websocket.rs).
 *
 *   GET /ws/echo    echoes every message; the text "whoami" answers "gen=G", the text
 *                   "close:CODE" closes with CODE and the reason "bye"
 *   GET /ws/refuse  refuses every upgrade (403)
 *   GET /ws/small   echoes, with its own message limit of 1024 bytes
 *   GET /ws/flood   a thread sends 64 KiB binary messages, one per millisecond (64 MB/s),
 *                   until ws_send says closed
 *   GET /ws/slowopen  echoes, after an open that takes 300 ms
 *   GET /ws/stats   (HTTP) opens=N closes=N flood_bytes=N flood_done=N last_close=CODE
 *
 * Without -DBLOCKING it declares BATON_FLAG_NONBLOCKING (callbacks run inline); with it,
 * its callbacks run on the blocking pool.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "baton_plugin.h"

static const baton_host_api_t *host;
static atomic_long opens, closes, flood_bytes, flood_done, last_close;

typedef struct conn {
    uint64_t generation;
} conn_t;

static baton_str_t str(const char *s) {
    baton_str_t v = { (const uint8_t *)s, strlen(s) };
    return v;
}

static int32_t ws_init(const baton_init_t *init, void **state) {
    host = init->host;
    *state = NULL;
    return 0;
}

static int32_t ws_handle(void *state, const baton_request_t *req, const baton_host_api_t *h,
                         baton_response_t *resp) {
    (void)state;
    (void)req;
    char text[256];
    snprintf(text, sizeof text, "opens=%ld closes=%ld flood_bytes=%ld flood_done=%ld last_close=%ld\n",
             atomic_load(&opens), atomic_load(&closes), atomic_load(&flood_bytes),
             atomic_load(&flood_done), atomic_load(&last_close));
    return h->write_body(resp, str(text));
}

static void ws_shutdown(void *state) {
    (void)state;
}

static void *flood(void *arg) {
    baton_handle_t ws = (baton_handle_t)(uintptr_t)arg;
    static uint8_t chunk[64 * 1024];
    baton_str_t data = { chunk, sizeof chunk };
    struct timespec pause = { 0, 1000000L };
    /* Bounded: 4 GiB (about a minute) at most, far more than any queue takes. */
    for (int i = 0; i < 65536; i++) {
        if (host->ws_send(ws, BATON_WS_BINARY, data) != BATON_OK) {
            break;
        }
        atomic_fetch_add(&flood_bytes, (long)sizeof chunk);
        nanosleep(&pause, NULL);
    }
    atomic_fetch_add(&flood_done, 1);
    return NULL;
}

static int32_t ws_open(void *state, const baton_request_t *req, const baton_host_api_t *h,
                       baton_handle_t ws, void **user) {
    (void)state;
    (void)h;
    if (req->route == 1) {
        return 1;
    }
    if (req->route == 5) {
        struct timespec delay = { 0, 300000000L };
        nanosleep(&delay, NULL);
    }
    conn_t *c = malloc(sizeof *c);
    if (c == NULL) {
        return 1;
    }
    c->generation = req->generation;
    *user = c;
    atomic_fetch_add(&opens, 1);
    if (req->route == 3) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, flood, (void *)(uintptr_t)ws) != 0) {
            free(c);
            return 1;
        }
        pthread_detach(thread);
    }
    return 0;
}

static void ws_message(void *state, void *user, baton_handle_t ws, uint32_t kind,
                       baton_str_t data) {
    (void)state;
    conn_t *c = user;
    if (kind == BATON_WS_TEXT && data.len == 6 && memcmp(data.ptr, "whoami", 6) == 0) {
        char text[64];
        snprintf(text, sizeof text, "gen=%llu", (unsigned long long)c->generation);
        host->ws_send(ws, BATON_WS_TEXT, str(text));
        return;
    }
    if (kind == BATON_WS_TEXT && data.len > 6 && data.len < 16 && memcmp(data.ptr, "close:", 6) == 0) {
        char code[16] = { 0 };
        memcpy(code, data.ptr + 6, data.len - 6);
        host->ws_close(ws, (uint16_t)atoi(code), str("bye"));
        return;
    }
    host->ws_send(ws, kind, data);
}

static void ws_close(void *state, void *user, baton_handle_t ws, uint16_t code, baton_str_t reason) {
    (void)state;
    (void)reason;
    free(user);
    atomic_store(&last_close, code);
    atomic_fetch_add(&closes, 1);
    /* The handle is dead once this returns; using it now is harmless. */
    host->ws_send(ws, BATON_WS_TEXT, str("too late"));
}

static const baton_route_t routes[] = {
    { BATON_GET, 0, "/ws/echo" },
    { BATON_GET, 0, "/ws/refuse" },
    { BATON_GET, 0, "/ws/small" },
    { BATON_GET, 0, "/ws/flood" },
    { BATON_GET, 0, "/ws/stats" },
    { BATON_GET, 0, "/ws/slowopen" },
};

static const baton_route_ext_t route_ext[] = {
    { BATON_ROUTE_WEBSOCKET, 0, 0 },
    { BATON_ROUTE_WEBSOCKET, 0, 0 },
    { BATON_ROUTE_WEBSOCKET, 0, 1024 },
    { BATON_ROUTE_WEBSOCKET, 0, 0 },
    { BATON_ROUTE_HTTP, 0, 0 },
    { BATON_ROUTE_WEBSOCKET, 0, 0 },
};

static const baton_plugin_v1_t descriptor = {
    .magic = BATON_PLUGIN_MAGIC,
    .abi_major = BATON_ABI_MAJOR,
    .abi_minor = BATON_ABI_MINOR,
    .struct_size = sizeof(baton_plugin_v1_t),
#ifdef BLOCKING
    .flags = 0,
#else
    .flags = BATON_FLAG_NONBLOCKING,
#endif
    .name = "ws_test",
    .version = "1.0.0",
    .routes = routes,
    .routes_len = sizeof routes / sizeof routes[0],
    .init = ws_init,
    .handle = ws_handle,
    .shutdown = ws_shutdown,
    .route_ext = route_ext,
    .on_drain = NULL,
    .ws_open = ws_open,
    .ws_message = ws_message,
    .ws_close = ws_close,
};

const baton_plugin_v1_t *baton_plugin_v1(void) {
    return &descriptor;
}
