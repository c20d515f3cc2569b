/*
 * libFuzzer target: the mux core fed frame sequences from a hostile peer.
 *
 * The input is: one byte choosing the chunk size (bytes are fed in chunks, so partial
 * frames are exercised), then the peer's bytes. A valid HELLO from the peer is fed first
 * unless the low bit of the first byte is set, so most inputs reach the stream logic. The
 * owner behaves like the agent: it accepts every stream, drains data at once, answers
 * writable by sending, and drains output after every chunk. Invariants checked: the mux
 * never queues beyond a stream's room, and output is always whole frames.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"
#include "tunnel/mux.h"

struct owner {
    struct mux *m;
    uint8_t *out;
};

static void opened(void *ud, uint32_t id, const struct proto_open *o)
{
    struct owner *w = ud;
    if (o->port % 3 == 0)
        mux_stream_reject(w->m, id, PROTO_CODE_REFUSED, "connection refused");
    else
        mux_stream_accept(w->m, id, NULL);
}

static void open_result(void *ud, uint32_t id, void *s, uint32_t code, const char *t, size_t n)
{
    (void)ud, (void)id, (void)s, (void)code, (void)t, (void)n;
}

static void data(void *ud, uint32_t id, void *s, const uint8_t *p, size_t len)
{
    struct owner *w = ud;
    (void)s;
    (void)p;
    mux_stream_consumed(w->m, id, len);
}

static void fin(void *ud, uint32_t id, void *s)
{
    struct owner *w = ud;
    (void)s;
    mux_stream_shutdown(w->m, id);
}

static void writable(void *ud, uint32_t id, void *s)
{
    struct owner *w = ud;
    static const uint8_t junk[4096];
    (void)s;
    size_t room = mux_stream_room(w->m, id);
    if (id & 2) { /* half the streams write in place, as the agent's forwards do */
        uint8_t *space;
        int k = mux_stream_reserve(w->m, id, sizeof(junk), &space);
        if (k < 0 || (size_t)k > room || (k > 0 && !space))
            abort();
        if (k > 0) {
            memset(space, 0xa5, (size_t)k);
            if (mux_stream_commit(w->m, id, (size_t)k) != k)
                abort();
        }
        return;
    }
    int n = mux_stream_send(w->m, id, junk, room < sizeof(junk) ? room : sizeof(junk));
    if (n < 0 || (size_t)n > room)
        abort();
}

static void closed(void *ud, uint32_t id, void *s, uint32_t code, const char *t, size_t n)
{
    (void)ud, (void)id, (void)s, (void)code, (void)t, (void)n;
}

static void control(void *ud, json_t *msg)
{
    (void)ud;
    if (!json_is_object(msg))
        abort();
}

static void hello(void *ud, const struct proto_hello *h)
{
    (void)ud;
    (void)h;
}

static void goaway(void *ud, uint32_t code, const char *t, size_t n)
{
    (void)ud, (void)code, (void)t, (void)n;
}

static void want_write(void *ud)
{
    (void)ud;
}

static const struct mux_callbacks cb = {
    opened, open_result, data, fin, writable, closed, control, hello, goaway, want_write,
};

/* Drains output and checks that it is a sequence of whole, valid frames. */
static void drain(struct owner *w)
{
    for (int rounds = 0; rounds < 64 && mux_wants_output(w->m); rounds++) {
        size_t n = mux_output(w->m, w->out, MUX_OUTPUT_MIN);
        size_t off = 0;
        while (off < n) {
            struct proto_header h;
            if (proto_header_decode(w->out + off, n - off, PROTO_MAX_FRAME_PAYLOAD, &h) != 0)
                abort();
            off += PROTO_HEADER_SIZE + h.length;
        }
        if (off != n)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t len)
{
    if (len < 1)
        return 0;
    static uint8_t out[MUX_OUTPUT_MIN]; /* reused: allocating 1 MiB per input is slow */
    struct owner w;
    w.out = out;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.max_control_queue = 64 * 1024;
    w.m = mux_new(&cfg, &cb, &w, 0);
    size_t chunk = (size_t)(in[0] >> 1) % 97 + 1;
    uint64_t now = 0;
    if (!(in[0] & 1)) {
        uint8_t hello_frame[PROTO_HEADER_SIZE + PROTO_HELLO_SIZE];
        struct proto_hello h;
        proto_hello_default(&h);
        proto_header_encode(hello_frame, PROTO_HELLO, 0, 0, PROTO_HELLO_SIZE);
        proto_hello_encode(&h, hello_frame + PROTO_HEADER_SIZE);
        mux_feed(w.m, hello_frame, sizeof(hello_frame), now);
    }
    for (size_t off = 1; off < len; off += chunk) {
        size_t n = len - off < chunk ? len - off : chunk;
        int rc = mux_feed(w.m, in + off, n, now);
        drain(&w);
        now += 1000;
        if (mux_tick(w.m, now) < 0 || rc < 0)
            break;
    }
    mux_message_end(w.m);
    drain(&w);
    mux_fail_all(w.m, PROTO_CODE_CANCEL, "done");
    mux_free(w.m);
    return 0;
}
