/*
 * A plugin for the stream tests, against the 1.1 header alone: deferred answers written
 * from the plugin's own threads, with WRITE_BLOCK or with on_writable callbacks, and a
 * streamed upload. Every producer counts what it saw, and GET /st/stats tells.
 *
 *   GET  /st/thread?n=N       N lines "chunk I", from a thread; status and a header set
 *                             before defer carry over
 *   GET  /st/slow?bytes=B     B bytes in 64 KiB writes with WRITE_BLOCK (&sized=1: with
 *                             a Content-Length)
 *   GET  /st/forever          64 KiB writes until the client goes, with on_writable
 *   GET  /st/ticker           "tick" every 20 ms ("draining" once the drain began)
 *   GET  /st/inline-block     a blocking write on the host's thread: refused
 *   POST /st/upload           streamed body (limit 512 MiB): "bytes=N fnv=H" (FNV-1a 64)
 *   POST /st/small?fail=F     the same with a limit of 1000 bytes: past it, answers 413
 *                             itself, or with fail=1 fails the stream (the host answers 413)
 *   GET  /st/stats            the counters
 *   POST /st/buffered         a buffered body with the route's own limit (4 MiB): "len=N"
 *   GET  /st/in-handler?n=N   N lines written with WRITE_BLOCK by the handler itself,
 *                             before it returns ("refused" where that is a host thread)
 *
 * Built with -DBLOCKING it is "streamblock", a plugin whose handlers run on the blocking
 * pool, with the same routes under /sb/.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "baton_plugin.h"

#ifdef BLOCKING
#define P "/sb"
#define NAME "streamblock"
#define FLAGS 0u
#else
#define P "/st"
#define NAME "streamtest"
#define FLAGS BATON_FLAG_NONBLOCKING
#endif

static const baton_host_api_t *host;
static atomic_long open_producers, cancelled, finished, written, drained, saw_closed;

static baton_str_t str(const char *s) {
    baton_str_t v = { (const uint8_t *)s, strlen(s) };
    return v;
}

static baton_str_t bytes(const void *p, size_t n) {
    baton_str_t v = { (const uint8_t *)p, n };
    return v;
}

/* The number after "name=" in the query, or def. */
static long long query_num(const baton_request_t *req, const char *name, long long def) {
    char q[256];
    size_t n = req->query.len < sizeof q - 1 ? req->query.len : sizeof q - 1;
    memcpy(q, req->query.ptr, n);
    q[n] = 0;
    size_t len = strlen(name);
    for (char *p = q; (p = strstr(p, name)) != NULL; p++) {
        if ((p == q || p[-1] == '&') && p[len] == '=') {
            return atoll(p + len + 1);
        }
    }
    return def;
}

static void sleep_ms(long ms) {
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&t, NULL);
}

struct job {
    baton_handle_t stream;
    baton_handle_t body;
    long long n;
};

static int start(void *(*fn)(void *), baton_handle_t stream, baton_handle_t body, long long n) {
    struct job *job = malloc(sizeof *job);
    if (job == NULL) {
        return 1;
    }
    job->stream = stream;
    job->body = body;
    job->n = n;
    pthread_t t;
    atomic_fetch_add(&open_producers, 1);
    if (pthread_create(&t, NULL, fn, job) != 0) {
        atomic_fetch_sub(&open_producers, 1);
        free(job);
        return 1;
    }
    pthread_detach(t);
    return 0;
}

/* The client went away: it must be visible both ways. */
static void gone(baton_handle_t s) {
    atomic_fetch_add(&cancelled, 1);
    if (host->stream_is_open(s) == 0) {
        atomic_fetch_add(&saw_closed, 1);
    }
}

static void *lines(void *arg) {
    struct job *job = arg;
    char line[64];
    for (long long i = 0; i < job->n; i++) {
        int len = snprintf(line, sizeof line, "chunk %lld\n", i);
        if (host->stream_write(job->stream, bytes(line, (size_t)len), BATON_WRITE_BLOCK) < 0) {
            gone(job->stream);
            goto out;
        }
    }
    host->stream_finish(job->stream);
    atomic_fetch_add(&finished, 1);
out:
    atomic_fetch_sub(&open_producers, 1);
    free(job);
    return NULL;
}

static void *slow(void *arg) {
    struct job *job = arg;
    static const uint8_t chunk[65536];
    long long left = job->n;
    while (left > 0) {
        size_t n = left < (long long)sizeof chunk ? (size_t)left : sizeof chunk;
        int64_t rc = host->stream_write(job->stream, bytes(chunk, n), BATON_WRITE_BLOCK);
        if (rc < 0) {
            gone(job->stream);
            goto out;
        }
        atomic_fetch_add(&written, (long)n);
        left -= (long long)n;
    }
    host->stream_finish(job->stream);
    atomic_fetch_add(&finished, 1);
out:
    atomic_fetch_sub(&open_producers, 1);
    free(job);
    return NULL;
}

static void post(void *user, baton_handle_t handle) {
    (void)handle;
    sem_post((sem_t *)user);
}

static void *forever(void *arg) {
    struct job *job = arg;
    static const uint8_t chunk[65536];
    sem_t room;
    sem_init(&room, 0, 0);
    for (;;) {
        int64_t rc = host->stream_write(job->stream, bytes(chunk, sizeof chunk), 0);
        if (rc == BATON_E_WOULD_BLOCK) {
            if (host->stream_on_writable(job->stream, post, &room) != BATON_OK) {
                gone(job->stream);
                break;
            }
            /* Called once: when there is room, or when the stream ended. */
            sem_wait(&room);
        } else if (rc < 0) {
            gone(job->stream);
            break;
        }
    }
    sem_destroy(&room);
    atomic_fetch_sub(&open_producers, 1);
    free(job);
    return NULL;
}

static atomic_int draining;

static void *ticker(void *arg) {
    struct job *job = arg;
    int told = 0;
    for (;;) {
        const char *what = "tick\n";
        if (atomic_load(&draining) && !told) {
            what = "draining\n";
            told = 1;
        }
        if (host->stream_write(job->stream, str(what), BATON_WRITE_BLOCK) < 0) {
            gone(job->stream);
            break;
        }
        sleep_ms(20);
    }
    atomic_fetch_sub(&open_producers, 1);
    free(job);
    return NULL;
}

static void *upload(void *arg) {
    struct job *job = arg;
    static _Thread_local uint8_t buf[65536];
    uint64_t hash = UINT64_C(0xcbf29ce484222325);
    long long total = 0;
    char out[96];
    for (;;) {
        int64_t n = host->body_read(job->body, buf, sizeof buf, BATON_WRITE_BLOCK);
        if (n == 0) {
            int len = snprintf(out, sizeof out, "bytes=%lld fnv=%016llx\n", total,
                               (unsigned long long)hash);
            host->stream_write(job->stream, bytes(out, (size_t)len), BATON_WRITE_BLOCK);
            host->stream_finish(job->stream);
            atomic_fetch_add(&finished, 1);
            break;
        }
        if (n == BATON_E_TOO_LARGE && job->n) {
            host->stream_fail(job->stream, str("too large"));
            break;
        }
        if (n == BATON_E_TOO_LARGE) {
            host->stream_set_status(job->stream, 413);
            host->stream_write(job->stream, str("too large\n"), BATON_WRITE_BLOCK);
            host->stream_finish(job->stream);
            break;
        }
        if (n < 0) {
            host->stream_fail(job->stream, str("upload cut off"));
            gone(job->stream);
            break;
        }
        for (int64_t i = 0; i < n; i++) {
            hash = (hash ^ buf[i]) * UINT64_C(0x100000001b3);
        }
        total += n;
    }
    atomic_fetch_sub(&open_producers, 1);
    free(job);
    return NULL;
}

static int32_t st_init(const baton_init_t *init, void **state) {
    host = init->host;
    *state = NULL;
    return 0;
}

static int32_t st_handle(void *state, const baton_request_t *req, const baton_host_api_t *h,
                         baton_response_t *resp) {
    (void)state;
    char text[256];
    switch (req->route) {
    case 0: { /* /st/thread */
        h->set_status(resp, 201);
        h->add_header(resp, str("x-deferred"), str("yes"));
        baton_handle_t s = h->defer(resp);
        if (s == 0 || h->defer(resp) != 0) {
            return 1;
        }
        return start(lines, s, 0, query_num(req, "n", 10));
    }
    case 1: { /* /st/slow */
        long long n = query_num(req, "bytes", 1 << 20);
        baton_handle_t s = h->defer(resp);
        if (query_num(req, "sized", 0)) {
            int len = snprintf(text, sizeof text, "%lld", n);
            h->stream_add_header(s, str("content-length"), bytes(text, (size_t)len));
        }
        return start(slow, s, 0, n);
    }
    case 2: /* /st/forever */
        return start(forever, h->defer(resp), 0, 0);
    case 3: /* /st/ticker */
        return start(ticker, h->defer(resp), 0, 0);
    case 4: { /* /st/inline-block */
        baton_handle_t s = h->defer(resp);
        int64_t rc = h->stream_write(s, str("x"), BATON_WRITE_BLOCK);
        h->stream_write(s, str(rc == BATON_E_INVALID ? "refused\n" : "accepted\n"), 0);
        h->stream_finish(s);
        return 0;
    }
    case 5: /* /st/upload */
    case 6: /* /st/small */
        return start(upload, h->defer(resp), req->body_stream, query_num(req, "fail", 0));
    case 7: { /* /st/stats */
        int len = snprintf(text, sizeof text,
                           "open=%ld cancelled=%ld finished=%ld written=%ld drained=%ld "
                           "saw_closed=%ld\n",
                           atomic_load(&open_producers), atomic_load(&cancelled),
                           atomic_load(&finished), atomic_load(&written),
                           atomic_load(&drained), atomic_load(&saw_closed));
        return h->write_body(resp, bytes(text, (size_t)len));
    }
    case 9: { /* /st/in-handler */
        baton_handle_t s = h->defer(resp);
        long long n = query_num(req, "n", 10);
        for (long long i = 0; i < n; i++) {
            int len = snprintf(text, sizeof text, "line %lld\n", i);
            int64_t rc = h->stream_write(s, bytes(text, (size_t)len), BATON_WRITE_BLOCK);
            if (rc == BATON_E_INVALID) {
                h->stream_write(s, str("refused\n"), 0);
                break;
            }
            if (rc < 0) {
                gone(s);
                return 0;
            }
        }
        h->stream_finish(s);
        return 0;
    }
    case 8: { /* /st/buffered */
        int len = snprintf(text, sizeof text, "len=%zu\n", req->body.len);
        return h->write_body(resp, bytes(text, (size_t)len));
    }
    default:
        return 1;
    }
}

static void st_drain(void *state) {
    (void)state;
    atomic_store(&draining, 1);
    atomic_fetch_add(&drained, 1);
}

static void st_shutdown(void *state) {
    (void)state;
}

static const baton_route_t routes[] = {
    { BATON_GET, 0, P "/thread" },  { BATON_GET, 0, P "/slow" },
    { BATON_GET, 0, P "/forever" }, { BATON_GET, 0, P "/ticker" },
    { BATON_GET, 0, P "/inline-block" }, { BATON_POST, 0, P "/upload" },
    { BATON_POST, 0, P "/small" },  { BATON_GET, 0, P "/stats" },
    { BATON_POST, 0, P "/buffered" }, { BATON_GET, 0, P "/in-handler" },
};

static const baton_route_ext_t route_ext[] = {
    { BATON_ROUTE_HTTP, 0, 0 }, { BATON_ROUTE_HTTP, 0, 0 }, { BATON_ROUTE_HTTP, 0, 0 },
    { BATON_ROUTE_HTTP, 0, 0 }, { BATON_ROUTE_HTTP, 0, 0 },
    { BATON_ROUTE_HTTP, BATON_ROUTE_STREAM_BODY, UINT64_C(512) << 20 },
    { BATON_ROUTE_HTTP, BATON_ROUTE_STREAM_BODY, 1000 },
    { BATON_ROUTE_HTTP, 0, 0 },
    { BATON_ROUTE_HTTP, 0, UINT64_C(4) << 20 },
    { BATON_ROUTE_HTTP, 0, 0 },
};

static const baton_plugin_v1_t descriptor = {
    .magic = BATON_PLUGIN_MAGIC,
    .abi_major = BATON_ABI_MAJOR,
    .abi_minor = BATON_ABI_MINOR,
    .struct_size = sizeof(baton_plugin_v1_t),
    .flags = FLAGS,
    .name = NAME,
    .version = "1.1.0",
    .routes = routes,
    .routes_len = sizeof routes / sizeof routes[0],
    .init = st_init,
    .handle = st_handle,
    .shutdown = st_shutdown,
    .route_ext = route_ext,
    .on_drain = st_drain,
};

const baton_plugin_v1_t *baton_plugin_v1(void) {
    return &descriptor;
}
