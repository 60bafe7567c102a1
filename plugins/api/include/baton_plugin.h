/*
 * baton_plugin.h - the Baton plugin ABI, version 1.1, for plugins written in C.
 *
 * Mirrors plugins/api/src/abi.rs field for field; a test compiles this header and checks
 * every size and offset against the Rust definitions.
 *
 * A plugin is a shared library exporting one function:
 *
 *     const baton_plugin_v1_t *baton_plugin_v1(void);
 *
 * returning a descriptor that lives as long as the library. The host checks magic,
 * abi_major (must equal BATON_ABI_MAJOR), abi_minor (must not exceed the host's) and
 * struct_size before reading anything else, and never reads past struct_size.
 *
 * All baton_str_t views passed to a callback are valid only during that call. Build the
 * response with the host's functions; never free memory the host gave you.
 * handle() may run on several threads at once.
 *
 * 1.1 appends (a 1.0 plugin sees none of it): deferred and streamed answers (host->defer
 * and the stream_* functions), streamed request bodies (BATON_ROUTE_STREAM_BODY and the
 * body_* functions), WebSocket routes (BATON_ROUTE_WEBSOCKET with ws_open, ws_message,
 * ws_close, and host->ws_send / host->ws_close) and on_drain. Streams, bodies and
 * WebSocket connections are baton_handle_t numbers that are never reused: a handle used
 * after its stream or connection ended is harmless (the call returns BATON_E_CLOSED).
 * See plugins/api/src/abi.rs for what each function does.
 */
#ifndef BATON_PLUGIN_H
#define BATON_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* "BATONPL1" read as a little-endian 64-bit integer. */
#define BATON_PLUGIN_MAGIC UINT64_C(0x314C504E4F544142)
#define BATON_ABI_MAJOR 1u
#define BATON_ABI_MINOR 1u
#define BATON_ENTRY_POINT "baton_plugin_v1"

/* flags: handlers never block; run them inline (otherwise: on a bounded thread pool). */
#define BATON_FLAG_NONBLOCKING 1u

/* Method bits for baton_route_t.methods. A GET route also answers HEAD. */
#define BATON_GET     (1u << 0)
#define BATON_HEAD    (1u << 1)
#define BATON_POST    (1u << 2)
#define BATON_PUT     (1u << 3)
#define BATON_DELETE  (1u << 4)
#define BATON_PATCH   (1u << 5)
#define BATON_OPTIONS (1u << 6)

/* 1.1: streams, bodies and WebSocket connections; 0 is no handle. */
typedef uint64_t baton_handle_t;

/* 1.1 return codes of the stream, body and WebSocket functions. */
#define BATON_OK             INT64_C(0)
#define BATON_E_INVALID      INT64_C(-1)  /* arguments refused; a blocking call on a host thread */
#define BATON_E_WOULD_BLOCK  INT64_C(-2)  /* no room / no data yet: wait for the callback */
#define BATON_E_CLOSED       INT64_C(-3)  /* client gone, stream ended, unknown handle */
#define BATON_E_TOO_LARGE    INT64_C(-4)  /* body past the route's limit */
#define BATON_E_STATE        INT64_C(-5)  /* not in this state (header after the head, ...) */

/* 1.1 flags for stream_write and body_read: wait for room or data (not on host threads). */
#define BATON_WRITE_BLOCK 1u

/* 1.1 route kinds and flags (baton_route_ext_t). */
#define BATON_ROUTE_HTTP        0u
#define BATON_ROUTE_WEBSOCKET   1u
#define BATON_ROUTE_STREAM_BODY 1u

/* 1.1 WebSocket message kinds. */
#define BATON_WS_TEXT   1u
#define BATON_WS_BINARY 2u

/* A borrowed view of bytes; ptr may be NULL when len is 0. */
typedef struct baton_str {
    const uint8_t *ptr;
    size_t len;
} baton_str_t;

/* A request header: lower-case name, raw value. */
typedef struct baton_header {
    baton_str_t name;
    baton_str_t value;
} baton_header_t;

/* A path parameter, e.g. name in /hello/{name}. */
typedef struct baton_param {
    baton_str_t name;
    baton_str_t value;
} baton_param_t;

/* A route: method bits and a NUL-terminated pattern ("/hello/{name}", "/files/{*rest}"). */
typedef struct baton_route {
    uint32_t methods;
    uint32_t reserved;
    const char *path;
} baton_route_t;

/* 1.1: more about each route, an array parallel to the routes (or NULL). */
typedef struct baton_route_ext {
    uint32_t kind;                /* BATON_ROUTE_HTTP or BATON_ROUTE_WEBSOCKET */
    uint32_t flags;               /* BATON_ROUTE_STREAM_BODY or 0 */
    uint64_t max_body_bytes;      /* 0: the configured limit (body, or WebSocket message) */
} baton_route_ext_t;

/* A request, borrowed for one handle() call. */
typedef struct baton_request {
    uint32_t struct_size;
    uint32_t route;               /* index of the matched route in the plugin's table */
    baton_str_t method;           /* "GET", "POST", ... */
    baton_str_t path;             /* without the query, percent-encoded */
    baton_str_t query;            /* without '?', empty if none */
    const baton_header_t *headers;
    size_t headers_len;
    const baton_param_t *params;
    size_t params_len;
    baton_str_t body;             /* the whole body */
    uint64_t generation;          /* generation of the serving worker */
    uint32_t worker_pid;
    uint32_t reserved;
    /* 1.1 */
    baton_handle_t body_stream;   /* BATON_ROUTE_STREAM_BODY routes: the body as a stream */
} baton_request_t;

typedef struct baton_response baton_response_t; /* opaque, owned by the host */
typedef struct baton_error baton_error_t;       /* opaque, owned by the host */

/* 1.1: called once, on a host thread, when a stream has room / a body has data (or
 * either ended). Must not block. */
typedef void (*baton_notify_fn)(void *user, baton_handle_t handle);

/* Host functions; each returns 0, or a negative number if the arguments were refused
 * (the request is then answered with 500). */
typedef struct baton_host_api {
    uint32_t struct_size;
    uint32_t reserved;
    int32_t (*set_status)(baton_response_t *response, uint16_t status);
    int32_t (*add_header)(baton_response_t *response, baton_str_t name, baton_str_t value);
    int32_t (*write_body)(baton_response_t *response, baton_str_t data);
    void (*fail)(baton_response_t *response, baton_str_t message);
    void (*set_error)(baton_error_t *error, baton_str_t message);
    /* 1.1 */
    baton_handle_t (*defer)(baton_response_t *response);  /* 0 if refused */
    int64_t (*stream_set_status)(baton_handle_t stream, uint16_t status);
    int64_t (*stream_add_header)(baton_handle_t stream, baton_str_t name, baton_str_t value);
    int64_t (*stream_send_head)(baton_handle_t stream);
    int64_t (*stream_write)(baton_handle_t stream, baton_str_t data, uint32_t flags);
    int64_t (*stream_on_writable)(baton_handle_t stream, baton_notify_fn notify, void *user);
    int64_t (*stream_finish)(baton_handle_t stream);
    int64_t (*stream_fail)(baton_handle_t stream, baton_str_t message);
    int32_t (*stream_is_open)(baton_handle_t stream);
    int64_t (*body_read)(baton_handle_t body, uint8_t *buf, size_t cap, uint32_t flags);
    int64_t (*body_on_readable)(baton_handle_t body, baton_notify_fn notify, void *user);
    int64_t (*ws_send)(baton_handle_t ws, uint32_t kind, baton_str_t data);
    int64_t (*ws_close)(baton_handle_t ws, uint16_t code, baton_str_t reason);
} baton_host_api_t;

/* What init() gets. */
typedef struct baton_init {
    uint32_t struct_size;
    uint32_t reserved;
    const baton_host_api_t *host;
    baton_str_t settings_json;    /* [plugins.settings.NAME] as a JSON object, "{}" if none */
    uint64_t generation;
    uint32_t worker_pid;
    uint32_t reserved2;
    baton_error_t *error;         /* pass to host->set_error */
} baton_init_t;

/* Returns 0 and sets *state, or non-zero after host->set_error(). */
typedef int32_t (*baton_init_fn)(const baton_init_t *init, void **state);
/* Returns 0, or non-zero for a 500. */
typedef int32_t (*baton_handle_fn)(void *state, const baton_request_t *request,
                                   const baton_host_api_t *host, baton_response_t *response);
typedef void (*baton_shutdown_fn)(void *state);
/* 1.1 */
typedef void (*baton_drain_fn)(void *state);
/* Non-zero refuses the upgrade (403) and no other callback follows for ws. Accepted, it
 * may set *user and ws_send already; ws_close then comes exactly once, last. */
typedef int32_t (*baton_ws_open_fn)(void *state, const baton_request_t *request,
                                    const baton_host_api_t *host, baton_handle_t ws,
                                    void **user);
typedef void (*baton_ws_message_fn)(void *state, void *user, baton_handle_t ws, uint32_t kind,
                                    baton_str_t data);
/* Called once, last (code 1005: none given, 1006: cut off). Free user here. */
typedef void (*baton_ws_close_fn)(void *state, void *user, baton_handle_t ws, uint16_t code,
                                  baton_str_t reason);

/* The descriptor, version 1.1. */
typedef struct baton_plugin_v1 {
    uint64_t magic;               /* BATON_PLUGIN_MAGIC */
    uint32_t abi_major;           /* BATON_ABI_MAJOR */
    uint32_t abi_minor;           /* BATON_ABI_MINOR */
    uint32_t struct_size;         /* sizeof(baton_plugin_v1_t) */
    uint32_t flags;               /* BATON_FLAG_NONBLOCKING or 0 */
    const char *name;             /* [A-Za-z0-9_-]+ */
    const char *version;
    const baton_route_t *routes;
    size_t routes_len;
    baton_init_fn init;           /* required */
    baton_handle_fn handle;       /* required */
    baton_shutdown_fn shutdown;   /* required */
    /* 1.1 */
    const baton_route_ext_t *route_ext; /* routes_len entries, or NULL */
    baton_drain_fn on_drain;            /* optional */
    baton_ws_open_fn ws_open;           /* required with a WebSocket route */
    baton_ws_message_fn ws_message;     /* required with a WebSocket route */
    baton_ws_close_fn ws_close;         /* required with a WebSocket route */
} baton_plugin_v1_t;

const baton_plugin_v1_t *baton_plugin_v1(void);

/* The layout is the ABI (LP64 Linux): the same numbers are asserted in abi.rs. */
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(baton_str_t) == 16, "baton_str_t layout");
_Static_assert(sizeof(baton_route_t) == 16, "baton_route_t layout");
_Static_assert(sizeof(baton_request_t) == 128, "baton_request_t layout");
_Static_assert(offsetof(baton_request_t, body_stream) == 120, "baton_request_t layout");
_Static_assert(sizeof(baton_route_ext_t) == 16, "baton_route_ext_t layout");
_Static_assert(offsetof(baton_request_t, generation) == 104, "baton_request_t layout");
_Static_assert(sizeof(baton_host_api_t) == 152, "baton_host_api_t layout");
_Static_assert(offsetof(baton_host_api_t, defer) == 48, "baton_host_api_t layout");
_Static_assert(offsetof(baton_host_api_t, ws_close) == 144, "baton_host_api_t layout");
_Static_assert(sizeof(baton_init_t) == 56, "baton_init_t layout");
_Static_assert(offsetof(baton_init_t, error) == 48, "baton_init_t layout");
_Static_assert(sizeof(baton_plugin_v1_t) == 120, "baton_plugin_v1_t layout");
_Static_assert(offsetof(baton_plugin_v1_t, route_ext) == 80, "baton_plugin_v1_t layout");
_Static_assert(offsetof(baton_plugin_v1_t, init) == 56, "baton_plugin_v1_t layout");
#endif

#ifdef __cplusplus
}
#endif

#endif /* BATON_PLUGIN_H */
