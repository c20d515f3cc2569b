/*
 * ptyconv: terminal bytes survive the trip through records and real zlib both ways, however
 * the bytes are split; a zlib bomb never gets more output room than the caller offers;
 * malformed records and bad client JSON are refused or ignored as PROTOCOL.md 3.2 and 14.7
 * say.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <zlib.h>

#include "proto/proto.h"
#include "tunnel/ptyconv.h"

/* ---- the agent's side, as the test plays it ---- */

/* Deflates records the way an agent does: one zlib stream, Z_SYNC_FLUSH per DATA frame. */
struct agent_z {
    z_stream z;
    struct bytebuf out;
};

static void agent_z_init(struct agent_z *a, int level)
{
    memset(a, 0, sizeof(*a));
    assert_int_equal(deflateInit(&a->z, level), Z_OK);
}

static void agent_z_put(struct agent_z *a, const void *p, size_t n, int flush)
{
    static uint8_t buf[64 * 1024];
    a->z.next_in = (Bytef *)(uintptr_t)p;
    a->z.avail_in = (uInt)n;
    do {
        a->z.next_out = buf;
        a->z.avail_out = sizeof(buf);
        assert_int_not_equal(deflate(&a->z, flush), Z_STREAM_ERROR);
        assert_int_equal(bytebuf_append(&a->out, buf, sizeof(buf) - a->z.avail_out), 0);
    } while (a->z.avail_in > 0 || a->z.avail_out == 0);
}

/* One record, then a sync flush (the end of a DATA frame) if asked. */
static void agent_z_record(struct agent_z *a, uint8_t type, const void *body, size_t len,
                           bool flush)
{
    uint8_t hdr[PROTO_PTYREC_HEADER];
    proto_ptyrec_header(type, (uint16_t)len, hdr);
    agent_z_put(a, hdr, sizeof(hdr), Z_NO_FLUSH);
    agent_z_put(a, body, len, flush ? Z_SYNC_FLUSH : Z_NO_FLUSH);
}

static void agent_z_free(struct agent_z *a)
{
    deflateEnd(&a->z);
    bytebuf_free(&a->out);
}

/*
 * Feeds in to pc in pieces of `step` bytes, offering `cap` bytes of output per call, and
 * collects the terminal output. Asserts the per-call bound. Returns 0 or ptyconv's error.
 */
static int feed_agent(struct ptyconv *pc, const uint8_t *in, size_t len, size_t step, size_t cap,
                      struct bytebuf *got)
{
    uint8_t *out = malloc(cap);
    size_t off = 0;
    int rc = 0;
    for (long guard = 0; guard < 100000000L; guard++) {
        size_t end = off + step < len ? off + step : len;
        size_t piece_off = off;
        /* One DATA frame's worth: the caller loops until it is taken and nothing pends. */
        while (rc == 0 && (piece_off < end || ptyconv_agent_pending(pc))) {
            size_t used, produced;
            rc = ptyconv_agent_output(pc, piece_off < end ? in + piece_off : NULL, end - piece_off,
                                      &used, out, cap, &produced);
            assert_true(produced <= cap);
            assert_true(used <= end - piece_off);
            if (rc == 0)
                assert_int_equal(bytebuf_append(got, out, produced), 0);
            piece_off += used;
        }
        off = end;
        if (rc || off == len)
            break;
    }
    free(out);
    return rc;
}

/* ---- the agent's side of what ptyconv sends it ---- */

struct agent_rx {
    z_stream z;
    bool zlib;
    struct bytebuf plain; /* inflated, not parsed yet */
    struct bytebuf data;  /* DATA bodies, concatenated */
    int resizes;
    uint16_t rows, cols;
    int data_records;
    size_t max_data_body;
};

static void agent_rx_init(struct agent_rx *a, bool zlib)
{
    memset(a, 0, sizeof(*a));
    a->zlib = zlib;
    if (zlib)
        assert_int_equal(inflateInit(&a->z), Z_OK);
}

/*
 * Inflates bytes ptyconv produced and parses every record. Because ptyconv flushes at the
 * end of every call, the bytes of one call must decode to whole records with nothing left.
 */
static void agent_rx_take(struct agent_rx *a, struct bytebuf *from_relay)
{
    if (!a->zlib) {
        assert_int_equal(bytebuf_append(&a->plain, bytebuf_peek(from_relay), from_relay->len), 0);
    } else if (from_relay->len) {
        static uint8_t buf[64 * 1024];
        a->z.next_in = (Bytef *)(uintptr_t)bytebuf_peek(from_relay);
        a->z.avail_in = (uInt)from_relay->len;
        do {
            a->z.next_out = buf;
            a->z.avail_out = sizeof(buf);
            int rc = inflate(&a->z, Z_SYNC_FLUSH);
            assert_true(rc == Z_OK || rc == Z_BUF_ERROR);
            assert_int_equal(bytebuf_append(&a->plain, buf, sizeof(buf) - a->z.avail_out), 0);
        } while (a->z.avail_in > 0 || a->z.avail_out == 0);
    }
    bytebuf_consume(from_relay, from_relay->len);
    for (;;) {
        struct proto_ptyrec r;
        int n = a->plain.len ? proto_ptyrec_decode(bytebuf_peek(&a->plain), a->plain.len, &r) : 0;
        assert_true(n >= 0);
        if (n == 0)
            break;
        if (r.type == PROTO_PTYREC_DATA) {
            assert_int_equal(bytebuf_append(&a->data, r.body, r.len), 0);
            a->data_records++;
            if (r.len > a->max_data_body)
                a->max_data_body = r.len;
        } else if (r.type == PROTO_PTYREC_RESIZE) {
            a->resizes++;
            a->rows = r.rows;
            a->cols = r.cols;
        } else {
            fail_msg("unexpected record type %u toward the agent", r.type);
        }
        bytebuf_consume(&a->plain, (size_t)n);
    }
    assert_int_equal(a->plain.len, 0); /* flushed: no record cut at a call's end */
}

static void agent_rx_free(struct agent_rx *a)
{
    if (a->zlib)
        inflateEnd(&a->z);
    bytebuf_free(&a->plain);
    bytebuf_free(&a->data);
}

static int text(struct ptyconv *pc, const char *json, struct bytebuf *out)
{
    char why[128] = "";
    return ptyconv_client_text(pc, (const uint8_t *)json, strlen(json), true, true, out, why,
                               sizeof(why));
}

static uint8_t *pattern(size_t n, unsigned seed)
{
    uint8_t *p = malloc(n);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = (uint8_t)(x >> 16);
    }
    return p;
}

/* ---- agent → client ---- */

/* The records of a typical session, with the output they should give. */
static void session_records(struct agent_z *a, struct bytebuf *expect, uint8_t *big)
{
    static const uint8_t unknown[] = "a later version's record";
    static const uint8_t resize[4] = {0, 24, 0, 80};
    static const uint8_t exit_rec[2] = {0, 3};
    agent_z_record(a, PROTO_PTYREC_DATA, "hello ", 6, true);
    bytebuf_append(expect, "hello ", 6);
    agent_z_record(a, 200, unknown, sizeof(unknown), false); /* skipped by its length */
    agent_z_record(a, 9, NULL, 0, false);                    /* empty unknown: fine */
    agent_z_record(a, PROTO_PTYREC_DATA, big, PROTO_PTYREC_MAX_BODY, true);
    bytebuf_append(expect, big, PROTO_PTYREC_MAX_BODY);
    agent_z_record(a, PROTO_PTYREC_RESIZE, resize, 4, false); /* well-formed, meaningless */
    agent_z_record(a, PROTO_PTYREC_DATA, "world\r\n", 7, true);
    bytebuf_append(expect, "world\r\n", 7);
    agent_z_record(a, PROTO_PTYREC_EXIT, exit_rec, 2, true);
}

static void test_agent_output_any_split_any_room(void **state)
{
    (void)state;
    uint8_t *big = pattern(PROTO_PTYREC_MAX_BODY, 1);
    struct agent_z a;
    struct bytebuf expect = {0};
    agent_z_init(&a, 6);
    session_records(&a, &expect, big);
    static const size_t steps[] = {1, 2, 3, 7, 1000, 1u << 30};
    static const size_t caps[] = {1, 2, 5, 4096, 1u << 20};
    for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]); s++)
        for (size_t k = 0; k < sizeof(caps) / sizeof(caps[0]); k++) {
            if (steps[s] == 1 && caps[k] > 4096)
                continue; /* slow and adds nothing */
            struct ptyconv *pc = ptyconv_new(true);
            struct bytebuf got = {0};
            assert_int_equal(ptyconv_exit_status(pc), -1);
            assert_int_equal(
                feed_agent(pc, bytebuf_peek(&a.out), a.out.len, steps[s], caps[k], &got), 0);
            assert_int_equal(got.len, expect.len);
            assert_memory_equal(bytebuf_peek(&got), bytebuf_peek(&expect), expect.len);
            assert_int_equal(ptyconv_exit_status(pc), 3);
            bytebuf_free(&got);
            ptyconv_free(pc);
        }
    agent_z_free(&a);
    bytebuf_free(&expect);
    free(big);
}

/* Without zlib, two pieces split at every byte of the record stream give the same output. */
static void test_agent_records_split_at_every_byte(void **state)
{
    (void)state;
    struct bytebuf recs = {0}, expect = {0};
    uint8_t hdr[3];
    const struct {
        uint8_t type;
        const char *body;
        size_t len;
    } list[] = {
        {1, "abc", 3}, {77, "zz", 2}, {2, "\0\x18\0\x50", 4}, {1, "d", 1}, {3, "\1\x0f", 2}};
    for (size_t i = 0; i < sizeof(list) / sizeof(list[0]); i++) {
        proto_ptyrec_header(list[i].type, (uint16_t)list[i].len, hdr);
        bytebuf_append(&recs, hdr, 3);
        bytebuf_append(&recs, list[i].body, list[i].len);
        if (list[i].type == 1)
            bytebuf_append(&expect, list[i].body, list[i].len);
    }
    for (size_t cut = 0; cut <= recs.len; cut++) {
        struct ptyconv *pc = ptyconv_new(false);
        struct bytebuf got = {0};
        assert_int_equal(feed_agent(pc, bytebuf_peek(&recs), cut, 1u << 20, 64, &got), 0);
        assert_int_equal(
            feed_agent(pc, bytebuf_peek(&recs) + cut, recs.len - cut, 1u << 20, 64, &got), 0);
        assert_int_equal(got.len, expect.len);
        assert_memory_equal(bytebuf_peek(&got), bytebuf_peek(&expect), expect.len);
        assert_int_equal(ptyconv_exit_status(pc), 128 + 15); /* killed by SIGTERM */
        bytebuf_free(&got);
        ptyconv_free(pc);
    }
    bytebuf_free(&recs);
    bytebuf_free(&expect);
}

/* With zlib, the compressed bytes cut at every byte: the same output, whatever the cut. */
static void test_agent_zlib_split_at_every_byte(void **state)
{
    (void)state;
    struct agent_z a;
    agent_z_init(&a, 9);
    static const uint8_t exit_rec[2] = {1, 9};
    agent_z_record(&a, PROTO_PTYREC_DATA, "$ ls\r\n", 6, true);
    agent_z_record(&a, 42, "??", 2, false);
    agent_z_record(&a, PROTO_PTYREC_DATA, "a b c\r\n$ ", 9, true);
    agent_z_record(&a, PROTO_PTYREC_EXIT, exit_rec, 2, true);
    static const char expect[] = "$ ls\r\na b c\r\n$ ";
    for (size_t cut = 0; cut <= a.out.len; cut++) {
        struct ptyconv *pc = ptyconv_new(true);
        struct bytebuf got = {0};
        assert_int_equal(feed_agent(pc, bytebuf_peek(&a.out), cut, 1u << 20, 3, &got), 0);
        assert_int_equal(
            feed_agent(pc, bytebuf_peek(&a.out) + cut, a.out.len - cut, 1u << 20, 3, &got), 0);
        assert_int_equal(got.len, strlen(expect));
        assert_memory_equal(bytebuf_peek(&got), expect, strlen(expect));
        assert_int_equal(ptyconv_exit_status(pc), 137);
        bytebuf_free(&got);
        ptyconv_free(pc);
    }
    agent_z_free(&a);
}

/*
 * 128 MiB of output from well under the default window of compressed bytes: every call
 * gets only the room it offers, takes input only as far as that room goes, and the output
 * is intact.
 */
static void test_agent_zlib_bomb_bounded(void **state)
{
    (void)state;
    enum { RECORDS = 2048, ROOM = 16 * 1024 };
    uint8_t *zeros = calloc(1, PROTO_PTYREC_MAX_BODY);
    struct agent_z a;
    agent_z_init(&a, 9);
    for (int i = 0; i < RECORDS; i++)
        agent_z_record(&a, PROTO_PTYREC_DATA, zeros, PROTO_PTYREC_MAX_BODY, i == RECORDS - 1);
    assert_true(a.out.len < PROTO_DEFAULT_WINDOW); /* premise: it fits in one window */

    struct ptyconv *pc = ptyconv_new(true);
    uint8_t *out = malloc(ROOM);
    size_t used, produced, off = 0;
    uint64_t total = 0;
    long calls = 0;
    /* The first call is offered the whole input at once: it must not take all of it. */
    assert_int_equal(
        ptyconv_agent_output(pc, bytebuf_peek(&a.out), a.out.len, &used, out, ROOM, &produced), 0);
    assert_true(used < a.out.len);
    assert_true(produced <= ROOM);
    assert_true(ptyconv_agent_pending(pc));
    off += used;
    total += produced;
    while (off < a.out.len || ptyconv_agent_pending(pc)) {
        assert_int_equal(ptyconv_agent_output(pc, bytebuf_peek(&a.out) + off, a.out.len - off,
                                              &used, out, ROOM, &produced),
                         0);
        assert_true(produced <= ROOM);
        for (size_t i = 0; i < produced; i++)
            if (out[i])
                fail_msg("output byte %zu is not zero", (size_t)(total + i));
        off += used;
        total += produced;
        assert_true(++calls < 10L * RECORDS * PROTO_PTYREC_MAX_BODY / ROOM);
    }
    assert_int_equal(total, (uint64_t)RECORDS * PROTO_PTYREC_MAX_BODY);
    free(out);
    ptyconv_free(pc);
    agent_z_free(&a);
    free(zeros);
}

/* A bomb of records nobody knows: skipped in bounded steps, nothing comes out. */
static void test_agent_zlib_bomb_of_unknown_records(void **state)
{
    (void)state;
    uint8_t *zeros = calloc(1, PROTO_PTYREC_MAX_BODY);
    struct agent_z a;
    agent_z_init(&a, 9);
    for (int i = 0; i < 1024; i++)
        agent_z_record(&a, 250, zeros, PROTO_PTYREC_MAX_BODY, i == 1023);
    struct ptyconv *pc = ptyconv_new(true);
    struct bytebuf got = {0};
    assert_int_equal(feed_agent(pc, bytebuf_peek(&a.out), a.out.len, 4096, 8192, &got), 0);
    assert_int_equal(got.len, 0);
    assert_int_equal(ptyconv_exit_status(pc), -1);
    ptyconv_free(pc);
    agent_z_free(&a);
    free(zeros);
}

struct bad_case {
    const char *name;
    uint8_t bytes[16];
    size_t len;
};

/* Malformed records: refused, whether whole or one byte at a time, and the refusal sticks. */
static void test_agent_malformed_records(void **state)
{
    (void)state;
    static const struct bad_case cases[] = {
        {"empty DATA", {1, 0, 0}, 3},
        {"RESIZE of 3 bytes", {2, 0, 3, 0, 1, 0}, 6},
        {"RESIZE of 5 bytes", {2, 0, 5, 0, 1, 0, 1, 0}, 8},
        {"EXIT of 1 byte", {3, 0, 1, 0}, 4},
        {"EXIT of 3 bytes", {3, 0, 3, 0, 1, 2}, 6},
        {"EXIT how 2", {3, 0, 2, 2, 1}, 5},
        {"EXIT of 65535 bytes (header only)", {3, 0xff, 0xff}, 3},
        {"good DATA, then empty DATA", {1, 0, 1, 'x', 1, 0, 0}, 7},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int zlib = 0; zlib < 2; zlib++)
            for (size_t step = 1; step <= cases[i].len; step += cases[i].len - 1) {
                struct agent_z a;
                agent_z_init(&a, 6);
                agent_z_put(&a, cases[i].bytes, cases[i].len, Z_SYNC_FLUSH);
                const uint8_t *in = zlib ? bytebuf_peek(&a.out) : cases[i].bytes;
                size_t len = zlib ? a.out.len : cases[i].len;
                struct ptyconv *pc = ptyconv_new(zlib);
                struct bytebuf got = {0};
                int rc = feed_agent(pc, in, len, step, 64, &got);
                if (rc != PTYCONV_E_RECORD)
                    fail_msg("%s (zlib %d, step %zu): got %d", cases[i].name, zlib, step, rc);
                size_t used, produced;
                uint8_t out[8];
                assert_int_equal(ptyconv_agent_output(pc, (const uint8_t *)"\1\0\1x", 4, &used, out,
                                                      sizeof(out), &produced),
                                 PTYCONV_E_RECORD);
                assert_int_equal(produced, 0);
                assert_false(ptyconv_agent_pending(pc));
                bytebuf_free(&got);
                ptyconv_free(pc);
                agent_z_free(&a);
            }
    }
}

static void test_agent_not_zlib(void **state)
{
    (void)state;
    /* Plain records on a stream that promised zlib. */
    struct ptyconv *pc = ptyconv_new(true);
    struct bytebuf got = {0};
    static const uint8_t plain[] = {1, 0, 5, 'h', 'e', 'l', 'l', 'o'};
    assert_int_equal(feed_agent(pc, plain, sizeof(plain), 100, 64, &got), PTYCONV_E_INFLATE);
    assert_int_equal(got.len, 0);
    ptyconv_free(pc);

    /* A finished zlib stream, then more bytes. */
    struct agent_z a;
    agent_z_init(&a, 6);
    agent_z_record(&a, PROTO_PTYREC_DATA, "bye", 3, false);
    agent_z_put(&a, NULL, 0, Z_FINISH);
    bytebuf_append(&a.out, "\1\2\3", 3);
    pc = ptyconv_new(true);
    assert_int_equal(feed_agent(pc, bytebuf_peek(&a.out), a.out.len, 1, 64, &got),
                     PTYCONV_E_INFLATE);
    assert_int_equal(got.len, 3);
    assert_memory_equal(bytebuf_peek(&got), "bye", 3);
    ptyconv_free(pc);
    /* the same bytes in one piece: the end and the bytes after it in one call */
    pc = ptyconv_new(true);
    assert_int_equal(feed_agent(pc, bytebuf_peek(&a.out), a.out.len, 1u << 20, 64, &got),
                     PTYCONV_E_INFLATE);
    ptyconv_free(pc);
    agent_z_free(&a);
    bytebuf_free(&got);
}

/* ---- client → agent ---- */

static void test_client_json_to_records(void **state)
{
    (void)state;
    for (int zlib = 0; zlib < 2; zlib++) {
        struct ptyconv *pc = ptyconv_new(zlib);
        struct agent_rx rx;
        struct bytebuf out = {0};
        agent_rx_init(&rx, zlib);

        assert_int_equal(text(pc, "{\"data\": \"ls -l\\r\"}", &out), 0);
        agent_rx_take(&rx, &out);
        assert_int_equal(rx.data.len, 6);
        assert_memory_equal(bytebuf_peek(&rx.data), "ls -l\r", 6);

        assert_int_equal(text(pc, "{\"rows\": 50, \"cols\": 132}", &out), 0);
        agent_rx_take(&rx, &out);
        assert_int_equal(rx.resizes, 1);
        assert_int_equal(rx.rows, 50);
        assert_int_equal(rx.cols, 132);

        /* both: input first; unknown members ignored; \u0000 and UTF-8 carried exactly */
        assert_int_equal(
            text(pc, "{\"x\":[1,{}],\"cols\":1,\"data\":\"a\\u0000\\u00e9\",\"rows\":2}", &out), 0);
        agent_rx_take(&rx, &out);
        assert_int_equal(rx.data.len, 6 + 4);
        assert_memory_equal(bytebuf_peek(&rx.data) + 6, "a\0\xc3\xa9", 4);
        assert_int_equal(rx.resizes, 2);
        assert_int_equal(rx.rows, 2);
        assert_int_equal(rx.cols, 1);

        /* sizes outside 1..65535 are clamped into it */
        assert_int_equal(text(pc, "{\"rows\": 0, \"cols\": 100000}", &out), 0);
        agent_rx_take(&rx, &out);
        assert_int_equal(rx.rows, 1);
        assert_int_equal(rx.cols, 65535);
        assert_int_equal(text(pc, "{\"rows\": -7, \"cols\": 9223372036854775807}", &out), 0);
        agent_rx_take(&rx, &out);
        assert_int_equal(rx.rows, 1);
        assert_int_equal(rx.cols, 65535);
        assert_int_equal(rx.resizes, 4);

        /* nothing to send: nothing sent */
        assert_int_equal(text(pc, "{\"data\": \"\"}", &out), 0);
        assert_int_equal(text(pc, "{}", &out), 0);
        assert_int_equal(ptyconv_client_input(pc, NULL, 0, &out), 0);
        assert_int_equal(out.len, 0);

        agent_rx_free(&rx);
        bytebuf_free(&out);
        ptyconv_free(pc);
    }
}

/* Input longer than a record body is split into DATA records of at most 65535 bytes. */
static void test_client_large_input_split(void **state)
{
    (void)state;
    enum { N = 3 * 65535 + 1234 };
    uint8_t *raw = pattern(N, 7);
    struct ptyconv *pc = ptyconv_new(true);
    struct agent_rx rx;
    struct bytebuf out = {0};
    agent_rx_init(&rx, true);
    assert_int_equal(ptyconv_client_input(pc, raw, N, &out), 0);
    agent_rx_take(&rx, &out);
    assert_int_equal(rx.data.len, N);
    assert_memory_equal(bytebuf_peek(&rx.data), raw, N);
    assert_int_equal(rx.data_records, 4);
    assert_int_equal(rx.max_data_body, 65535);

    /* the same through JSON: printable bytes in a "data" string of 200000 bytes */
    size_t n = 200000;
    char *json = malloc(n + 32);
    int k = sprintf(json, "{\"data\":\"");
    for (size_t i = 0; i < n; i++)
        json[k + i] = (char)('a' + i % 26);
    strcpy(json + k + n, "\"}");
    size_t before = rx.data.len;
    assert_int_equal(text(pc, json, &out), 0);
    agent_rx_take(&rx, &out);
    assert_int_equal(rx.data.len - before, n);
    assert_memory_equal(bytebuf_peek(&rx.data) + before, json + k, n);
    assert_int_equal(rx.data_records, 8);
    assert_int_equal(rx.max_data_body, 65535);
    free(json);
    agent_rx_free(&rx);
    bytebuf_free(&out);
    ptyconv_free(pc);
    free(raw);
}

/* Bad messages are ignored, with a reason; the stream toward the agent goes on intact. */
static void test_client_bad_json_ignored(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "not json",
        "{\"data\": \"unterminated",
        "[1,2,3]",
        "\"just a string\"",
        "42",
        "null",
        "{\"data\": 5}",
        "{\"data\": null}",
        "{\"data\": [\"a\"]}",
        "{\"rows\": \"24\", \"cols\": 80}",
        "{\"rows\": 24, \"cols\": 80.5}",
        "{\"rows\": 24}",
        "{\"cols\": 80, \"data\": \"lost too\"}",
        "{\"data\": \"x\"} trailing",
        "{\"data\": \"bad \\u0zzz escape\"}",
        "{\"data\": \"\xff\xfe not utf-8\"}",
    };
    struct ptyconv *pc = ptyconv_new(true);
    struct agent_rx rx;
    struct bytebuf out = {0};
    agent_rx_init(&rx, true);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char why[128] = "";
        int rc = ptyconv_client_text(pc, (const uint8_t *)bad[i], strlen(bad[i]), true, true, &out,
                                     why, sizeof(why));
        if (rc != PTYCONV_E_IGNORED)
            fail_msg("message %zu (%s): got %d", i, bad[i], rc);
        assert_true(why[0] != '\0');
        assert_null(strstr(why, "lost")); /* no client bytes in the log line */
        assert_int_equal(out.len, 0);
        assert_int_equal(text(pc, "{\"data\":\"ok\"}", &out), 0);
        agent_rx_take(&rx, &out);
    }
    assert_int_equal(rx.data.len, 2 * sizeof(bad) / sizeof(bad[0]));
    assert_int_equal(rx.resizes, 0);
    agent_rx_free(&rx);
    bytebuf_free(&out);
    ptyconv_free(pc);
}

/* Builds {"data":"aaa..."} of exactly `total` bytes. */
static char *json_of_size(size_t total)
{
    char *j = malloc(total + 1);
    memcpy(j, "{\"data\":\"", 9);
    memset(j + 9, 'a', total - 11);
    memcpy(j + total - 2, "\"}", 3);
    return j;
}

/* Pieces of one message are joined; 1 MiB is allowed, one byte more is ignored. */
static void test_client_text_pieces_and_limit(void **state)
{
    (void)state;
    struct ptyconv *pc = ptyconv_new(true);
    struct agent_rx rx;
    struct bytebuf out = {0};
    char why[128];
    agent_rx_init(&rx, true);

    const char *msg = "{\"data\":\"split\",\"rows\":30,\"cols\":100}";
    size_t n = strlen(msg);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(ptyconv_client_text(pc, (const uint8_t *)msg + i, 1, i == 0, i == n - 1,
                                             &out, why, sizeof(why)),
                         0);
        if (i < n - 1)
            assert_int_equal(out.len, 0);
    }
    agent_rx_take(&rx, &out);
    assert_int_equal(rx.data.len, 5);
    assert_int_equal(rx.rows, 30);

    char *max = json_of_size(PTYCONV_MAX_JSON);
    assert_int_equal(text(pc, max, &out), 0);
    agent_rx_take(&rx, &out);
    assert_int_equal(rx.data.len, 5 + PTYCONV_MAX_JSON - 11);
    free(max);

    /* over the limit, in 64 KiB pieces: ignored once, the rest dropped without a word */
    char *over = json_of_size(PTYCONV_MAX_JSON + 1);
    size_t total = PTYCONV_MAX_JSON + 1, piece = 64 * 1024, ignored = 0;
    for (size_t off = 0; off < total; off += piece) {
        size_t k = total - off < piece ? total - off : piece;
        int rc = ptyconv_client_text(pc, (const uint8_t *)over + off, k, off == 0, off + k == total,
                                     &out, why, sizeof(why));
        if (rc == PTYCONV_E_IGNORED)
            ignored++;
        else
            assert_int_equal(rc, 0);
    }
    assert_int_equal(ignored, 1);
    assert_int_equal(out.len, 0);
    /* one message over the limit in a single piece */
    assert_int_equal(text(pc, over, &out), PTYCONV_E_IGNORED);
    assert_int_equal(out.len, 0);
    free(over);

    /* and the next message is whole and fine */
    assert_int_equal(text(pc, "{\"data\":\"after\"}", &out), 0);
    agent_rx_take(&rx, &out);
    assert_int_equal(rx.data.len, 5 + PTYCONV_MAX_JSON - 11 + 5);
    assert_memory_equal(bytebuf_peek(&rx.data) + rx.data.len - 5, "after", 5);

    agent_rx_free(&rx);
    bytebuf_free(&out);
    ptyconv_free(pc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_agent_output_any_split_any_room),
        cmocka_unit_test(test_agent_records_split_at_every_byte),
        cmocka_unit_test(test_agent_zlib_split_at_every_byte),
        cmocka_unit_test(test_agent_zlib_bomb_bounded),
        cmocka_unit_test(test_agent_zlib_bomb_of_unknown_records),
        cmocka_unit_test(test_agent_malformed_records),
        cmocka_unit_test(test_agent_not_zlib),
        cmocka_unit_test(test_client_json_to_records),
        cmocka_unit_test(test_client_large_input_split),
        cmocka_unit_test(test_client_bad_json_ignored),
        cmocka_unit_test(test_client_text_pieces_and_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
