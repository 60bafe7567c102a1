/*
 * c-ws-echo: a WebSocket echo written in C from baton_plugin.h alone (ABI 1.1). Connect to
 * /c/ws-echo: every message comes back as it came, text as text, binary as binary. The
 * host does the protocol (handshake, framing, ping/pong, the close handshake, limits);
 * the plugin sees whole messages.
 *
 * Build: cc -std=c11 -O2 -fPIC -shared -I plugins/api/include \
 *            plugins/c-ws-echo/echo.c -o plugins.d/c_ws_echo.so
 */
#include <stdlib.h>
#include <string.h>

#include "baton_plugin.h"

/* ws_message gets no host table: keep the one init got. */
struct state {
    const baton_host_api_t *host;
};

static baton_str_t str(const char *s) {
    baton_str_t v = { (const uint8_t *)s, strlen(s) };
    return v;
}

static int32_t echo_init(const baton_init_t *init, void **state) {
    if (init->host->struct_size < sizeof(baton_host_api_t)) {
        init->host->set_error(init->error, str("c_ws_echo: the host has no WebSocket support"));
        return 1;
    }
    struct state *s = calloc(1, sizeof *s);
    if (s == NULL) {
        init->host->set_error(init->error, str("c_ws_echo: out of memory"));
        return 1;
    }
    s->host = init->host;
    *state = s;
    return 0;
}

/* Never called: the plugin has no HTTP route. */
static int32_t echo_handle(void *state, const baton_request_t *req,
                           const baton_host_api_t *host, baton_response_t *resp) {
    (void)state;
    (void)req;
    host->fail(resp, str("c_ws_echo: not an HTTP route"));
    return 1;
}

static void echo_shutdown(void *state) {
    free(state);
}

/* Accept every upgrade; no per-connection state. */
static int32_t echo_ws_open(void *state, const baton_request_t *request,
                            const baton_host_api_t *host, baton_handle_t ws, void **user) {
    (void)state;
    (void)request;
    (void)host;
    (void)ws;
    *user = NULL;
    return 0;
}

static void echo_ws_message(void *state, void *user, baton_handle_t ws, uint32_t kind,
                            baton_str_t data) {
    const struct state *s = state;
    (void)user;
    /* BATON_E_CLOSED once the connection is closing: nothing to do then. */
    (void)s->host->ws_send(ws, kind, data);
}

static void echo_ws_close(void *state, void *user, baton_handle_t ws, uint16_t code,
                          baton_str_t reason) {
    (void)state;
    (void)user;
    (void)ws;
    (void)code;
    (void)reason;
}

static const baton_route_t routes[] = {
    { BATON_GET, 0, "/c/ws-echo" },
};

static const baton_route_ext_t route_ext[] = {
    { BATON_ROUTE_WEBSOCKET, 0, 0 },
};

static const baton_plugin_v1_t descriptor = {
    .magic = BATON_PLUGIN_MAGIC,
    .abi_major = BATON_ABI_MAJOR,
    .abi_minor = BATON_ABI_MINOR,
    .struct_size = sizeof(baton_plugin_v1_t),
    .flags = BATON_FLAG_NONBLOCKING,
    .name = "c_ws_echo",
    .version = "1.0.0",
    .routes = routes,
    .routes_len = sizeof routes / sizeof routes[0],
    .init = echo_init,
    .handle = echo_handle,
    .shutdown = echo_shutdown,
    .route_ext = route_ext,
    .on_drain = NULL,
    .ws_open = echo_ws_open,
    .ws_message = echo_ws_message,
    .ws_close = echo_ws_close,
};

const baton_plugin_v1_t *baton_plugin_v1(void) {
    return &descriptor;
}
