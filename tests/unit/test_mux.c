/*
 * Unit tests for tunnel/mux: the sans-I/O stream multiplexer.
 *
 * Two kinds of tests, no sockets in either:
 *  - two muxes (agent and relay) pumped into each other, checking what their owners see;
 *  - one mux fed hand-built frames (proto's encoders), checking the frames it answers with.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tunnel/mux.h"

#define T0 1000000u      /* the tests' clock starts here (ms) */
#define MAX_RECORDS 64u  /* streams one test may see */
#define MAX_FRAMES 4096u /* frames one collect() may parse */

/* ---- what an owner saw ---- */

struct record {
    uint32_t id;
    bool opened;
    struct proto_open open;
    uint8_t *data;
    size_t len, cap;
    bool fin;
    int results;
    uint32_t result_code;
    char result_text[256];
    int closed;
    uint32_t close_code;
    char close_text[256];
    int writable;
};

enum open_policy { POLICY_ACCEPT, POLICY_REJECT, POLICY_DEFER };

struct end {
    struct mux *m;
    struct record rec[MAX_RECORDS];
    size_t nrec;
    enum open_policy policy;
    uint32_t reject_code;
    bool consume;      /* report data as drained at once */
    uint32_t stall_id; /* ...except on this stream */
    int hellos, goaways, want_write, closed_total;
    uint32_t goaway_code;
    char goaway_text[256];
    json_t *controls;
    bool reset_in_closed; /* fail_all test: call back into the mux from stream_closed */
};

static void copy_text(char *dst, size_t cap, const char *text, size_t len)
{
    if (len >= cap)
        len = cap - 1;
    if (len)
        memcpy(dst, text, len);
    dst[len] = '\0';
}

static struct record *rec(struct end *e, uint32_t id)
{
    for (size_t i = 0; i < e->nrec; i++)
        if (e->rec[i].id == id)
            return &e->rec[i];
    assert_true(e->nrec < MAX_RECORDS);
    struct record *r = &e->rec[e->nrec++];
    r->id = id;
    return r;
}

static void cb_opened(void *ud, uint32_t id, const struct proto_open *open)
{
    struct end *e = ud;
    struct record *r = rec(e, id);
    r->opened = true;
    r->open = *open;
    if (e->policy == POLICY_ACCEPT)
        assert_int_equal(mux_stream_accept(e->m, id, r), 0);
    else if (e->policy == POLICY_REJECT)
        assert_int_equal(mux_stream_reject(e->m, id, e->reject_code, "policy says no"), 0);
}

static void cb_open_result(void *ud, uint32_t id, void *sud, uint32_t code, const char *text,
                           size_t len)
{
    struct record *r = rec(ud, id);
    assert_ptr_equal(sud, r);
    r->results++;
    r->result_code = code;
    copy_text(r->result_text, sizeof(r->result_text), text, len);
}

static void cb_data(void *ud, uint32_t id, void *sud, const uint8_t *data, size_t len)
{
    struct end *e = ud;
    struct record *r = rec(e, id);
    assert_ptr_equal(sud, r);
    if (r->len + len > r->cap) {
        r->cap = (r->len + len) * 2;
        r->data = realloc(r->data, r->cap);
        assert_non_null(r->data);
    }
    memcpy(r->data + r->len, data, len);
    r->len += len;
    if (e->consume && id != e->stall_id)
        mux_stream_consumed(e->m, id, len);
}

static void cb_fin(void *ud, uint32_t id, void *sud)
{
    struct record *r = rec(ud, id);
    assert_ptr_equal(sud, r);
    r->fin = true;
}

static void cb_writable(void *ud, uint32_t id, void *sud)
{
    struct record *r = rec(ud, id);
    assert_ptr_equal(sud, r);
    r->writable++;
}

static void cb_closed(void *ud, uint32_t id, void *sud, uint32_t code, const char *text, size_t len)
{
    struct end *e = ud;
    struct record *r = rec(e, id);
    r->closed++;
    r->close_code = code;
    copy_text(r->close_text, sizeof(r->close_text), text, len);
    e->closed_total++;
    if (sud)
        assert_ptr_equal(sud, r);
    if (e->reset_in_closed) {
        /* The stream is already gone; the mux must stay consistent. */
        assert_int_equal(mux_stream_reset(e->m, id, PROTO_CODE_CANCEL, "late"), MUX_E_NOSTREAM);
        assert_int_equal(mux_stream_send(e->m, id, (const uint8_t *)"x", 1), MUX_E_NOSTREAM);
    }
}

static void cb_control(void *ud, json_t *msg)
{
    struct end *e = ud;
    json_array_append(e->controls, msg);
}

static void cb_hello(void *ud, const struct proto_hello *peer)
{
    (void)peer;
    ((struct end *)ud)->hellos++;
}

static void cb_goaway(void *ud, uint32_t code, const char *text, size_t len)
{
    struct end *e = ud;
    e->goaways++;
    e->goaway_code = code;
    copy_text(e->goaway_text, sizeof(e->goaway_text), text, len);
}

static void cb_want_write(void *ud)
{
    ((struct end *)ud)->want_write++;
}

static const struct mux_callbacks callbacks = {
    .stream_opened = cb_opened,
    .stream_open_result = cb_open_result,
    .stream_data = cb_data,
    .stream_fin = cb_fin,
    .stream_writable = cb_writable,
    .stream_closed = cb_closed,
    .control = cb_control,
    .hello = cb_hello,
    .goaway = cb_goaway,
    .want_write = cb_want_write,
};

static struct end *end_new(const struct mux_config *cfg)
{
    struct end *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    e->consume = true;
    e->controls = json_array();
    e->m = mux_new(cfg, &callbacks, e, T0);
    assert_non_null(e->m);
    return e;
}

static struct end *end_role(enum mux_role role)
{
    struct mux_config cfg;
    mux_config_default(&cfg, role);
    return end_new(&cfg);
}

static void end_free(struct end *e)
{
    mux_free(e->m);
    for (size_t i = 0; i < e->nrec; i++)
        free(e->rec[i].data);
    json_decref(e->controls);
    free(e);
}

/* ---- moving bytes ---- */

static uint8_t *outbuf(void)
{
    uint8_t *b = malloc(MUX_OUTPUT_MIN);
    assert_non_null(b);
    return b;
}

/* One batch from a into b, as one websocket message. Returns its size. */
static size_t pump_once(struct end *a, struct end *b)
{
    uint8_t *buf = outbuf();
    size_t n = mux_output(a->m, buf, MUX_OUTPUT_MIN);
    if (n) {
        assert_int_equal(mux_feed(b->m, buf, n, T0), 0);
        assert_int_equal(mux_message_end(b->m), 0);
    }
    free(buf);
    return n;
}

/* Until neither side has anything to say. */
static void pump(struct end *a, struct end *b)
{
    while (pump_once(a, b) + pump_once(b, a) > 0)
        ;
    assert_false(mux_wants_output(a->m));
    assert_false(mux_wants_output(b->m));
}

static struct proto_open tcp_open(const char *host, uint16_t port)
{
    struct proto_open o;
    memset(&o, 0, sizeof(o));
    o.kind = PROTO_KIND_TCP;
    o.port = port;
    snprintf(o.host, sizeof(o.host), "%s", host);
    return o;
}

/* Opens a tcp stream; the owner's record for it is the stream's user pointer. */
static uint32_t open_stream(struct end *e)
{
    struct proto_open o = tcp_open("127.0.0.1", 8080);
    uint32_t id = 0;
    assert_int_equal(mux_stream_open(e->m, &o, NULL, &id), 0);
    mux_stream_set_user(e->m, id, rec(e, id));
    return id;
}

/* Deterministic test bytes: stream id and offset both show in them. */
static void pattern(uint8_t *p, size_t n, uint32_t id, size_t off)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)((off + i) * 31 + id);
}

static bool pattern_ok(const uint8_t *p, size_t n, uint32_t id)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (uint8_t)(i * 31 + id))
            return false;
    return true;
}

/* Sends as much of total as the stream takes now; returns the new offset. */
static size_t send_some(struct end *e, uint32_t id, size_t off, size_t total)
{
    uint8_t chunk[8192];
    while (off < total) {
        size_t n = total - off < sizeof(chunk) ? total - off : sizeof(chunk);
        pattern(chunk, n, id, off);
        int k = mux_stream_send(e->m, id, chunk, n);
        assert_true(k >= 0);
        if (k == 0)
            break;
        off += (size_t)k;
    }
    return off;
}

/* send_some through mux_stream_reserve / mux_stream_commit, in reads of at most want. */
static size_t reserve_some(struct end *e, uint32_t id, size_t off, size_t total, size_t want)
{
    while (off < total) {
        uint8_t *space;
        size_t left = total - off < want ? total - off : want;
        int k = mux_stream_reserve(e->m, id, left, &space);
        assert_true(k >= 0);
        if (k == 0)
            break;
        assert_non_null(space);
        assert_true((size_t)k <= left);
        pattern(space, (size_t)k, id, off);
        assert_int_equal(mux_stream_commit(e->m, id, (size_t)k), k);
        off += (size_t)k;
    }
    return off;
}

/*
 * Allocation failures on purpose: the test binary is linked with --wrap=malloc, so the
 * mux's malloc calls come here. malloc_failures_after: -1 never fails, N lets N more
 * allocations through and fails the ones after.
 */
void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);
static int malloc_failures_after = -1;

void *__wrap_malloc(size_t n)
{
    if (malloc_failures_after == 0)
        return NULL;
    if (malloc_failures_after > 0)
        malloc_failures_after--;
    return __real_malloc(n);
}

/* ---- hand-built frames and parsed output ---- */

struct wire {
    uint8_t *b;
    size_t n, cap;
};

static void put_frame(struct wire *w, uint8_t type, uint16_t flags, uint32_t stream,
                      const void *payload, size_t len)
{
    if (w->n + PROTO_HEADER_SIZE + len > w->cap) {
        w->cap = (w->n + PROTO_HEADER_SIZE + len) * 2;
        w->b = realloc(w->b, w->cap);
        assert_non_null(w->b);
    }
    proto_header_encode(w->b + w->n, type, flags, stream, (uint32_t)len);
    if (len)
        memcpy(w->b + w->n + PROTO_HEADER_SIZE, payload, len);
    w->n += PROTO_HEADER_SIZE + len;
}

static void wire_append(struct wire *w, const uint8_t *p, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2;
        w->b = realloc(w->b, w->cap);
        assert_non_null(w->b);
    }
    memcpy(w->b + w->n, p, n);
    w->n += n;
}

/* Feeds one frame as one message; returns mux_feed's result. */
static int feed_frame(struct end *e, uint8_t type, uint16_t flags, uint32_t stream,
                      const void *payload, size_t len)
{
    struct wire w = {0};
    put_frame(&w, type, flags, stream, payload, len);
    int rc = mux_feed(e->m, w.b, w.n, T0);
    if (rc == 0)
        rc = mux_message_end(e->m);
    free(w.b);
    return rc;
}

static int feed_hello(struct end *e, const struct proto_hello *h)
{
    struct proto_hello d;
    uint8_t p[PROTO_HELLO_SIZE];
    if (!h) {
        proto_hello_default(&d);
        h = &d;
    }
    proto_hello_encode(h, p);
    return feed_frame(e, PROTO_HELLO, 0, 0, p, sizeof(p));
}

static int feed_open(struct end *e, uint32_t id, uint8_t kind)
{
    uint8_t p[PROTO_MAX_OPEN];
    struct proto_open o = tcp_open("localhost", 22);
    o.kind = kind;
    int n = proto_open_encode(&o, p, sizeof(p));
    if (n < 0) { /* a kind proto cannot encode: hand-build its 4-byte prefix */
        memset(p, 0, 4);
        p[0] = kind;
        n = 4;
    }
    return feed_frame(e, PROTO_OPEN, 0, id, p, (size_t)n);
}

static int feed_credit(struct end *e, uint32_t id, uint64_t off)
{
    uint8_t p[8];
    proto_credit_encode(off, p);
    return feed_frame(e, PROTO_CREDIT, 0, id, p, sizeof(p));
}

static int feed_reason(struct end *e, uint8_t type, uint32_t id, uint32_t code)
{
    uint8_t p[PROTO_REASON_MAX];
    size_t n = proto_reason_encode(code, "because", p);
    return feed_frame(e, type, 0, id, p, n);
}

struct frame {
    struct proto_header h;
    const uint8_t *p;
};

struct frames {
    struct frame f[MAX_FRAMES];
    size_t n;
    struct wire raw;
};

/* Everything the mux wants to send, parsed; checks that it is well-formed. */
static void collect(struct end *e, struct frames *fs)
{
    uint8_t *buf = outbuf();
    size_t n;
    free(fs->raw.b);
    memset(fs, 0, sizeof(*fs));
    while ((n = mux_output(e->m, buf, MUX_OUTPUT_MIN)) > 0) {
        fs->raw.b = realloc(fs->raw.b, fs->raw.n + n);
        assert_non_null(fs->raw.b);
        memcpy(fs->raw.b + fs->raw.n, buf, n);
        fs->raw.n += n;
    }
    free(buf);
    for (size_t off = 0; off < fs->raw.n;) {
        struct frame *f = &fs->f[fs->n++];
        assert_true(fs->n <= MAX_FRAMES);
        assert_int_equal(
            proto_header_decode(fs->raw.b + off, fs->raw.n - off, PROTO_MAX_FRAME_PAYLOAD, &f->h),
            0);
        f->p = fs->raw.b + off + PROTO_HEADER_SIZE;
        off += PROTO_HEADER_SIZE + f->h.length;
        assert_true(off <= fs->raw.n);
    }
}

static void frames_free(struct frames *fs)
{
    free(fs->raw.b);
    fs->raw.b = NULL;
}

static const struct frame *find_frame(const struct frames *fs, uint8_t type, uint32_t stream)
{
    for (size_t i = 0; i < fs->n; i++)
        if (fs->f[i].h.type == type && fs->f[i].h.stream == stream)
            return &fs->f[i];
    return NULL;
}

static size_t count_type(const struct frames *fs, uint8_t type)
{
    size_t n = 0;
    for (size_t i = 0; i < fs->n; i++)
        n += fs->f[i].h.type == type;
    return n;
}

/* Asserts the frame is there and carries code; returns its text (NUL-terminated copy). */
static void expect_reason(struct end *e, uint8_t type, uint32_t stream, uint32_t code, char *text,
                          size_t cap)
{
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    const struct frame *f = find_frame(fs, type, stream);
    assert_non_null(f);
    struct proto_reason r;
    if (type == PROTO_GOAWAY)
        assert_int_equal(proto_goaway_decode(f->p, f->h.length, &r), 0);
    else
        assert_int_equal(proto_reason_decode(f->p, f->h.length, &r), 0);
    assert_int_equal(r.code, code);
    if (text)
        copy_text(text, cap, r.text, r.text_len);
    frames_free(fs);
    free(fs);
}

static void expect_goaway(struct end *e, const char *needle)
{
    char text[PROTO_MAX_TEXT + 1];
    expect_reason(e, PROTO_GOAWAY, 0, PROTO_CODE_PROTOCOL, text, sizeof(text));
    if (needle && !strstr(text, needle))
        fail_msg("GOAWAY text \"%s\" lacks \"%s\"", text, needle);
    /* A dead connection parses nothing more, even a valid frame. */
    assert_int_equal(feed_frame(e, PROTO_PING, 0, 0, "12345678", 8), MUX_E_PROTOCOL);
    assert_false(mux_wants_output(e->m));
}

static void expect_silence(struct end *e)
{
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    assert_int_equal(fs->n, 0);
    frames_free(fs);
    free(fs);
}

/* A mux of role with the peer's HELLO fed and its own HELLO already collected. */
static struct end *solo(enum mux_role role, const struct mux_config *cfg)
{
    struct end *e = cfg ? end_new(cfg) : end_role(role);
    assert_int_equal(feed_hello(e, NULL), 0);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    assert_int_equal(fs->n, 1);
    assert_int_equal(fs->f[0].h.type, PROTO_HELLO);
    frames_free(fs);
    free(fs);
    return e;
}

/* A relay-opened stream accepted by an agent mux fed by hand. */
static struct end *solo_accepted(uint32_t id, const struct mux_config *cfg)
{
    struct end *e = solo(MUX_ROLE_AGENT, cfg);
    assert_int_equal(feed_open(e, id, PROTO_KIND_SSH), 0);
    assert_true(rec(e, id)->opened);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    assert_non_null(find_frame(fs, PROTO_OPEN_OK, id));
    frames_free(fs);
    free(fs);
    return e;
}

/* ---- tests: two muxes ---- */

static void test_hello_exchange(void **state)
{
    (void)state;
    struct mux_config ca, cb;
    mux_config_default(&ca, MUX_ROLE_AGENT);
    mux_config_default(&cb, MUX_ROLE_RELAY);
    cb.local.max_frame_payload = 32 * 1024;
    cb.local.initial_window = 64 * 1024;
    cb.local.max_streams = 7;
    struct end *a = end_new(&ca), *b = end_new(&cb);
    uint32_t id;
    struct proto_open o = tcp_open("localhost", 80);

    assert_false(mux_peer_hello_received(a->m));
    assert_true(mux_wants_output(a->m));
    assert_int_equal(mux_stream_open(a->m, &o, NULL, &id), MUX_E_NOTREADY);
    pump(a, b);
    assert_int_equal(a->hellos, 1);
    assert_int_equal(b->hellos, 1);
    assert_true(mux_peer_hello_received(a->m));
    assert_int_equal(mux_peer_limits(a->m)->max_frame_payload, 32 * 1024);
    assert_int_equal(mux_peer_limits(a->m)->initial_window, 64 * 1024);
    assert_int_equal(mux_peer_limits(a->m)->max_streams, 7);
    assert_int_equal(mux_peer_limits(b->m)->initial_window, PROTO_DEFAULT_WINDOW);
    assert_true(a->want_write > 0);
    end_free(a);
    end_free(b);
}

static void test_open_data_fin_both_ways(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t id = open_stream(a);
    assert_int_equal(id, 1);
    /* Before OPEN_OK the initial window may be queued but nothing is sent. */
    assert_int_equal(mux_stream_room(a->m, id), PROTO_DEFAULT_WINDOW);
    assert_int_equal(mux_stream_send(a->m, id, (const uint8_t *)"hello", 5), 5);
    assert_int_equal(mux_stream_queued(a->m, id), 5);
    pump(a, b);
    struct record *ra = rec(a, id), *rb = rec(b, id);
    assert_true(rb->opened);
    assert_int_equal(rb->open.kind, PROTO_KIND_TCP);
    assert_int_equal(rb->open.port, 8080);
    assert_string_equal(rb->open.host, "127.0.0.1");
    assert_int_equal(ra->results, 1);
    assert_int_equal(ra->result_code, 0);
    assert_int_equal(ra->writable, 1); /* once after OPEN_OK */
    assert_int_equal(rb->len, 5);
    assert_memory_equal(rb->data, "hello", 5);
    assert_int_equal(mux_stream_queued(a->m, id), 0);

    /* Several windows each way, so that credit has to flow back. */
    size_t total = 3 * PROTO_DEFAULT_WINDOW + 123, offa = 0, offb = 0;
    while (offa < total || offb < total) {
        offa = send_some(a, id, offa, total);
        offb = send_some(b, id, offb, total);
        pump(a, b);
    }
    assert_int_equal(rb->len, 5 + total);
    assert_true(pattern_ok(rb->data + 5, total, id));
    assert_int_equal(ra->len, total);
    assert_true(pattern_ok(ra->data, total, id));
    assert_true(ra->writable > 1); /* the window filled and credit reopened it */

    assert_int_equal(mux_stream_shutdown(a->m, id), 0);
    assert_int_equal(mux_stream_room(a->m, id), 0);
    assert_int_equal(mux_stream_send(a->m, id, (const uint8_t *)"x", 1), MUX_E_NOSTREAM);
    pump(a, b);
    assert_true(rb->fin);
    assert_false(ra->fin);
    assert_int_equal(rb->closed + ra->closed, 0); /* half-closed: b may still send */
    /* The last words span several frames; FIN must ride only the last of them. */
    size_t last = 3 * PROTO_DEFAULT_FRAME_PAYLOAD / 2;
    uint8_t *bye = malloc(last);
    pattern(bye, last, 99, 0);
    assert_int_equal(mux_stream_send(b->m, id, bye, last), last);
    assert_int_equal(mux_stream_shutdown(b->m, id), 0);
    pump(a, b);
    assert_true(ra->fin);
    assert_int_equal(ra->len, total + last);
    assert_memory_equal(ra->data + total, bye, last);
    free(bye);
    assert_int_equal(ra->closed, 1);
    assert_int_equal(ra->close_code, 0);
    assert_int_equal(rb->closed, 1);
    assert_int_equal(rb->close_code, 0);
    assert_int_equal(mux_stream_count(a->m), 0);
    assert_int_equal(mux_stream_count(b->m), 0);
    end_free(a);
    end_free(b);
}

static void test_reject(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    b->policy = POLICY_REJECT;
    b->reject_code = PROTO_CODE_FORBIDDEN;
    pump(a, b);
    uint32_t id = open_stream(a);
    assert_int_equal(mux_stream_send(a->m, id, (const uint8_t *)"lost", 4), 4);
    pump(a, b);
    struct record *ra = rec(a, id);
    assert_int_equal(ra->results, 1);
    assert_int_equal(ra->result_code, PROTO_CODE_FORBIDDEN);
    assert_string_equal(ra->result_text, "policy says no");
    assert_int_equal(ra->closed, 0);
    assert_int_equal(rec(b, id)->len, 0);
    assert_int_equal(mux_stream_count(a->m), 0);
    assert_int_equal(mux_stream_count(b->m), 0);
    /* Ids are never reused. */
    assert_int_equal(open_stream(a), 3);
    end_free(a);
    end_free(b);
}

static void test_stalled_consumer_stalls_only_its_stream(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t slow = open_stream(a), fast = open_stream(a);
    b->stall_id = slow;
    size_t total = 4 * PROTO_DEFAULT_WINDOW, off_slow = 0, off_fast = 0;
    for (int round = 0; round < 64 && off_fast < total; round++) {
        off_slow = send_some(a, slow, off_slow, total);
        off_fast = send_some(a, fast, off_fast, total);
        pump(a, b);
    }
    assert_int_equal(off_slow, PROTO_DEFAULT_WINDOW);
    assert_int_equal(mux_stream_room(a->m, slow), 0);
    assert_int_equal(rec(b, slow)->len, PROTO_DEFAULT_WINDOW);
    assert_int_equal(off_fast, total);
    assert_int_equal(rec(b, fast)->len, total);
    assert_true(pattern_ok(rec(b, fast)->data, total, fast));

    /* Draining the stalled stream reopens it: stream_writable, then more room. */
    int writable = rec(a, slow)->writable;
    mux_stream_consumed(b->m, slow, PROTO_DEFAULT_WINDOW);
    pump(a, b);
    assert_int_equal(rec(a, slow)->writable, writable + 1);
    assert_int_equal(mux_stream_room(a->m, slow), PROTO_DEFAULT_WINDOW);
    end_free(a);
    end_free(b);
}

static void test_round_robin_fairness(void **state)
{
    (void)state;
    struct mux_config ca, cb;
    mux_config_default(&ca, MUX_ROLE_AGENT);
    mux_config_default(&cb, MUX_ROLE_RELAY);
    cb.local.max_frame_payload = PROTO_MIN_FRAME_PAYLOAD;
    cb.local.initial_window = 4 * 1024 * 1024;
    struct end *a = end_new(&ca), *b = end_new(&cb);
    pump(a, b);
    uint32_t s1 = open_stream(a), s3 = open_stream(a);
    pump(a, b);
    /* Each queue alone would fill more than the batch. */
    size_t each = 2 * 1024 * 1024 - 5000, extra = 300000;
    /* s3 first, so that s1 gets the batch's short last frame: s1's later reads are not
     * aligned to the frame size and one of them straddles the end of its ring. */
    assert_int_equal(send_some(a, s3, 0, each), each);
    assert_int_equal(send_some(a, s1, 0, each), each);

    uint8_t *buf = outbuf();
    size_t n = mux_output(a->m, buf, MUX_OUTPUT_MIN);
    assert_true(n > MUX_OUTPUT_MIN - PROTO_HEADER_SIZE - PROTO_MIN_FRAME_PAYLOAD);
    size_t bytes[2] = {0, 0};
    for (size_t off = 0; off < n;) {
        struct proto_header h;
        assert_int_equal(proto_header_decode(buf + off, n - off, cb.local.max_frame_payload, &h),
                         0);
        assert_int_equal(h.type, PROTO_DATA);
        bytes[h.stream == s3] += h.length;
        off += PROTO_HEADER_SIZE + h.length;
    }
    assert_true(bytes[0] > n * 2 / 5);
    assert_true(bytes[1] > n * 2 / 5);
    /* More data after a partial drain: the queue's storage wraps around. */
    assert_int_equal(send_some(a, s1, each, each + extra), each + extra);
    /* The batch is valid input for the peer, and both streams arrive intact. */
    assert_int_equal(mux_feed(b->m, buf, n, T0), 0);
    free(buf);
    pump(a, b);
    assert_int_equal(rec(b, s1)->len, each + extra);
    assert_true(pattern_ok(rec(b, s1)->data, each + extra, s1));
    assert_int_equal(rec(b, s3)->len, each);
    assert_true(pattern_ok(rec(b, s1)->data, each, s1));
    assert_true(pattern_ok(rec(b, s3)->data, each, s3));
    end_free(a);
    end_free(b);
}

/*
 * Reserve and commit carry bytes as send does: several windows, the queue's storage
 * growing by doubling from 4 KiB when it is full, never more than the room offered, and
 * the ring's wrap splitting reads.
 */
static void test_reserve_commit_carries_bytes(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t id = open_stream(a);
    pump(a, b);
    uint8_t *space;
    /* An empty queue offers QUEUE_MIN (4 KiB); a full one doubles its storage at most. */
    assert_int_equal(mux_stream_reserve(a->m, id, 65536, &space), 4096);
    assert_int_equal(mux_stream_commit(a->m, id, 0), 0);
    assert_int_equal(reserve_some(a, id, 0, 4096, 65536), 4096);
    assert_int_equal(mux_stream_reserve(a->m, id, 65536, &space), 4096);
    assert_int_equal(mux_stream_queue_storage(a->m, id), 8192);
    /* A commit beyond the reserve, or on a stream that is not there, is refused. */
    assert_int_equal(mux_stream_commit(a->m, id, 4097), MUX_E_INVALID);
    assert_int_equal(mux_stream_commit(a->m, id, 1), MUX_E_INVALID); /* no reserve before */
    assert_int_equal(mux_stream_commit(a->m, 999, 1), MUX_E_NOSTREAM);
    assert_int_equal(mux_stream_reserve(a->m, 999, 10, &space), MUX_E_NOSTREAM);
    assert_null(space);
    assert_int_equal(mux_stream_queued(a->m, id), 4096);

    /* Up to the window: the last reserve offers exactly what is left, then nothing. */
    size_t off = reserve_some(a, id, 4096, 10 * PROTO_DEFAULT_WINDOW, 65536);
    assert_int_equal(off, PROTO_DEFAULT_WINDOW);
    assert_int_equal(mux_stream_reserve(a->m, id, 65536, &space), 0);

    /* Drain part of the queue so that the next bytes wrap around the ring. */
    uint8_t *buf = outbuf();
    size_t n = mux_output(a->m, buf, PROTO_HEADER_SIZE + PROTO_DEFAULT_FRAME_PAYLOAD);
    assert_int_equal(n, PROTO_HEADER_SIZE + PROTO_DEFAULT_FRAME_PAYLOAD);
    assert_int_equal(mux_feed(b->m, buf, n, T0), 0);
    free(buf);
    pump(a, b); /* b's credit comes back, the rest goes out */
    size_t total = 3 * PROTO_DEFAULT_WINDOW + 123;
    while (off < total) {
        off = reserve_some(a, id, off, total, 65536);
        pump(a, b);
    }
    struct record *rb = rec(b, id);
    assert_int_equal(rb->len, total);
    assert_true(pattern_ok(rb->data, total, id));
    end_free(a);
    end_free(b);
}

/* A reserve that meets the ring's end offers only the space up to it; the commit of it,
 * and the next reserve at the ring's start, keep the bytes in order. */
static void test_reserve_stops_at_the_rings_end(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t id = open_stream(a);
    pump(a, b);
    /* 16 KiB of storage, full; then 10 KiB of it sent: head at 10 KiB, 6 KiB queued. */
    assert_int_equal(send_some(a, id, 0, 16384), 16384);
    assert_int_equal(mux_stream_queue_storage(a->m, id), 16384);
    uint8_t *buf = outbuf();
    size_t n = mux_output(a->m, buf, PROTO_HEADER_SIZE + 10240);
    assert_int_equal(n, PROTO_HEADER_SIZE + 10240);
    uint8_t *space;
    /* The tail is at the ring's end: the free 10 KiB lie at its start, before the head. */
    int k = mux_stream_reserve(a->m, id, 65536, &space);
    assert_int_equal(k, 10240);
    pattern(space, 10240, id, 16384);
    assert_int_equal(mux_stream_commit(a->m, id, 10240), 10240);
    assert_int_equal(mux_stream_queue_storage(a->m, id), 16384);
    /* Full again: the next reserve grows the storage, copying the wrapped bytes in order. */
    assert_int_equal(reserve_some(a, id, 16384 + 10240, 16384 + 10240 + 5000, 65536),
                     16384 + 10240 + 5000);
    assert_int_equal(mux_stream_queue_storage(a->m, id), 32768);
    assert_int_equal(mux_feed(b->m, buf, n, T0), 0);
    free(buf);
    pump(a, b);
    struct record *rb = rec(b, id);
    assert_int_equal(rb->len, 16384 + 10240 + 5000);
    assert_true(pattern_ok(rb->data, rb->len, id));
    end_free(a);
    end_free(b);
}

/* A RST that cannot be queued (out of memory): the stream is forgotten all the same, since
 * its owner may free what it pointed to, and the connection ends. */
static void test_reset_out_of_memory_forgets_the_stream(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t id = open_stream(a), other = open_stream(a);
    pump(a, b);
    assert_int_equal(mux_stream_count(a->m), 2);
    malloc_failures_after = 0;
    int rc = mux_stream_reset(a->m, id, PROTO_CODE_CANCEL, "gone");
    malloc_failures_after = -1;
    assert_int_equal(rc, MUX_E_NOMEM);
    assert_int_equal(mux_stream_count(a->m), 1);
    assert_int_equal(mux_stream_room(a->m, id), 0);
    assert_int_equal(rec(a, id)->closed, 0); /* no stream_closed: the owner asked */
    assert_true(mux_is_closing(a->m));
    /* The peer is out of step: nothing more is taken from it, nor sent to it. */
    assert_int_equal(mux_stream_send(a->m, other, (const uint8_t *)"x", 1), MUX_E_CLOSED);
    uint8_t ping[PROTO_HEADER_SIZE + 8] = {0};
    proto_header_encode(ping, PROTO_PING, 0, 0, 8);
    assert_int_equal(mux_feed(a->m, ping, sizeof(ping), T0), MUX_E_PROTOCOL);
    end_free(a);
    end_free(b);
}

/* A busy stream keeps its queue's storage between batches (no allocation per batch); the
 * storage goes back at the second tick without a send, and a small queue is never freed. */
static void test_queue_storage_kept_while_busy(void **state)
{
    (void)state;
    struct mux_config ca, cb;
    mux_config_default(&ca, MUX_ROLE_AGENT);
    mux_config_default(&cb, MUX_ROLE_RELAY);
    struct end *a = end_new(&ca), *b = end_new(&cb);
    pump(a, b);
    uint32_t id = open_stream(a), small = open_stream(a);
    pump(a, b);
    size_t off = 0, chunk = 100000;
    off = send_some(a, id, off, off + chunk);
    assert_int_equal(off, chunk);
    assert_int_equal(send_some(a, small, 0, 100), 100);
    pump(a, b);
    assert_int_equal(mux_stream_queued(a->m, id), 0);
    size_t storage = mux_stream_queue_storage(a->m, id);
    assert_true(storage >= chunk);
    assert_int_not_equal(mux_stream_queue_storage(a->m, small), 0);
    /* Busy: a send between every two ticks keeps the same storage. */
    for (int i = 0; i < 4; i++) {
        assert_int_equal(mux_tick(a->m, T0 + (uint64_t)i), 0);
        assert_int_equal(send_some(a, id, off, off + chunk), off + chunk);
        off += chunk;
        pump(a, b);
        assert_int_equal(mux_stream_queue_storage(a->m, id), storage);
    }
    /* Idle: the first tick clears the mark of the last send, the second frees. */
    assert_int_equal(mux_tick(a->m, T0 + 10), 0);
    assert_int_equal(mux_stream_queue_storage(a->m, id), storage);
    assert_int_equal(mux_tick(a->m, T0 + 11), 0);
    assert_int_equal(mux_stream_queue_storage(a->m, id), 0);
    assert_int_not_equal(mux_stream_queue_storage(a->m, small), 0);
    /* Freed storage grows again on the next send, and the bytes still arrive in order. */
    assert_int_equal(send_some(a, id, off, off + chunk), off + chunk);
    off += chunk;
    pump(a, b);
    assert_int_equal(rec(b, id)->len, off);
    assert_true(pattern_ok(rec(b, id)->data, off, id));
    end_free(a);
    end_free(b);
}

/* Runs a little session, capturing every byte a sends, and returns them. */
static struct wire scripted_session(struct end *a, struct end *b)
{
    struct wire w = {0};
    uint8_t *buf = outbuf();
    json_t *msg = json_pack("{s:s, s:s}", "type", "note", "key", "value");
    uint32_t id = 0;
    for (int step = 0; step < 6; step++) {
        if (step == 1) {
            id = open_stream(a);
            assert_int_equal(send_some(a, id, 0, 100000), 100000);
            assert_int_equal(mux_send_control(a->m, msg), 0);
        } else if (step == 3) {
            assert_int_equal(mux_stream_shutdown(a->m, id), 0);
        }
        size_t n;
        while ((n = mux_output(a->m, buf, MUX_OUTPUT_MIN)) > 0) {
            wire_append(&w, buf, n);
            assert_int_equal(mux_feed(b->m, buf, n, T0), 0);
        }
        pump_once(b, a);
    }
    json_decref(msg);
    free(buf);
    return w;
}

static void test_byte_at_a_time_equals_whole(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    struct end *c = end_role(MUX_ROLE_RELAY);
    /* c gets exactly what b got, one byte per call; its answers go nowhere. */
    struct wire w = scripted_session(a, b);
    assert_true(w.n > 100000);
    for (size_t i = 0; i < w.n; i++)
        assert_int_equal(mux_feed(c->m, w.b + i, 1, T0), 0);
    assert_int_equal(mux_message_end(c->m), 0);
    assert_int_equal(c->hellos, 1);
    assert_int_equal(b->nrec, 1);
    assert_int_equal(c->nrec, 1);
    struct record *rb = &b->rec[0], *rc = &c->rec[0];
    assert_int_equal(rc->id, rb->id);
    assert_true(rc->opened);
    assert_int_equal(rc->open.port, rb->open.port);
    assert_string_equal(rc->open.host, rb->open.host);
    assert_int_equal(rb->len, 100000);
    assert_int_equal(rc->len, rb->len);
    assert_memory_equal(rc->data, rb->data, rb->len);
    assert_true(pattern_ok(rc->data, rc->len, rc->id));
    assert_true(rb->fin);
    assert_true(rc->fin);
    assert_int_equal(json_array_size(c->controls), 1);
    assert_true(json_equal(b->controls, c->controls));
    free(w.b);
    end_free(a);
    end_free(b);
    end_free(c);
}

static void test_control_round_trip(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    json_t *hello =
        json_pack("{s:s, s:s, s:s, s:s, s:s, s:[s]}", "type", "hello", "version", "0.1.0", "os",
                  "linux", "arch", "amd64", "hostname", "ws-1", "capabilities", "pty");
    json_t *future = json_pack("{s:s, s:i}", "type", "from_the_future", "n", 42);
    json_t *bad = json_pack("{s:s}", "type", "hello"); /* required fields missing */
    assert_int_equal(mux_send_control(a->m, hello), 0);
    assert_int_equal(mux_send_control(a->m, future), 0);
    assert_int_equal(mux_send_control(a->m, bad), PROTO_E_JSON);
    pump(a, b);
    assert_int_equal(json_array_size(b->controls), 2);
    assert_true(json_equal(json_array_get(b->controls, 0), hello));
    assert_true(json_equal(json_array_get(b->controls, 1), future));
    json_decref(hello);
    json_decref(future);
    json_decref(bad);
    end_free(a);
    end_free(b);
}

static void test_send_control_full(void **state)
{
    (void)state;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.max_control_queue = 300;
    struct end *a = end_new(&cfg);
    json_t *msg = json_pack("{s:s, s:s}", "type", "note", "line", "0123456789012345678901234");
    char *text = json_dumps(msg, JSON_COMPACT);
    size_t frame = PROTO_HEADER_SIZE + strlen(text), hello = PROTO_HEADER_SIZE + PROTO_HELLO_SIZE;
    free(text);
    size_t sent = 0;
    int rc;
    while ((rc = mux_send_control(a->m, msg)) == 0)
        sent++;
    assert_int_equal(rc, MUX_E_FULL);
    assert_int_equal(sent, (300 - hello) / frame);
    /* Once the transport wrote the queue out, there is room again. */
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(a, fs);
    assert_int_equal(count_type(fs, PROTO_CONTROL), sent);
    assert_int_equal(mux_send_control(a->m, msg), 0);
    frames_free(fs);
    free(fs);
    json_decref(msg);
    end_free(a);
}

static void test_goaway_then_open_refused(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t id = open_stream(a);
    pump(a, b);
    assert_int_equal(mux_goaway(a->m, PROTO_CODE_SHUTDOWN, "bye"), 0);
    assert_int_equal(mux_goaway(a->m, PROTO_CODE_REPLACED, "again"), 0); /* sent once only */
    pump(a, b);
    assert_int_equal(b->goaways, 1);
    assert_int_equal(b->goaway_code, PROTO_CODE_SHUTDOWN);
    assert_string_equal(b->goaway_text, "bye");
    assert_true(mux_is_closing(a->m));
    assert_true(mux_is_closing(b->m));
    struct proto_open o = tcp_open("localhost", 1);
    uint32_t nid;
    assert_int_equal(mux_stream_open(a->m, &o, NULL, &nid), MUX_E_CLOSED);
    assert_int_equal(mux_stream_open(b->m, &o, NULL, &nid), MUX_E_CLOSED);
    /* Existing streams may finish. */
    assert_int_equal(mux_stream_send(b->m, id, (const uint8_t *)"late", 4), 4);
    pump(a, b);
    assert_int_equal(rec(a, id)->len, 4);
    end_free(a);
    end_free(b);

    /* An OPEN that crosses our GOAWAY is refused, not dropped. */
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_open(e, 2, PROTO_KIND_SSH), 0);
    assert_int_equal(mux_goaway(e->m, PROTO_CODE_SHUTDOWN, "maintenance"), 0);
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), 0);
    assert_false(rec(e, 4)->opened);
    expect_reason(e, PROTO_OPEN_FAIL, 4, PROTO_CODE_SHUTDOWN, NULL, 0);
    assert_int_equal(mux_stream_count(e->m), 1);
    /* A second GOAWAY from the peer is ignored. */
    uint8_t p[PROTO_GOAWAY_MAX];
    size_t n = proto_goaway_encode(0, PROTO_CODE_SHUTDOWN, "one", p);
    assert_int_equal(feed_frame(e, PROTO_GOAWAY, 0, 0, p, n), 0);
    n = proto_goaway_encode(0, PROTO_CODE_REPLACED, "two", p);
    assert_int_equal(feed_frame(e, PROTO_GOAWAY, 0, 0, p, n), 0);
    assert_int_equal(e->goaways, 1);
    assert_string_equal(e->goaway_text, "one");
    end_free(e);
}

static void test_fail_all(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    for (int i = 0; i < 40; i++)
        open_stream(a);
    pump(a, b);
    open_stream(a); /* one more, still awaiting OPEN_OK */
    b->reset_in_closed = true;
    mux_fail_all(b->m, PROTO_CODE_CANCEL, "connection lost");
    assert_int_equal(b->closed_total, 40);
    for (size_t i = 0; i < b->nrec; i++) {
        assert_int_equal(b->rec[i].closed, 1);
        assert_int_equal(b->rec[i].close_code, PROTO_CODE_CANCEL);
        assert_string_equal(b->rec[i].close_text, "connection lost");
    }
    assert_int_equal(mux_stream_count(b->m), 0);
    a->reset_in_closed = true;
    mux_fail_all(a->m, PROTO_CODE_CANCEL, NULL);
    assert_int_equal(a->closed_total, 41); /* streams awaiting OPEN_OK included */
    assert_int_equal(mux_stream_count(a->m), 0);
    struct proto_open o = tcp_open("localhost", 1);
    uint32_t id;
    assert_int_equal(mux_stream_open(a->m, &o, NULL, &id), MUX_E_CLOSED);
    end_free(a);
    end_free(b);
}

static void test_reset_and_late_frames(void **state)
{
    (void)state;
    struct end *a = end_role(MUX_ROLE_AGENT), *b = end_role(MUX_ROLE_RELAY);
    pump(a, b);
    uint32_t id = open_stream(a);
    pump(a, b);
    /* b sends data that is in flight when a resets the stream. */
    assert_int_equal(mux_stream_send(b->m, id, (const uint8_t *)"in flight", 9), 9);
    assert_int_equal(mux_stream_reset(a->m, id, PROTO_CODE_CANCEL, "user hung up"), 0);
    assert_int_equal(mux_stream_count(a->m), 0);
    assert_true(pump_once(b, a) > 0); /* the DATA reaches a after its reset: ignored */
    pump(a, b);
    assert_int_equal(rec(a, id)->closed, 0); /* reset is silent for its caller */
    assert_int_equal(rec(a, id)->len, 0);
    assert_int_equal(rec(b, id)->closed, 1);
    assert_int_equal(rec(b, id)->close_code, PROTO_CODE_CANCEL);
    assert_string_equal(rec(b, id)->close_text, "user hung up");
    assert_false(mux_is_closing(a->m));
    end_free(a);
    end_free(b);
}

/* ---- tests: one mux, hand-built frames ---- */

static void test_unknown_kind_unsupported(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_open(e, 2, 9), 0);
    assert_int_equal(e->nrec, 0); /* stream_opened never called */
    assert_int_equal(mux_stream_count(e->m), 0);
    char text[PROTO_MAX_TEXT + 1];
    expect_reason(e, PROTO_OPEN_FAIL, 2, PROTO_CODE_UNSUPPORTED, text, sizeof(text));
    assert_string_equal(text, "unsupported stream kind");
    /* The id counts as used: a late RST for it is ignored, a repeat OPEN is an error. */
    assert_int_equal(feed_reason(e, PROTO_RST, 2, PROTO_CODE_CANCEL), 0);
    assert_int_equal(feed_open(e, 2, PROTO_KIND_SSH), MUX_E_PROTOCOL);
    end_free(e);
}

static void test_malformed_open(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    uint8_t tcp[] = {PROTO_KIND_TCP, 0, 0, 0, 0, 22, 3, 'a', ' ', 'b'}; /* space in host */
    assert_int_equal(feed_frame(e, PROTO_OPEN, 0, 2, tcp, sizeof(tcp)), MUX_E_PROTOCOL);
    assert_int_equal(e->nrec, 0);
    expect_goaway(e, "OPEN");
    end_free(e);
}

static void test_frame_before_hello(void **state)
{
    (void)state;
    struct end *e = end_role(MUX_ROLE_AGENT);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, "early", 5), MUX_E_PROTOCOL);
    expect_goaway(e, "before HELLO");
    assert_int_equal(feed_hello(e, NULL), MUX_E_PROTOCOL);
    assert_int_equal(e->hellos, 0);
    end_free(e);
}

static void test_second_hello(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_RELAY, NULL);
    assert_int_equal(e->hellos, 1);
    assert_int_equal(feed_hello(e, NULL), MUX_E_PROTOCOL);
    assert_int_equal(e->hellos, 1);
    expect_goaway(e, "HELLO");
    end_free(e);
}

static void test_oversized_frame_header(void **state)
{
    (void)state;
    struct end *e = solo_accepted(2, NULL);
    uint8_t hdr[PROTO_HEADER_SIZE];
    proto_header_encode(hdr, PROTO_DATA, 0, 2, 2000000);
    /* The verdict comes with the header: no payload byte is waited for or buffered. */
    assert_int_equal(mux_feed(e->m, hdr, sizeof(hdr), T0), MUX_E_PROTOCOL);
    uint8_t *junk = calloc(1, 1 << 20);
    assert_int_equal(mux_feed(e->m, junk, 1 << 20, T0), MUX_E_PROTOCOL);
    free(junk);
    assert_int_equal(mux_message_end(e->m), MUX_E_PROTOCOL);
    assert_int_equal(rec(e, 2)->len, 0);
    expect_goaway(e, "frame length 2000000 over limit");
    end_free(e);
}

static void test_length_lie_across_message_end(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    uint8_t frame[PROTO_HEADER_SIZE + 10];
    proto_header_encode(frame, PROTO_CONTROL, 0, 0, 1000);
    memcpy(frame + PROTO_HEADER_SIZE, "{\"type\":\"x", 10);
    assert_int_equal(mux_feed(e->m, frame, sizeof(frame), T0), 0);
    assert_int_equal(mux_message_end(e->m), MUX_E_PROTOCOL);
    expect_goaway(e, "spans");
    assert_int_equal(json_array_size(e->controls), 0);
    end_free(e);

    /* A header cut short counts as well. */
    e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(mux_feed(e->m, frame, 5, T0), 0);
    assert_int_equal(mux_message_end(e->m), MUX_E_PROTOCOL);
    expect_goaway(e, "spans");
    end_free(e);
}

static void test_unknown_type_and_flags(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_frame(e, 12, 0, 0, NULL, 0), MUX_E_PROTOCOL);
    expect_goaway(e, "unknown frame type 12");
    end_free(e);

    e = solo_accepted(2, NULL);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0x0002, 2, "x", 1), MUX_E_PROTOCOL);
    expect_goaway(e, "flags");
    assert_int_equal(rec(e, 2)->len, 0);
    end_free(e);

    e = solo_accepted(2, NULL);
    uint8_t off[8] = {0};
    assert_int_equal(feed_frame(e, PROTO_CREDIT, PROTO_FLAG_FIN, 2, off, 8), MUX_E_PROTOCOL);
    expect_goaway(e, "flags");
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    uint8_t bad_version[PROTO_HEADER_SIZE];
    proto_header_encode(bad_version, PROTO_PING, 0, 0, 8);
    bad_version[0] = 2;
    assert_int_equal(mux_feed(e->m, bad_version, sizeof(bad_version), T0), MUX_E_PROTOCOL);
    expect_goaway(e, "version");
    end_free(e);
}

static void test_malformed_control(void **state)
{
    (void)state;
    const char *bad[] = {"{not json", "[1,2]", "{\"type\":\"hello\"}", "{\"type\":7}"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct end *e = solo(MUX_ROLE_RELAY, NULL);
        assert_int_equal(feed_frame(e, PROTO_CONTROL, 0, 0, bad[i], strlen(bad[i])),
                         MUX_E_PROTOCOL);
        assert_int_equal(json_array_size(e->controls), 0);
        expect_goaway(e, "control");
        end_free(e);
    }
}

static void test_wrong_parity_and_reused_id(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_open(e, 1, PROTO_KIND_SSH), MUX_E_PROTOCOL); /* odd: ours */
    expect_goaway(e, "parity");
    assert_int_equal(e->nrec, 0);
    end_free(e);

    e = solo(MUX_ROLE_RELAY, NULL);
    assert_int_equal(feed_open(e, 2, PROTO_KIND_SSH), MUX_E_PROTOCOL);
    expect_goaway(e, "parity");
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), 0);
    assert_int_equal(feed_open(e, 2, PROTO_KIND_SSH), MUX_E_PROTOCOL); /* below the highest */
    expect_goaway(e, "OPEN of stream 2");
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), 0);
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), MUX_E_PROTOCOL); /* the same again */
    char text[PROTO_MAX_TEXT + 1];
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    const struct frame *f = find_frame(fs, PROTO_GOAWAY, 0);
    assert_non_null(f);
    struct proto_reason r;
    assert_int_equal(proto_goaway_decode(f->p, f->h.length, &r), 0);
    assert_int_equal(r.last_stream, 4); /* GOAWAY names the last stream the peer opened */
    copy_text(text, sizeof(text), r.text, r.text_len);
    assert_non_null(strstr(text, "stream 4"));
    frames_free(fs);
    free(fs);
    end_free(e);
}

static void test_zero_codes_never_read_as_success(void **state)
{
    (void)state;
    struct end *e = solo_accepted(2, NULL);
    assert_int_equal(feed_reason(e, PROTO_RST, 2, 0), 0);
    assert_int_equal(rec(e, 2)->closed, 1);
    assert_int_equal(rec(e, 2)->close_code, PROTO_CODE_PROTOCOL);
    uint32_t id = open_stream(e);
    assert_int_equal(feed_reason(e, PROTO_OPEN_FAIL, id, 0), 0);
    assert_int_equal(rec(e, id)->results, 1);
    assert_int_equal(rec(e, id)->result_code, PROTO_CODE_PROTOCOL);
    /* And we never send 0 either. */
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), 0);
    assert_int_equal(mux_stream_reset(e->m, 4, 0, NULL), 0);
    e->policy = POLICY_DEFER;
    assert_int_equal(feed_open(e, 6, PROTO_KIND_SSH), 0);
    assert_int_equal(mux_stream_reject(e->m, 6, 0, NULL), 0);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    struct proto_reason r;
    const struct frame *f = find_frame(fs, PROTO_RST, 4);
    assert_non_null(f);
    assert_int_equal(proto_reason_decode(f->p, f->h.length, &r), 0);
    assert_int_equal(r.code, PROTO_CODE_CANCEL);
    f = find_frame(fs, PROTO_OPEN_FAIL, 6);
    assert_non_null(f);
    assert_int_equal(proto_reason_decode(f->p, f->h.length, &r), 0);
    assert_int_equal(r.code, PROTO_CODE_REFUSED);
    frames_free(fs);
    free(fs);
    end_free(e);
}

static void test_data_for_closed_stream_ignored(void **state)
{
    (void)state;
    struct end *e = solo_accepted(2, NULL);
    assert_int_equal(feed_reason(e, PROTO_RST, 2, PROTO_CODE_CANCEL), 0);
    assert_int_equal(rec(e, 2)->closed, 1);
    assert_int_equal(rec(e, 2)->close_code, PROTO_CODE_CANCEL);
    assert_string_equal(rec(e, 2)->close_text, "because");
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, "late", 4), 0);
    assert_int_equal(feed_credit(e, 2, 1 << 20), 0);
    assert_int_equal(feed_reason(e, PROTO_RST, 2, PROTO_CODE_CANCEL), 0);
    assert_int_equal(rec(e, 2)->len, 0);
    assert_int_equal(rec(e, 2)->closed, 1);

    /* The same for one of ours that we reset, including a late OPEN_OK. */
    uint32_t id = open_stream(e);
    assert_int_equal(mux_stream_reset(e->m, id, PROTO_CODE_CANCEL, NULL), 0);
    assert_int_equal(feed_frame(e, PROTO_OPEN_OK, 0, id, NULL, 0), 0);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, id, "late", 4), 0);
    assert_int_equal(rec(e, id)->results, 0);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    assert_non_null(find_frame(fs, PROTO_RST, id));
    assert_int_equal(count_type(fs, PROTO_GOAWAY), 0);
    frames_free(fs);
    free(fs);
    end_free(e);
}

static void test_frames_for_never_opened_stream(void **state)
{
    (void)state;
    struct end *e = solo_accepted(2, NULL);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 6, "x", 1), MUX_E_PROTOCOL);
    expect_goaway(e, "never opened");
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 7, "x", 1), MUX_E_PROTOCOL); /* our parity */
    expect_goaway(e, "never opened");
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    assert_int_equal(feed_credit(e, 1, 1 << 20), MUX_E_PROTOCOL);
    expect_goaway(e, "never opened");
    end_free(e);

    /* OPEN_OK for a stream the peer opened, or for one already open. */
    e = solo_accepted(2, NULL);
    assert_int_equal(feed_frame(e, PROTO_OPEN_OK, 0, 2, NULL, 0), MUX_E_PROTOCOL);
    expect_goaway(e, "OPEN_OK");
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    uint32_t id = open_stream(e);
    assert_int_equal(feed_frame(e, PROTO_OPEN_OK, 0, id, NULL, 0), 0);
    assert_int_equal(rec(e, id)->result_code, 0);
    assert_int_equal(feed_reason(e, PROTO_OPEN_FAIL, id, PROTO_CODE_REFUSED), MUX_E_PROTOCOL);
    expect_goaway(e, "OPEN_FAIL");
    end_free(e);
}

static void test_open_beyond_max_streams(void **state)
{
    (void)state;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.local.max_streams = 2;
    struct end *e = solo(MUX_ROLE_AGENT, &cfg);
    assert_int_equal(feed_open(e, 2, PROTO_KIND_SSH), 0);
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), 0);
    assert_int_equal(feed_open(e, 6, PROTO_KIND_SSH), 0);
    assert_int_equal(mux_stream_count(e->m), 2);
    assert_int_equal(e->nrec, 2); /* no stream_opened for 6 */
    expect_reason(e, PROTO_OPEN_FAIL, 6, PROTO_CODE_STREAM_LIMIT, NULL, 0);
    /* Once one ends there is room again. */
    assert_int_equal(feed_reason(e, PROTO_RST, 2, PROTO_CODE_CANCEL), 0);
    assert_int_equal(feed_open(e, 8, PROTO_KIND_SSH), 0);
    assert_true(rec(e, 8)->opened);
    assert_int_equal(mux_stream_count(e->m), 2);
    end_free(e);
}

static void test_our_open_limited_by_peer(void **state)
{
    (void)state;
    struct end *e = end_role(MUX_ROLE_RELAY);
    struct proto_hello h;
    proto_hello_default(&h);
    h.max_streams = 2;
    assert_int_equal(feed_hello(e, &h), 0);
    uint32_t a = open_stream(e), b = open_stream(e), c;
    assert_int_equal(a, 2);
    assert_int_equal(b, 4);
    struct proto_open o = tcp_open("localhost", 1);
    assert_int_equal(mux_stream_open(e->m, &o, NULL, &c), MUX_E_LIMIT);
    assert_int_equal(feed_reason(e, PROTO_OPEN_FAIL, a, PROTO_CODE_REFUSED), 0);
    assert_int_equal(rec(e, a)->result_code, PROTO_CODE_REFUSED);
    assert_string_equal(rec(e, a)->result_text, "because");
    assert_int_equal(open_stream(e), 6);
    end_free(e);
}

static void test_data_beyond_credit(void **state)
{
    (void)state;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.local.initial_window = PROTO_MIN_WINDOW;
    struct end *e = solo_accepted(2, &cfg);
    e->consume = false;
    uint8_t *buf = calloc(1, PROTO_MIN_WINDOW);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, PROTO_MIN_WINDOW), 0);
    assert_int_equal(rec(e, 2)->len, PROTO_MIN_WINDOW);
    expect_silence(e); /* nothing drained, so no credit */
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, "!", 1), 0);
    assert_int_equal(rec(e, 2)->len, PROTO_MIN_WINDOW);
    assert_int_equal(rec(e, 2)->closed, 1);
    assert_int_equal(rec(e, 2)->close_code, PROTO_CODE_FLOW);
    expect_reason(e, PROTO_RST, 2, PROTO_CODE_FLOW, NULL, 0);
    /* A stream's fault leaves the connection alive. */
    assert_false(mux_is_closing(e->m));
    assert_int_equal(feed_open(e, 4, PROTO_KIND_SSH), 0);
    assert_true(rec(e, 4)->opened);
    free(buf);
    end_free(e);
}

/* The CREDIT frames e has queued for stream 2: how many, and the last offset. */
static size_t credits(struct end *e, uint64_t *off)
{
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    size_t n = count_type(fs, PROTO_CREDIT);
    const struct frame *f = find_frame(fs, PROTO_CREDIT, 2);
    if (f)
        assert_int_equal(proto_credit_decode(f->p, f->h.length, off), 0);
    frames_free(fs);
    free(fs);
    return n;
}

static void test_credit_granted_on_drain(void **state)
{
    (void)state;
    const size_t w = PROTO_MIN_WINDOW;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.local.initial_window = (uint32_t)w;
    struct end *e = solo_accepted(2, &cfg);
    e->consume = false;
    uint8_t *buf = calloc(1, w);
    uint64_t off = 0;
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, w), 0);
    mux_stream_consumed(e->m, 2, w / 2 - 1);
    assert_int_equal(credits(e, &off), 0); /* less than half a window drained */
    mux_stream_consumed(e->m, 2, 1);
    assert_int_equal(credits(e, &off), 1); /* half a window: drained + window */
    assert_int_equal(off, w / 2 + w);

    /* Two grants before the transport writes: one frame with the newer offset. */
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, w / 2), 0);
    mux_stream_consumed(e->m, 2, w / 2);
    mux_stream_consumed(e->m, 2, w / 2);
    assert_int_equal(credits(e, &off), 1);
    assert_int_equal(off, w / 2 * 3 + w);

    /* Claiming more drained than arrived grants no more than a window past what arrived. */
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, w), 0);
    mux_stream_consumed(e->m, 2, 1u << 30);
    assert_int_equal(credits(e, &off), 1);
    assert_int_equal(off, w / 2 * 5 + w);

    /* The granted credit is honoured to the byte. */
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, w), 0);
    assert_int_equal(rec(e, 2)->closed, 0);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, 1), 0);
    assert_int_equal(rec(e, 2)->close_code, PROTO_CODE_FLOW);
    free(buf);
    end_free(e);
}

/* A peer that does not read gets one pending CREDIT per stream, however often we grant. */
static void test_credit_pending_bounded(void **state)
{
    (void)state;
    const size_t w = PROTO_MIN_WINDOW;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.local.initial_window = (uint32_t)w;
    cfg.max_control_queue = 100;
    struct end *e = solo_accepted(2, &cfg);
    uint8_t *buf = calloc(1, w / 2);
    for (int i = 0; i < 50; i++)
        assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, buf, w / 2), 0); /* consumed at once */
    uint64_t off = 0;
    assert_int_equal(credits(e, &off), 1);
    assert_int_equal(off, 50 * w / 2 + w);
    free(buf);
    end_free(e);
}

/* An agent mux with one stream of its own, OPEN_OK received; returns its id. */
static uint32_t own_open_stream(struct end *e)
{
    uint32_t id = open_stream(e);
    assert_int_equal(feed_frame(e, PROTO_OPEN_OK, 0, id, NULL, 0), 0);
    return id;
}

static void test_credit_backwards_and_overflow(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    uint32_t s1 = own_open_stream(e), s3 = own_open_stream(e), s5 = own_open_stream(e);
    assert_int_equal(feed_credit(e, s1, PROTO_DEFAULT_WINDOW - 1), 0);
    assert_int_equal(rec(e, s1)->closed, 1);
    assert_int_equal(rec(e, s1)->close_code, PROTO_CODE_FLOW);
    expect_reason(e, PROTO_RST, s1, PROTO_CODE_FLOW, NULL, 0);

    assert_int_equal(feed_credit(e, s3, (uint64_t)PROTO_MAX_WINDOW + 1), 0);
    assert_int_equal(rec(e, s3)->close_code, PROTO_CODE_FLOW);
    expect_reason(e, PROTO_RST, s3, PROTO_CODE_FLOW, NULL, 0);

    /* Exactly the maximum window ahead is allowed, and repeating a limit is harmless. */
    assert_int_equal(feed_credit(e, s5, PROTO_MAX_WINDOW), 0);
    assert_int_equal(feed_credit(e, s5, PROTO_MAX_WINDOW), 0);
    assert_int_equal(rec(e, s5)->closed, 0);
    assert_int_equal(mux_stream_room(e->m, s5), PROTO_MAX_WINDOW);
    expect_silence(e);
    assert_false(mux_is_closing(e->m));
    end_free(e);
}

static void test_writable_when_room_reopens(void **state)
{
    (void)state;
    struct end *e = solo(MUX_ROLE_AGENT, NULL);
    uint32_t id = own_open_stream(e);
    assert_int_equal(rec(e, id)->writable, 1); /* after OPEN_OK */
    /* More credit while there is room anyway: nothing to report. */
    assert_int_equal(feed_credit(e, id, PROTO_DEFAULT_WINDOW + 100), 0);
    assert_int_equal(rec(e, id)->writable, 1);
    assert_int_equal(send_some(e, id, 0, 1u << 20), PROTO_DEFAULT_WINDOW + 100);
    assert_int_equal(mux_stream_room(e->m, id), 0);
    assert_int_equal(feed_credit(e, id, PROTO_DEFAULT_WINDOW + 200), 0);
    assert_int_equal(rec(e, id)->writable, 2);
    assert_int_equal(mux_stream_room(e->m, id), 100);
    end_free(e);
}

static void test_data_after_fin_and_before_accept(void **state)
{
    (void)state;
    struct end *e = solo_accepted(2, NULL);
    assert_int_equal(feed_frame(e, PROTO_DATA, PROTO_FLAG_FIN, 2, "last", 4), 0);
    assert_true(rec(e, 2)->fin);
    assert_int_equal(rec(e, 2)->len, 4);
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, "more", 4), 0);
    assert_int_equal(rec(e, 2)->len, 4);
    assert_int_equal(rec(e, 2)->close_code, PROTO_CODE_PROTOCOL);
    expect_reason(e, PROTO_RST, 2, PROTO_CODE_PROTOCOL, NULL, 0);
    end_free(e);

    e = solo(MUX_ROLE_AGENT, NULL);
    e->policy = POLICY_DEFER;
    assert_int_equal(feed_open(e, 2, PROTO_KIND_SSH), 0);
    assert_int_equal(mux_stream_room(e->m, 2), 0); /* nothing may be sent before accepting */
    assert_int_equal(feed_frame(e, PROTO_DATA, 0, 2, "early", 5), 0);
    assert_int_equal(rec(e, 2)->len, 0);
    assert_int_equal(rec(e, 2)->closed, 1);
    assert_int_equal(rec(e, 2)->close_code, PROTO_CODE_PROTOCOL);
    assert_int_equal(mux_stream_accept(e->m, 2, NULL), MUX_E_NOSTREAM);
    expect_reason(e, PROTO_RST, 2, PROTO_CODE_PROTOCOL, NULL, 0);
    end_free(e);
}

static void test_empty_fin_and_close(void **state)
{
    (void)state;
    struct end *e = solo_accepted(2, NULL);
    assert_int_equal(feed_frame(e, PROTO_DATA, PROTO_FLAG_FIN, 2, NULL, 0), 0);
    assert_true(rec(e, 2)->fin);
    assert_int_equal(rec(e, 2)->closed, 0);
    assert_int_equal(mux_stream_shutdown(e->m, 2), 0);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    const struct frame *f = find_frame(fs, PROTO_DATA, 2);
    assert_non_null(f);
    assert_int_equal(f->h.length, 0);
    assert_int_equal(f->h.flags, PROTO_FLAG_FIN);
    assert_int_equal(rec(e, 2)->closed, 1);
    assert_int_equal(rec(e, 2)->close_code, 0);
    assert_int_equal(mux_stream_count(e->m), 0);
    frames_free(fs);
    free(fs);
    end_free(e);
}

static void test_keepalive(void **state)
{
    (void)state;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.keepalive_idle_ms = 1000;
    cfg.keepalive_timeout_ms = 3000;
    struct end *e = solo(MUX_ROLE_AGENT, &cfg);
    assert_int_equal(mux_rtt_ms(e->m), -1);
    assert_int_equal(mux_next_tick_ms(e->m, T0), 1000);
    assert_int_equal(mux_tick(e->m, T0 + 999), 0);
    expect_silence(e);
    assert_int_equal(mux_tick(e->m, T0 + 1000), 0);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    assert_int_equal(fs->n, 1);
    assert_int_equal(fs->f[0].h.type, PROTO_PING);
    uint8_t ping[PROTO_PING_SIZE];
    memcpy(ping, fs->f[0].p, sizeof(ping));
    /* One PING at a time: the next deadline is the timeout. */
    assert_int_equal(mux_tick(e->m, T0 + 1020), 0);
    expect_silence(e);
    assert_int_equal(mux_next_tick_ms(e->m, T0 + 1020), 1980);
    /* The PONG arrives 40 ms later. */
    struct wire w = {0};
    put_frame(&w, PROTO_PONG, 0, 0, ping, sizeof(ping));
    assert_int_equal(mux_feed(e->m, w.b, w.n, T0 + 1040), 0);
    assert_int_equal(mux_rtt_ms(e->m), 40);
    /* Silence after that: PING again after idle, TIMEOUT after the timeout. */
    assert_int_equal(mux_tick(e->m, T0 + 2040), 0);
    collect(e, fs);
    assert_int_equal(count_type(fs, PROTO_PING), 1);
    assert_int_equal(mux_tick(e->m, T0 + 4039), 0);
    assert_int_equal(mux_tick(e->m, T0 + 4040), MUX_E_TIMEOUT);
    /* The peer's PING is answered with its own bytes. */
    w.n = 0;
    put_frame(&w, PROTO_PING, 0, 0, "abcdefgh", 8);
    assert_int_equal(mux_feed(e->m, w.b, w.n, T0 + 5000), 0);
    collect(e, fs);
    const struct frame *pong = find_frame(fs, PROTO_PONG, 0);
    assert_non_null(pong);
    assert_int_equal(pong->h.length, 8);
    assert_memory_equal(pong->p, "abcdefgh", 8);
    assert_int_equal(mux_tick(e->m, T0 + 5999), 0); /* the PING reset the clock */
    free(w.b);
    frames_free(fs);
    free(fs);
    end_free(e);
}

static void test_deaf_peer(void **state)
{
    (void)state;
    struct mux_config cfg;
    mux_config_default(&cfg, MUX_ROLE_AGENT);
    cfg.max_control_queue = 1024;
    struct end *e = solo(MUX_ROLE_AGENT, &cfg);
    /* PONGs are dropped at the cap... */
    for (int i = 0; i < 100; i++)
        assert_int_equal(feed_frame(e, PROTO_PING, 0, 0, "abcdefgh", 8), 0);
    struct frames *fs = calloc(1, sizeof(*fs));
    collect(e, fs);
    assert_int_equal(count_type(fs, PROTO_PONG), 1024 / (PROTO_HEADER_SIZE + 8));
    /* ...answers the protocol requires are not, up to twice the cap. */
    int rc = 0;
    uint32_t id = 2;
    for (; id < 1000 && rc == 0; id += 2)
        rc = feed_open(e, id, 9);
    assert_int_equal(rc, MUX_E_PROTOCOL);
    assert_true(id < 1000);
    collect(e, fs);
    assert_true(fs->raw.n > 2 * 1024);
    assert_non_null(find_frame(fs, PROTO_GOAWAY, 0));
    frames_free(fs);
    free(fs);
    end_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hello_exchange),
        cmocka_unit_test(test_open_data_fin_both_ways),
        cmocka_unit_test(test_reject),
        cmocka_unit_test(test_stalled_consumer_stalls_only_its_stream),
        cmocka_unit_test(test_round_robin_fairness),
        cmocka_unit_test(test_byte_at_a_time_equals_whole),
        cmocka_unit_test(test_control_round_trip),
        cmocka_unit_test(test_send_control_full),
        cmocka_unit_test(test_goaway_then_open_refused),
        cmocka_unit_test(test_fail_all),
        cmocka_unit_test(test_reset_and_late_frames),
        cmocka_unit_test(test_unknown_kind_unsupported),
        cmocka_unit_test(test_malformed_open),
        cmocka_unit_test(test_frame_before_hello),
        cmocka_unit_test(test_second_hello),
        cmocka_unit_test(test_oversized_frame_header),
        cmocka_unit_test(test_length_lie_across_message_end),
        cmocka_unit_test(test_unknown_type_and_flags),
        cmocka_unit_test(test_malformed_control),
        cmocka_unit_test(test_wrong_parity_and_reused_id),
        cmocka_unit_test(test_zero_codes_never_read_as_success),
        cmocka_unit_test(test_data_for_closed_stream_ignored),
        cmocka_unit_test(test_frames_for_never_opened_stream),
        cmocka_unit_test(test_open_beyond_max_streams),
        cmocka_unit_test(test_our_open_limited_by_peer),
        cmocka_unit_test(test_data_beyond_credit),
        cmocka_unit_test(test_credit_granted_on_drain),
        cmocka_unit_test(test_credit_pending_bounded),
        cmocka_unit_test(test_credit_backwards_and_overflow),
        cmocka_unit_test(test_writable_when_room_reopens),
        cmocka_unit_test(test_data_after_fin_and_before_accept),
        cmocka_unit_test(test_empty_fin_and_close),
        cmocka_unit_test(test_reserve_commit_carries_bytes),
        cmocka_unit_test(test_reserve_stops_at_the_rings_end),
        cmocka_unit_test(test_reset_out_of_memory_forgets_the_stream),
        cmocka_unit_test(test_queue_storage_kept_while_busy),
        cmocka_unit_test(test_keepalive),
        cmocka_unit_test(test_deaf_peer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
