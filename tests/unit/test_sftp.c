/*
 * sftp engine, without a channel: bytes in through sftp_server_feed, replies out through
 * sftp_server_output, a real loop and a temporary directory. Checks what an owner relies
 * on: packets split anywhere work, events never fire inside an API call, a full engine
 * takes no more input until want_input, replies keep request order, and close ends with
 * done whatever is in flight.
 */
#include <dirent.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "agent/sftp.h"
#include "tunnel/log.h"

struct log_sink tether_log_sink;
int tether_log_level = LOG_ERROR;

struct owner {
    uv_loop_t loop;
    struct sftp_server *s;
    char dir[64];
    bool in_api; /* set around every sftp_server_* call */
    int want_write, want_input, failed, done;
    uint8_t *got; /* output taken so far */
    size_t got_len, got_cap;
};

static void ev_want_write(void *ud)
{
    struct owner *o = ud;
    assert_false(o->in_api);
    o->want_write++;
}

static void ev_want_input(void *ud)
{
    struct owner *o = ud;
    assert_false(o->in_api);
    o->want_input++;
}

static void ev_failed(void *ud)
{
    struct owner *o = ud;
    assert_false(o->in_api);
    o->failed++;
}

static void ev_done(void *ud)
{
    struct owner *o = ud;
    assert_false(o->in_api);
    o->done++;
}

static const struct sftp_server_events events = {ev_want_write, ev_want_input, ev_failed, ev_done};

static struct owner *owner_new(void)
{
    struct owner *o = calloc(1, sizeof(*o));
    assert_int_equal(uv_loop_init(&o->loop), 0);
    strcpy(o->dir, "/tmp/test_sftp.XXXXXX");
    assert_non_null(mkdtemp(o->dir));
    o->s = sftp_server_new(&o->loop, o->dir, &events, o);
    assert_non_null(o->s);
    return o;
}

static size_t feed(struct owner *o, const uint8_t *p, size_t n)
{
    o->in_api = true;
    size_t k = sftp_server_feed(o->s, p, n);
    o->in_api = false;
    return k;
}

/* Takes every queued output byte (as a client reading fast would). */
static void drain(struct owner *o)
{
    for (;;) {
        size_t n;
        o->in_api = true;
        const uint8_t *p = sftp_server_output(o->s, &n);
        o->in_api = false;
        if (!p)
            return;
        if (o->got_len + n > o->got_cap) {
            o->got_cap = (o->got_len + n) * 2;
            o->got = realloc(o->got, o->got_cap);
        }
        memcpy(o->got + o->got_len, p, n);
        o->got_len += n;
        o->in_api = true;
        sftp_server_consumed(o->s, n);
        o->in_api = false;
    }
}

static void run(struct owner *o)
{
    uv_run(&o->loop, UV_RUN_DEFAULT);
}

static void owner_close(struct owner *o)
{
    o->in_api = true;
    sftp_server_close(o->s);
    o->in_api = false;
    assert_int_equal(o->done, 0); /* never from inside the call */
    run(o);
    assert_int_equal(o->done, 1);
    assert_int_equal(uv_loop_close(&o->loop), 0);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", o->dir);
    assert_int_equal(system(cmd), 0);
    free(o->got);
    free(o);
}

/* ---- packets ---- */

struct pkt {
    uint8_t b[2048];
    size_t n;
};

static void put32(struct pkt *p, uint32_t v)
{
    p->b[p->n++] = (uint8_t)(v >> 24);
    p->b[p->n++] = (uint8_t)(v >> 16);
    p->b[p->n++] = (uint8_t)(v >> 8);
    p->b[p->n++] = (uint8_t)v;
}

static void put64(struct pkt *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p, (uint32_t)v);
}

static void putstr(struct pkt *p, const void *s, size_t n)
{
    put32(p, (uint32_t)n);
    memcpy(p->b + p->n, s, n);
    p->n += n;
}

/* Starts a packet: length (patched by end), type, id. */
static void begin(struct pkt *p, uint8_t type, uint32_t id)
{
    p->n = 0;
    put32(p, 0);
    p->b[p->n++] = type;
    put32(p, id);
}

static void end(struct pkt *p)
{
    uint32_t len = (uint32_t)p->n - 4;
    p->b[0] = (uint8_t)(len >> 24);
    p->b[1] = (uint8_t)(len >> 16);
    p->b[2] = (uint8_t)(len >> 8);
    p->b[3] = (uint8_t)len;
}

static uint32_t get32(const uint8_t *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* The reply at *off in o->got: its type and id; the body after the id in *body. */
static uint8_t next_reply(struct owner *o, size_t *off, uint32_t *id, const uint8_t **body)
{
    assert_true(o->got_len - *off >= 9);
    uint32_t len = get32(o->got + *off);
    assert_true(o->got_len - *off - 4 >= len);
    uint8_t type = o->got[*off + 4];
    *id = get32(o->got + *off + 5);
    *body = o->got + *off + 9;
    *off += 4 + len;
    return type;
}

static void feed_all(struct owner *o, const struct pkt *p)
{
    assert_int_equal(feed(o, p->b, p->n), p->n);
}

static void init(struct owner *o)
{
    struct pkt p = {.n = 0};
    put32(&p, 5);
    p.b[p.n++] = SSH_FXP_INIT;
    put32(&p, 3);
    feed_all(o, &p);
    run(o);
    drain(o);
    assert_true(o->got_len > 9 && o->got[4] == SSH_FXP_VERSION);
    o->got_len = 0;
}

/* OPEN name with pflags; returns the 8-byte handle. */
static void open_file(struct owner *o, const char *name, uint32_t pflags, uint8_t handle[8])
{
    struct pkt p;
    begin(&p, SSH_FXP_OPEN, 1000);
    putstr(&p, name, strlen(name));
    put32(&p, pflags);
    put32(&p, 0);
    end(&p);
    feed_all(o, &p);
    run(o);
    drain(o);
    size_t off = 0;
    uint32_t id;
    const uint8_t *body;
    assert_int_equal(next_reply(o, &off, &id, &body), SSH_FXP_HANDLE);
    assert_int_equal(get32(body), 8);
    memcpy(handle, body + 4, 8);
    o->got_len = 0;
}

/* ---- tests ---- */

/* A session fed one byte at a time: framing is independent of how bytes arrive. */
static void test_bytes_one_at_a_time(void **state)
{
    (void)state;
    struct owner *o = owner_new();
    init(o);
    uint8_t stream[4096];
    size_t n = 0;
    struct pkt p;
    begin(&p, SSH_FXP_MKDIR, 1);
    putstr(&p, "d", 1);
    put32(&p, 0);
    end(&p);
    memcpy(stream + n, p.b, p.n);
    n += p.n;
    begin(&p, SSH_FXP_REALPATH, 2);
    putstr(&p, "d/../d/x", 8);
    end(&p);
    memcpy(stream + n, p.b, p.n);
    n += p.n;
    begin(&p, SSH_FXP_STAT, 3);
    putstr(&p, "d", 1);
    end(&p);
    memcpy(stream + n, p.b, p.n);
    n += p.n;
    o->want_write = 0;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(feed(o, stream + i, 1), 1);
        assert_int_equal(o->want_write, 0); /* only from the loop */
    }
    run(o);
    assert_true(o->want_write >= 1);
    drain(o);
    size_t off = 0;
    uint32_t id;
    const uint8_t *body;
    assert_int_equal(next_reply(o, &off, &id, &body), SSH_FXP_STATUS);
    assert_int_equal(id, 1);
    assert_int_equal(get32(body), SSH_FX_OK);
    assert_int_equal(next_reply(o, &off, &id, &body), SSH_FXP_NAME);
    assert_int_equal(id, 2);
    char want[128];
    snprintf(want, sizeof(want), "%s/d/x", o->dir);
    assert_int_equal(get32(body), 1);
    assert_int_equal(get32(body + 4), strlen(want));
    assert_memory_equal(body + 8, want, strlen(want));
    assert_int_equal(next_reply(o, &off, &id, &body), SSH_FXP_ATTRS);
    assert_int_equal(id, 3);
    assert_int_equal(off, o->got_len);
    owner_close(o);
}

/* Bytes a client that is not reading would find queued: the output limit, plus the replies
 * of the requests admitted before it was reached, plus one. */
#define BACKLOG_BOUND (SFTP_MAX_OUTPUT + SFTP_MAX_REQUEST_BYTES + 2 * (65536 + 13))

/*
 * 400 READs of 64 KiB (25 MiB of replies) from a client that reads only when the engine
 * has stopped: the engine stops taking input, keeps its backlog bounded, asks for more once
 * the output is taken, and answers every READ completely and in request order.
 */
static void test_backpressure(void **state)
{
    (void)state;
    struct owner *o = owner_new();
    char path[128];
    snprintf(path, sizeof(path), "%s/f", o->dir);
    FILE *f = fopen(path, "w");
    static uint8_t block[65536];
    for (int i = 0; i < 16; i++) {
        memset(block, i, sizeof(block));
        fwrite(block, 1, sizeof(block), f);
    }
    fclose(f);
    init(o);
    uint8_t h[8];
    open_file(o, "f", SSH_FXF_READ, h);

    enum { N = 400 };
    static uint8_t reads[N * 64];
    size_t n = 0;
    for (uint32_t i = 0; i < N; i++) {
        struct pkt p;
        begin(&p, SSH_FXP_READ, i);
        putstr(&p, h, 8);
        put64(&p, (uint64_t)(i % 16) * 65536);
        put32(&p, 65536);
        end(&p);
        memcpy(reads + n, p.b, p.n);
        n += p.n;
    }
    size_t taken = feed(o, reads, n);
    assert_true(taken < n);
    int rounds = 0, asked = 0;
    while (taken < n) {
        run(o); /* returns when the engine waits for the client */
        size_t before = o->got_len;
        drain(o);
        assert_true(o->got_len - before <= BACKLOG_BOUND);
        assert_true(o->got_len - before > 0);
        run(o);
        assert_int_equal(o->want_input, asked + 1); /* once per stall */
        asked = o->want_input;
        taken += feed(o, reads + taken, n - taken);
        rounds++;
    }
    assert_true(rounds >= 5); /* it really did stall, more than once */
    run(o);
    drain(o);
    size_t off = 0;
    for (uint32_t i = 0; i < N; i++) {
        uint32_t id;
        const uint8_t *body;
        assert_int_equal(next_reply(o, &off, &id, &body), SSH_FXP_DATA);
        assert_int_equal(id, i);
        assert_int_equal(get32(body), 65536);
        assert_int_equal(body[4], i % 16);
        assert_int_equal(body[4 + 65535], i % 16);
    }
    assert_int_equal(off, o->got_len);
    assert_int_equal(sftp_server_pending(o->s), 0);
    owner_close(o);
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* close with READs running and handles open: done comes once, from the loop, and every
 * descriptor the session opened is closed. */
static void test_close_in_flight(void **state)
{
    (void)state;
    int fds_before = count_fds();
    struct owner *o = owner_new();
    char path[128];
    snprintf(path, sizeof(path), "%s/f", o->dir);
    FILE *f = fopen(path, "w");
    static uint8_t block[65536];
    for (int i = 0; i < 32; i++)
        fwrite(block, 1, sizeof(block), f);
    fclose(f);

    init(o);
    uint8_t h[8], h2[8];
    open_file(o, "f", SSH_FXF_READ, h);
    open_file(o, "f", SSH_FXF_READ | SSH_FXF_WRITE, h2);
    struct pkt p;
    begin(&p, SSH_FXP_OPENDIR, 5);
    putstr(&p, ".", 1);
    end(&p);
    feed_all(o, &p);
    for (uint32_t i = 0; i < 32; i++) {
        begin(&p, SSH_FXP_READ, 100 + i);
        putstr(&p, h, 8);
        put64(&p, (uint64_t)i * 65536);
        put32(&p, 65536);
        end(&p);
        feed(o, p.b, p.n); /* the last ones may not be taken: fine */
    }
    uv_run(&o->loop, UV_RUN_NOWAIT); /* some start */
    assert_true(sftp_server_pending(o->s) > 0);
    owner_close(o);
    assert_int_equal(count_fds(), fds_before);
}

static void test_malformed_fails(void **state)
{
    (void)state;
    struct owner *o = owner_new();
    init(o);
    const uint8_t bad[] = {0xff, 0xff, 0xff, 0xff, SSH_FXP_READ, 0, 0, 0, 1};
    size_t k = feed(o, bad, sizeof(bad));
    assert_true(k <= 4);
    assert_true(sftp_server_error(o->s) < 0);
    assert_int_equal(o->failed, 0);
    run(o);
    assert_int_equal(o->failed, 1);
    assert_int_equal(feed(o, bad, sizeof(bad)), 0);
    owner_close(o);

    /* A request before INIT is a protocol error too. */
    o = owner_new();
    struct pkt p;
    begin(&p, SSH_FXP_STAT, 1);
    putstr(&p, ".", 1);
    end(&p);
    feed(o, p.b, p.n);
    assert_int_equal(sftp_server_error(o->s), SFTP_E_PROTOCOL);
    run(o);
    assert_int_equal(o->failed, 1);
    owner_close(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bytes_one_at_a_time),
        cmocka_unit_test(test_backpressure),
        cmocka_unit_test(test_close_in_flight),
        cmocka_unit_test(test_malformed_fails),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
