/*
 * Unit tests for proto/: the tether.v1 wire format (proto/PROTOCOL.md).
 *
 * Every encoder is checked against its decoder, every malformed class the spec names is
 * checked to be rejected with the right PROTO_E_* code, and the worked examples of
 * PROTOCOL.md are checked byte for byte.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proto/proto.h"

/* Session frames live on stream 0; all others on a stream id. */
static int is_session(int type)
{
    return type == PROTO_HELLO || type == PROTO_PING || type == PROTO_PONG ||
           type == PROTO_GOAWAY || type == PROTO_CONTROL;
}

/* A payload length that is valid for type (with max_data = default). */
static uint32_t valid_length(int type)
{
    switch (type) {
    case PROTO_HELLO:
        return PROTO_HELLO_SIZE;
    case PROTO_OPEN:
        return 4;
    case PROTO_OPEN_OK:
        return 0;
    case PROTO_OPEN_FAIL:
    case PROTO_RST:
        return 4;
    case PROTO_DATA:
        return 100;
    case PROTO_CREDIT:
        return 8;
    case PROTO_PING:
    case PROTO_PONG:
        return PROTO_PING_SIZE;
    case PROTO_GOAWAY:
        return 8;
    case PROTO_CONTROL:
        return 2;
    }
    return 0;
}

static int decode_hdr(int type, uint16_t flags, uint32_t stream, uint32_t length, uint32_t max_data,
                      struct proto_header *h)
{
    uint8_t buf[PROTO_HEADER_SIZE];
    proto_header_encode(buf, (uint8_t)type, flags, stream, length);
    return proto_header_decode(buf, sizeof(buf), max_data, h);
}

static int hdr_rc(int type, uint16_t flags, uint32_t stream, uint32_t length)
{
    struct proto_header h;
    return decode_hdr(type, flags, stream, length, PROTO_DEFAULT_FRAME_PAYLOAD, &h);
}

/* ---- header ---- */

static void test_header_round_trip(void **state)
{
    (void)state;
    for (int t = PROTO_HELLO; t <= PROTO_CONTROL; t++) {
        uint32_t stream = is_session(t) ? 0 : 0x80000001u;
        uint16_t flags = t == PROTO_DATA ? PROTO_FLAG_FIN : 0;
        struct proto_header h;
        memset(&h, 0xaa, sizeof(h));
        assert_int_equal(
            decode_hdr(t, flags, stream, valid_length(t), PROTO_DEFAULT_FRAME_PAYLOAD, &h), 0);
        assert_int_equal(h.version, PROTO_VERSION);
        assert_int_equal(h.type, t);
        assert_int_equal(h.flags, flags);
        assert_int_equal(h.stream, stream);
        assert_int_equal(h.length, valid_length(t));
    }
}

static void test_header_byte_order(void **state)
{
    (void)state;
    uint8_t buf[PROTO_HEADER_SIZE];
    proto_header_encode(buf, PROTO_DATA, PROTO_FLAG_FIN, 0x01020304u, 0x0000a0b0u);
    const uint8_t want[PROTO_HEADER_SIZE] = {1, 5, 0, 1, 1, 2, 3, 4, 0, 0, 0xa0, 0xb0};
    assert_memory_equal(buf, want, sizeof(want));
}

static void test_header_short(void **state)
{
    (void)state;
    uint8_t buf[PROTO_HEADER_SIZE];
    proto_header_encode(buf, PROTO_PING, 0, 0, PROTO_PING_SIZE);
    struct proto_header h;
    for (size_t n = 0; n < PROTO_HEADER_SIZE; n++)
        assert_int_equal(proto_header_decode(buf, n, PROTO_DEFAULT_FRAME_PAYLOAD, &h),
                         PROTO_E_SHORT);
    assert_int_equal(proto_header_decode(buf, sizeof(buf), PROTO_DEFAULT_FRAME_PAYLOAD, &h), 0);
}

static void test_header_bad_version(void **state)
{
    (void)state;
    const uint8_t versions[] = {0, 2, 0x7f, 0xff};
    for (size_t i = 0; i < sizeof(versions); i++) {
        uint8_t buf[PROTO_HEADER_SIZE];
        proto_header_encode(buf, PROTO_PING, 0, 0, PROTO_PING_SIZE);
        buf[0] = versions[i];
        struct proto_header h;
        assert_int_equal(proto_header_decode(buf, sizeof(buf), PROTO_DEFAULT_FRAME_PAYLOAD, &h),
                         PROTO_E_VERSION);
    }
}

static void test_header_unknown_type(void **state)
{
    (void)state;
    const int types[] = {0, 12, 13, 0x7f, 0xff};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        assert_int_equal(hdr_rc(types[i], 0, 0, 0), PROTO_E_TYPE);
        assert_int_equal(hdr_rc(types[i], 0, 1, 8), PROTO_E_TYPE);
    }
}

/* Only FIN on DATA is defined; every other bit on every type is rejected. */
static void test_header_flags(void **state)
{
    (void)state;
    for (int t = PROTO_HELLO; t <= PROTO_CONTROL; t++) {
        uint32_t stream = is_session(t) ? 0 : 7;
        assert_int_equal(hdr_rc(t, 0, stream, valid_length(t)), 0);
        for (int bit = 0; bit < 16; bit++) {
            uint16_t f = (uint16_t)(1u << bit);
            int want = (t == PROTO_DATA && f == PROTO_FLAG_FIN) ? 0 : PROTO_E_FLAGS;
            assert_int_equal(hdr_rc(t, f, stream, valid_length(t)), want);
        }
        int want_all = PROTO_E_FLAGS;
        assert_int_equal(hdr_rc(t, 0xffff, stream, valid_length(t)), want_all);
    }
}

static void test_header_stream_zero(void **state)
{
    (void)state;
    for (int t = PROTO_HELLO; t <= PROTO_CONTROL; t++) {
        uint32_t len = valid_length(t);
        if (is_session(t)) {
            assert_int_equal(hdr_rc(t, 0, 0, len), 0);
            assert_int_equal(hdr_rc(t, 0, 1, len), PROTO_E_STREAM);
            assert_int_equal(hdr_rc(t, 0, 2, len), PROTO_E_STREAM);
            assert_int_equal(hdr_rc(t, 0, 0xffffffffu, len), PROTO_E_STREAM);
        } else {
            assert_int_equal(hdr_rc(t, 0, 1, len), 0);
            assert_int_equal(hdr_rc(t, 0, 2, len), 0);
            assert_int_equal(hdr_rc(t, 0, 0xffffffffu, len), 0);
            assert_int_equal(hdr_rc(t, 0, 0, len), PROTO_E_STREAM);
        }
    }
}

struct length_case {
    int type;
    uint32_t length;
    int ok;
};

static void test_header_lengths(void **state)
{
    (void)state;
    const struct length_case cases[] = {
        {PROTO_HELLO, 0, 1},
        {PROTO_HELLO, 6, 1},
        {PROTO_HELLO, PROTO_MAX_HELLO_SETTINGS * 6, 1},
        {PROTO_HELLO, PROTO_MAX_HELLO_SETTINGS * 6 + 6, 0},
        {PROTO_HELLO, 5, 0},
        {PROTO_HELLO, 7, 0},
        {PROTO_HELLO, PROTO_HELLO_SIZE + 1, 0},
        {PROTO_HELLO, 0xffffffffu, 0},
        {PROTO_OPEN, 3, 0},
        {PROTO_OPEN, 4, 1},
        {PROTO_OPEN, PROTO_MAX_OPEN, 1},
        {PROTO_OPEN, PROTO_MAX_OPEN + 1, 0},
        {PROTO_OPEN_OK, 0, 1},
        {PROTO_OPEN_OK, 1, 0},
        {PROTO_OPEN_FAIL, 3, 0},
        {PROTO_OPEN_FAIL, 4, 1},
        {PROTO_OPEN_FAIL, PROTO_REASON_MAX, 1},
        {PROTO_OPEN_FAIL, PROTO_REASON_MAX + 1, 0},
        {PROTO_RST, 0, 0},
        {PROTO_RST, 3, 0},
        {PROTO_RST, 4, 1},
        {PROTO_RST, PROTO_REASON_MAX, 1},
        {PROTO_RST, PROTO_REASON_MAX + 1, 0},
        {PROTO_DATA, 0, 1},
        {PROTO_DATA, PROTO_DEFAULT_FRAME_PAYLOAD, 1},
        {PROTO_DATA, PROTO_DEFAULT_FRAME_PAYLOAD + 1, 0},
        {PROTO_CREDIT, 7, 0},
        {PROTO_CREDIT, 8, 1},
        {PROTO_CREDIT, 9, 0},
        {PROTO_CREDIT, 0, 0},
        {PROTO_PING, 0, 0},
        {PROTO_PING, 7, 0},
        {PROTO_PING, 8, 1},
        {PROTO_PING, 9, 0},
        {PROTO_PONG, 7, 0},
        {PROTO_PONG, 8, 1},
        {PROTO_PONG, 9, 0},
        {PROTO_GOAWAY, 7, 0},
        {PROTO_GOAWAY, 8, 1},
        {PROTO_GOAWAY, PROTO_GOAWAY_MAX, 1},
        {PROTO_GOAWAY, PROTO_GOAWAY_MAX + 1, 0},
        {PROTO_CONTROL, 0, 0},
        {PROTO_CONTROL, 1, 1},
        {PROTO_CONTROL, PROTO_MAX_CONTROL, 1},
        {PROTO_CONTROL, PROTO_MAX_CONTROL + 1, 0},
        {PROTO_CONTROL, 0xffffffffu, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct length_case *c = &cases[i];
        uint32_t stream = is_session(c->type) ? 0 : 3;
        int rc = hdr_rc(c->type, 0, stream, c->length);
        if (rc != (c->ok ? 0 : PROTO_E_LENGTH))
            fail_msg("%s length %u: got %d", proto_type_name(c->type), c->length, rc);
    }
}

/* DATA's limit is the max_data the receiver advertised, not a constant. */
static void test_header_data_limit_follows_max_data(void **state)
{
    (void)state;
    struct proto_header h;
    assert_int_equal(
        decode_hdr(PROTO_DATA, 0, 1, PROTO_MAX_FRAME_PAYLOAD, PROTO_MAX_FRAME_PAYLOAD, &h), 0);
    assert_int_equal(
        decode_hdr(PROTO_DATA, 0, 1, PROTO_MAX_FRAME_PAYLOAD + 1, PROTO_MAX_FRAME_PAYLOAD, &h),
        PROTO_E_LENGTH);
    assert_int_equal(
        decode_hdr(PROTO_DATA, 0, 1, PROTO_MIN_FRAME_PAYLOAD + 1, PROTO_MIN_FRAME_PAYLOAD, &h),
        PROTO_E_LENGTH);
    /* max_data does not widen the other types' limits. */
    assert_int_equal(decode_hdr(PROTO_OPEN, 0, 1, PROTO_MAX_OPEN + 1, PROTO_MAX_FRAME_PAYLOAD, &h),
                     PROTO_E_LENGTH);
}

/* ---- HELLO ---- */

static size_t put_setting(uint8_t *p, uint16_t id, uint32_t v)
{
    p[0] = (uint8_t)(id >> 8);
    p[1] = (uint8_t)id;
    p[2] = (uint8_t)(v >> 24);
    p[3] = (uint8_t)(v >> 16);
    p[4] = (uint8_t)(v >> 8);
    p[5] = (uint8_t)v;
    return 6;
}

static int hello_one(uint16_t id, uint32_t v, struct proto_hello *out)
{
    uint8_t p[6];
    put_setting(p, id, v);
    return proto_hello_decode(p, sizeof(p), out);
}

static void test_hello_round_trip(void **state)
{
    (void)state;
    struct proto_hello in = {
        .max_frame_payload = 123456, .initial_window = 7654321, .max_streams = 99};
    uint8_t buf[PROTO_HELLO_SIZE];
    assert_int_equal(proto_hello_encode(&in, buf), PROTO_HELLO_SIZE);
    struct proto_hello out;
    assert_int_equal(proto_hello_decode(buf, sizeof(buf), &out), 0);
    assert_int_equal(out.max_frame_payload, in.max_frame_payload);
    assert_int_equal(out.initial_window, in.initial_window);
    assert_int_equal(out.max_streams, in.max_streams);
}

static void test_hello_defaults(void **state)
{
    (void)state;
    struct proto_hello h;
    proto_hello_default(&h);
    assert_int_equal(h.max_frame_payload, PROTO_DEFAULT_FRAME_PAYLOAD);
    assert_int_equal(h.initial_window, PROTO_DEFAULT_WINDOW);
    assert_int_equal(h.max_streams, PROTO_DEFAULT_MAX_STREAMS);

    /* An empty HELLO means "all defaults". */
    struct proto_hello out;
    memset(&out, 0, sizeof(out));
    assert_int_equal(proto_hello_decode((const uint8_t *)"", 0, &out), 0);
    assert_memory_equal(&out, &h, sizeof(h));

    /* A HELLO that sets one setting leaves the others at their defaults. */
    assert_int_equal(hello_one(PROTO_SETTING_MAX_STREAMS, 5, &out), 0);
    assert_int_equal(out.max_streams, 5);
    assert_int_equal(out.max_frame_payload, PROTO_DEFAULT_FRAME_PAYLOAD);
    assert_int_equal(out.initial_window, PROTO_DEFAULT_WINDOW);
}

struct range_case {
    uint16_t id;
    uint32_t lo, hi;
};

static void test_hello_ranges(void **state)
{
    (void)state;
    const struct range_case cases[] = {
        {PROTO_SETTING_MAX_FRAME_PAYLOAD, PROTO_MIN_FRAME_PAYLOAD, PROTO_MAX_FRAME_PAYLOAD},
        {PROTO_SETTING_INITIAL_WINDOW, PROTO_MIN_WINDOW, PROTO_MAX_WINDOW},
        {PROTO_SETTING_MAX_STREAMS, 1, PROTO_MAX_STREAMS_LIMIT},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct range_case *c = &cases[i];
        struct proto_hello h;
        assert_int_equal(hello_one(c->id, c->lo, &h), 0);
        assert_int_equal(hello_one(c->id, c->hi, &h), 0);
        assert_int_equal(hello_one(c->id, c->lo - 1, &h), PROTO_E_PAYLOAD);
        assert_int_equal(hello_one(c->id, c->hi + 1, &h), PROTO_E_PAYLOAD);
        assert_int_equal(hello_one(c->id, 0, &h), PROTO_E_PAYLOAD);
        assert_int_equal(hello_one(c->id, 0xffffffffu, &h), PROTO_E_PAYLOAD);
    }
}

static void test_hello_unknown_settings_ignored(void **state)
{
    (void)state;
    uint8_t p[6 * 5];
    size_t n = 0;
    n += put_setting(p + n, 0, 0xffffffffu);
    n += put_setting(p + n, PROTO_SETTING_INITIAL_WINDOW, PROTO_MIN_WINDOW);
    n += put_setting(p + n, 4, 0);
    n += put_setting(p + n, 0x1234, 1);
    n += put_setting(p + n, 0xffff, 0xffffffffu);
    struct proto_hello h;
    assert_int_equal(proto_hello_decode(p, n, &h), 0);
    assert_int_equal(h.initial_window, PROTO_MIN_WINDOW);
    assert_int_equal(h.max_frame_payload, PROTO_DEFAULT_FRAME_PAYLOAD);
    assert_int_equal(h.max_streams, PROTO_DEFAULT_MAX_STREAMS);
}

static void test_hello_repeated_setting_last_wins(void **state)
{
    (void)state;
    uint8_t p[12];
    put_setting(p, PROTO_SETTING_MAX_STREAMS, 10);
    put_setting(p + 6, PROTO_SETTING_MAX_STREAMS, 20);
    struct proto_hello h;
    assert_int_equal(proto_hello_decode(p, sizeof(p), &h), 0);
    assert_int_equal(h.max_streams, 20);
}

static void test_hello_bad_length(void **state)
{
    (void)state;
    uint8_t p[6 * (PROTO_MAX_HELLO_SETTINGS + 1)];
    for (size_t i = 0; i < sizeof(p); i += 6)
        put_setting(p + i, 0x100, 0);
    struct proto_hello h;
    for (size_t n = 1; n < 6; n++)
        assert_int_equal(proto_hello_decode(p, n, &h), PROTO_E_LENGTH);
    assert_int_equal(proto_hello_decode(p, 13, &h), PROTO_E_LENGTH);
    assert_int_equal(proto_hello_decode(p, PROTO_MAX_HELLO_SETTINGS * 6, &h), 0);
    assert_int_equal(proto_hello_decode(p, sizeof(p), &h), PROTO_E_LENGTH);
}

/* ---- OPEN ---- */

static void test_open_tcp_round_trip(void **state)
{
    (void)state;
    const char *hosts[] = {"127.0.0.1", "localhost", "::1", "fe80::1%eth0",
                           "my_host.example-1.com"};
    for (size_t i = 0; i < sizeof(hosts) / sizeof(hosts[0]); i++) {
        struct proto_open o = {.kind = PROTO_KIND_TCP, .port = (uint16_t)(1 + i * 20000)};
        strcpy(o.host, hosts[i]);
        uint8_t buf[PROTO_MAX_OPEN];
        int n = proto_open_encode(&o, buf, sizeof(buf));
        assert_int_equal(n, 7 + (int)strlen(hosts[i]));
        struct proto_open d;
        memset(&d, 0xaa, sizeof(d));
        assert_int_equal(proto_open_decode(buf, (size_t)n, &d), 0);
        assert_int_equal(d.kind, PROTO_KIND_TCP);
        assert_int_equal(d.flags, 0);
        assert_int_equal(d.port, o.port);
        assert_string_equal(d.host, hosts[i]);
    }
}

static void test_open_tcp_max_port_and_host(void **state)
{
    (void)state;
    struct proto_open o = {.kind = PROTO_KIND_TCP, .port = 65535};
    memset(o.host, 'h', PROTO_MAX_HOST);
    o.host[PROTO_MAX_HOST] = '\0';
    uint8_t buf[PROTO_MAX_OPEN];
    int n = proto_open_encode(&o, buf, sizeof(buf));
    assert_int_equal(n, 7 + PROTO_MAX_HOST);
    struct proto_open d;
    assert_int_equal(proto_open_decode(buf, (size_t)n, &d), 0);
    assert_int_equal(d.port, 65535);
    assert_int_equal(strlen(d.host), PROTO_MAX_HOST);
}

static void test_open_ssh_round_trip(void **state)
{
    (void)state;
    struct proto_open o = {.kind = PROTO_KIND_SSH};
    uint8_t buf[16];
    assert_int_equal(proto_open_encode(&o, buf, sizeof(buf)), 4);
    const uint8_t want[4] = {PROTO_KIND_SSH, 0, 0, 0};
    assert_memory_equal(buf, want, 4);
    struct proto_open d;
    assert_int_equal(proto_open_decode(buf, 4, &d), 0);
    assert_int_equal(d.kind, PROTO_KIND_SSH);
}

/* payload = kind tcp, port, host length byte, host bytes. */
static size_t tcp_payload(uint8_t *p, uint16_t port, const char *host, size_t hl)
{
    p[0] = PROTO_KIND_TCP;
    p[1] = p[2] = p[3] = 0;
    p[4] = (uint8_t)(port >> 8);
    p[5] = (uint8_t)port;
    p[6] = (uint8_t)hl;
    memcpy(p + 7, host, hl);
    return 7 + hl;
}

static void test_open_tcp_malformed(void **state)
{
    (void)state;
    uint8_t p[PROTO_MAX_OPEN + 2];
    struct proto_open d;
    size_t n;

    n = tcp_payload(p, 22, "localhost", 9);
    assert_int_equal(proto_open_decode(p, n, &d), 0);

    /* port 0 */
    n = tcp_payload(p, 0, "localhost", 9);
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    /* empty host */
    n = tcp_payload(p, 22, "", 0);
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    /* host length byte larger than what follows (truncated) */
    n = tcp_payload(p, 22, "localhost", 9);
    assert_int_equal(proto_open_decode(p, n - 1, &d), PROTO_E_PAYLOAD);
    /* tcp without port/host, or with only part of them */
    for (size_t k = 4; k < 7; k++)
        assert_int_equal(proto_open_decode(p, k, &d), PROTO_E_PAYLOAD);
    /* trailing bytes after the host */
    n = tcp_payload(p, 22, "localhost", 9);
    p[n] = 'x';
    assert_int_equal(proto_open_decode(p, n + 1, &d), PROTO_E_PAYLOAD);
    p[n] = 0;
    assert_int_equal(proto_open_decode(p, n + 1, &d), PROTO_E_PAYLOAD);
    /* reserved flags byte and reserved u16 must be zero */
    for (int i = 1; i <= 3; i++) {
        n = tcp_payload(p, 22, "localhost", 9);
        p[i] = 0x01;
        assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
        p[i] = 0x80;
        assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    }
    /* shorter than the common 4-byte prefix, or over the limit */
    assert_int_equal(proto_open_decode(p, 0, &d), PROTO_E_PAYLOAD);
    assert_int_equal(proto_open_decode(p, 3, &d), PROTO_E_PAYLOAD);
    memset(p, 0, sizeof(p));
    p[0] = PROTO_KIND_SSH;
    assert_int_equal(proto_open_decode(p, PROTO_MAX_OPEN + 1, &d), PROTO_E_PAYLOAD);
}

static void test_open_tcp_host_chars(void **state)
{
    (void)state;
    const char bad[] = {' ',  '/',    '@',    '\\',   '[', ']', '\0', '\n',
                        '\t', '\x7f', '\x80', '\xff', '*', '?', '#',  '"'};
    uint8_t p[64];
    struct proto_open d;
    for (size_t i = 0; i < sizeof(bad); i++) {
        char host[] = "abc.def";
        host[3] = bad[i];
        size_t n = tcp_payload(p, 80, host, 7);
        if (proto_open_decode(p, n, &d) != PROTO_E_PAYLOAD)
            fail_msg("host byte 0x%02x accepted", (unsigned char)bad[i]);

        /* The encoder refuses what the decoder would refuse. */
        struct proto_open o = {.kind = PROTO_KIND_TCP, .port = 80};
        memcpy(o.host, host, sizeof(host));
        if (bad[i] != '\0')
            assert_int_equal(proto_open_encode(&o, p, sizeof(p)), PROTO_E_PAYLOAD);
    }
    const char *good = "AZaz09.-:_%";
    size_t n = tcp_payload(p, 80, good, strlen(good));
    assert_int_equal(proto_open_decode(p, n, &d), 0);
    assert_string_equal(d.host, good);
}

static void test_open_encode_rejects(void **state)
{
    (void)state;
    uint8_t buf[PROTO_MAX_OPEN];
    struct proto_open o = {.kind = PROTO_KIND_TCP, .port = 80};
    /* empty host */
    assert_int_equal(proto_open_encode(&o, buf, sizeof(buf)), PROTO_E_PAYLOAD);
    /* port 0 */
    strcpy(o.host, "localhost");
    o.port = 0;
    assert_int_equal(proto_open_encode(&o, buf, sizeof(buf)), PROTO_E_PAYLOAD);
    /* host of 256 bytes (no NUL inside the array) */
    o.port = 80;
    memset(o.host, 'a', sizeof(o.host));
    assert_int_equal(proto_open_encode(&o, buf, sizeof(buf)), PROTO_E_PAYLOAD);
    /* too small a buffer */
    strcpy(o.host, "localhost");
    assert_int_equal(proto_open_encode(&o, buf, 7 + 8), PROTO_E_PAYLOAD);
    assert_int_equal(proto_open_encode(&o, buf, 7 + 9), 16);
    assert_int_equal(proto_open_encode(&o, buf, 3), PROTO_E_PAYLOAD);
    /* unknown kinds are not encoded */
    o.kind = 4;
    assert_true(proto_open_encode(&o, buf, sizeof(buf)) < 0);
    o.kind = 0;
    assert_true(proto_open_encode(&o, buf, sizeof(buf)) < 0);
}

static void test_open_unknown_kind(void **state)
{
    (void)state;
    const uint8_t kinds[] = {0, 4, 0x7f, 0xff};
    uint8_t p[32] = {0};
    struct proto_open d;
    for (size_t i = 0; i < sizeof(kinds); i++) {
        p[0] = kinds[i];
        /* With or without a kind-specific body: the receiver cannot judge it. */
        assert_int_equal(proto_open_decode(p, 4, &d), PROTO_E_KIND);
        assert_int_equal(proto_open_decode(p, sizeof(p), &d), PROTO_E_KIND);
        assert_int_equal(d.kind, kinds[i]);
    }
}

/* A valid pty OPEN: kind 3, id 01..10, 24x80, zlib, command "top". */
static size_t pty_open_bytes(uint8_t *p)
{
    static const uint8_t head[4] = {PROTO_KIND_PTY, 0, 0, 0};
    memcpy(p, head, 4);
    for (int i = 0; i < 16; i++)
        p[4 + i] = (uint8_t)(i + 1);
    const uint8_t rest[] = {0, 24, 0, 80, PROTO_PTY_OPT_ZLIB, 0, 0, 3, 't', 'o', 'p'};
    memcpy(p + 20, rest, sizeof(rest));
    return 20 + sizeof(rest);
}

static void test_open_pty_roundtrip(void **state)
{
    (void)state;
    uint8_t p[64], q[64];
    size_t n = pty_open_bytes(p);
    struct proto_open d;
    assert_int_equal(proto_open_decode(p, n, &d), 0);
    assert_int_equal(d.kind, PROTO_KIND_PTY);
    assert_int_equal(d.rows, 24);
    assert_int_equal(d.cols, 80);
    assert_int_equal(d.pty_options, PROTO_PTY_OPT_ZLIB);
    assert_string_equal(d.command, "top");
    assert_int_equal(d.pty_id[0], 1);
    assert_int_equal(d.pty_id[15], 16);
    assert_int_equal(proto_open_encode(&d, q, sizeof(q)), (int)n);
    assert_memory_equal(p, q, n);
    /* An empty command: the login shell. Absurd sizes are the agent's to clamp. */
    p[20] = p[21] = p[22] = p[23] = 0;
    p[26] = p[27] = 0;
    assert_int_equal(proto_open_decode(p, 28, &d), 0);
    assert_string_equal(d.command, "");
    assert_int_equal(d.rows, 0);
    /* Encoding needs room for all of it. */
    assert_int_equal(proto_open_encode(&d, q, 27), PROTO_E_PAYLOAD);
}

static void test_open_pty_malformed(void **state)
{
    (void)state;
    uint8_t p[64];
    struct proto_open d;
    size_t n = pty_open_bytes(p);
    for (size_t k = 4; k < n; k++) /* every truncation, and one byte too many */
        assert_int_equal(proto_open_decode(p, k, &d), PROTO_E_PAYLOAD);
    assert_int_equal(proto_open_decode(p, n + 1, &d), PROTO_E_PAYLOAD);
    n = pty_open_bytes(p);
    memset(p + 4, 0, 16); /* an all-zero id */
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    n = pty_open_bytes(p);
    p[24] = 0x02; /* an option this version does not know */
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    n = pty_open_bytes(p);
    p[25] = 1; /* reserved */
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    n = pty_open_bytes(p);
    p[27] = 4; /* cmd_len lies */
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    n = pty_open_bytes(p);
    p[29] = 0; /* a NUL inside the command */
    assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    /* A command longer than PROTO_MAX_PTY_COMMAND. */
    uint8_t big[PROTO_MAX_OPEN];
    memset(big, 'x', sizeof(big));
    pty_open_bytes(big);
    big[26] = (PROTO_MAX_PTY_COMMAND + 1) >> 8;
    big[27] = (PROTO_MAX_PTY_COMMAND + 1) & 0xff;
    assert_int_equal(proto_open_decode(big, 28 + PROTO_MAX_PTY_COMMAND + 1, &d), PROTO_E_PAYLOAD);
    big[26] = PROTO_MAX_PTY_COMMAND >> 8;
    big[27] = PROTO_MAX_PTY_COMMAND & 0xff;
    assert_int_equal(proto_open_decode(big, 28 + PROTO_MAX_PTY_COMMAND, &d), 0);
    assert_int_equal(strlen(d.command), PROTO_MAX_PTY_COMMAND);
}

static void test_ptyrec(void **state)
{
    (void)state;
    struct proto_ptyrec r;
    uint8_t b[16];
    proto_ptyrec_header(PROTO_PTYREC_DATA, 2, b);
    b[3] = 'h';
    b[4] = 'i';
    for (size_t k = 0; k < 5; k++) /* a record split anywhere waits for the rest */
        assert_int_equal(proto_ptyrec_decode(b, k, &r), 0);
    assert_int_equal(proto_ptyrec_decode(b, 5, &r), 5);
    assert_int_equal(r.type, PROTO_PTYREC_DATA);
    assert_memory_equal(r.body, "hi", 2);
    const uint8_t resize[] = {PROTO_PTYREC_RESIZE, 0, 4, 0, 50, 0, 132, 0xee};
    assert_int_equal(proto_ptyrec_decode(resize, sizeof(resize), &r), 7);
    assert_int_equal(r.rows, 50);
    assert_int_equal(r.cols, 132);
    const uint8_t exit_sig[] = {PROTO_PTYREC_EXIT, 0, 2, 1, 9};
    assert_int_equal(proto_ptyrec_decode(exit_sig, sizeof(exit_sig), &r), 5);
    assert_int_equal(r.exit_how, 1);
    assert_int_equal(r.exit_value, 9);
    /* Malformed known records. */
    const uint8_t empty_data[] = {PROTO_PTYREC_DATA, 0, 0};
    assert_int_equal(proto_ptyrec_decode(empty_data, 3, &r), PROTO_E_PAYLOAD);
    const uint8_t short_resize[] = {PROTO_PTYREC_RESIZE, 0, 3, 0, 1, 2};
    assert_int_equal(proto_ptyrec_decode(short_resize, 6, &r), PROTO_E_PAYLOAD);
    const uint8_t bad_exit[] = {PROTO_PTYREC_EXIT, 0, 2, 2, 0};
    assert_int_equal(proto_ptyrec_decode(bad_exit, 5, &r), PROTO_E_PAYLOAD);
    /* An unknown type is handed over whole, to be skipped. */
    const uint8_t later[] = {0x40, 0, 1, 7};
    assert_int_equal(proto_ptyrec_decode(later, 4, &r), 4);
    assert_int_equal(r.type, 0x40);
}

static void test_open_ssh_trailing(void **state)
{
    (void)state;
    uint8_t p[8] = {PROTO_KIND_SSH, 0, 0, 0, 1, 2, 3, 4};
    struct proto_open d;
    assert_int_equal(proto_open_decode(p, 4, &d), 0);
    for (size_t n = 5; n <= sizeof(p); n++)
        assert_int_equal(proto_open_decode(p, n, &d), PROTO_E_PAYLOAD);
    p[1] = 1;
    assert_int_equal(proto_open_decode(p, 4, &d), PROTO_E_PAYLOAD);
}

/* ---- OPEN_FAIL, RST, GOAWAY ---- */

static void test_reason_round_trip(void **state)
{
    (void)state;
    uint8_t buf[PROTO_REASON_MAX];
    const char *text = "connection refused: 127.0.0.1:8080 \xc3\xa9t\xc3\xa9";
    size_t n = proto_reason_encode(PROTO_CODE_REFUSED, text, buf);
    assert_int_equal(n, 4 + strlen(text));
    struct proto_reason r;
    assert_int_equal(proto_reason_decode(buf, n, &r), 0);
    assert_int_equal(r.code, PROTO_CODE_REFUSED);
    assert_int_equal(r.last_stream, 0);
    assert_int_equal(r.text_len, strlen(text));
    assert_memory_equal(r.text, text, r.text_len);
    /* The text points into the payload (no copy). */
    assert_ptr_equal(r.text, (const char *)buf + 4);

    /* Empty and NULL texts. */
    n = proto_reason_encode(0xfffffffeu, "", buf);
    assert_int_equal(n, 4);
    assert_int_equal(proto_reason_decode(buf, n, &r), 0);
    assert_int_equal(r.code, 0xfffffffeu);
    assert_int_equal(r.text_len, 0);
    assert_int_equal(proto_reason_encode(PROTO_CODE_CANCEL, NULL, buf), 4);
}

static void test_goaway_round_trip(void **state)
{
    (void)state;
    uint8_t buf[PROTO_GOAWAY_MAX];
    size_t n = proto_goaway_encode(0x87654321u, PROTO_CODE_SHUTDOWN, "bye", buf);
    assert_int_equal(n, 11);
    const uint8_t want[11] = {0x87, 0x65, 0x43, 0x21, 0, 0, 0, 11, 'b', 'y', 'e'};
    assert_memory_equal(buf, want, sizeof(want));
    struct proto_reason r;
    assert_int_equal(proto_goaway_decode(buf, n, &r), 0);
    assert_int_equal(r.last_stream, 0x87654321u);
    assert_int_equal(r.code, PROTO_CODE_SHUTDOWN);
    assert_int_equal(r.text_len, 3);
    assert_memory_equal(r.text, "bye", 3);

    assert_int_equal(proto_goaway_encode(0, PROTO_CODE_PROTOCOL, NULL, buf), 8);
    assert_int_equal(proto_goaway_decode(buf, 8, &r), 0);
    assert_int_equal(r.text_len, 0);
}

static void test_reason_malformed(void **state)
{
    (void)state;
    uint8_t buf[PROTO_GOAWAY_MAX + 8];
    struct proto_reason r;
    memset(buf, 'a', sizeof(buf));

    for (size_t n = 0; n < 4; n++)
        assert_int_equal(proto_reason_decode(buf, n, &r), PROTO_E_PAYLOAD);
    for (size_t n = 0; n < 8; n++)
        assert_int_equal(proto_goaway_decode(buf, n, &r), PROTO_E_PAYLOAD);

    /* text at and over PROTO_MAX_TEXT */
    assert_int_equal(proto_reason_decode(buf, 4 + PROTO_MAX_TEXT, &r), 0);
    assert_int_equal(proto_reason_decode(buf, 5 + PROTO_MAX_TEXT, &r), PROTO_E_PAYLOAD);
    assert_int_equal(proto_goaway_decode(buf, 8 + PROTO_MAX_TEXT, &r), 0);
    assert_int_equal(proto_goaway_decode(buf, 9 + PROTO_MAX_TEXT, &r), PROTO_E_PAYLOAD);

    /* control characters anywhere in the text */
    const uint8_t ctl[] = {0x00, 0x01, 0x09, 0x0a, 0x0d, 0x1b, 0x1f, 0x7f};
    for (size_t i = 0; i < sizeof(ctl); i++) {
        memset(buf, 'a', sizeof(buf));
        buf[4 + 2] = ctl[i];
        assert_int_equal(proto_reason_decode(buf, 4 + 5, &r), PROTO_E_PAYLOAD);
        buf[8 + 4] = ctl[i];
        assert_int_equal(proto_goaway_decode(buf, 8 + 5, &r), PROTO_E_PAYLOAD);
    }
    /* bytes 0x20, 0x7e and 0x80..0xff are fine */
    memset(buf, 'a', sizeof(buf));
    buf[4] = 0x20;
    buf[5] = 0x7e;
    buf[6] = 0x80;
    buf[7] = 0xff;
    assert_int_equal(proto_reason_decode(buf, 8, &r), 0);
}

static void test_reason_encode_sanitises(void **state)
{
    (void)state;
    char text[PROTO_MAX_TEXT + 100];
    memset(text, 'x', sizeof(text) - 1);
    text[sizeof(text) - 1] = '\0';
    text[0] = '\n';
    text[10] = '\x1b';
    text[20] = '\x7f';
    text[PROTO_MAX_TEXT - 1] = '\t';

    uint8_t buf[PROTO_GOAWAY_MAX + 64];
    memset(buf, 0xee, sizeof(buf));
    size_t n = proto_reason_encode(PROTO_CODE_INTERNAL, text, buf);
    assert_int_equal(n, PROTO_REASON_MAX);
    assert_int_equal(buf[4 + PROTO_MAX_TEXT], 0xee); /* nothing written past the limit */
    struct proto_reason r;
    assert_int_equal(proto_reason_decode(buf, n, &r), 0);
    assert_int_equal(r.text_len, PROTO_MAX_TEXT);
    assert_int_equal(r.text[0], '?');
    assert_int_equal(r.text[10], '?');
    assert_int_equal(r.text[20], '?');
    assert_int_equal(r.text[PROTO_MAX_TEXT - 1], '?');
    assert_int_equal(r.text[1], 'x');

    memset(buf, 0xee, sizeof(buf));
    n = proto_goaway_encode(9, PROTO_CODE_PROTOCOL, text, buf);
    assert_int_equal(n, PROTO_GOAWAY_MAX);
    assert_int_equal(buf[8 + PROTO_MAX_TEXT], 0xee);
    assert_int_equal(proto_goaway_decode(buf, n, &r), 0);
    assert_int_equal(r.last_stream, 9);
    assert_int_equal(r.text_len, PROTO_MAX_TEXT);
    assert_int_equal(r.text[0], '?');
}

/* ---- CREDIT ---- */

static void test_credit_round_trip(void **state)
{
    (void)state;
    const uint64_t values[] = {0,
                               1,
                               PROTO_DEFAULT_WINDOW,
                               0xffffffffull,
                               1ull << 32,
                               (1ull << 32) + 5,
                               0x0102030405060708ull,
                               UINT64_MAX - 1,
                               UINT64_MAX};
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        uint8_t buf[8];
        proto_credit_encode(values[i], buf);
        uint64_t v = 0x5555;
        assert_int_equal(proto_credit_decode(buf, 8, &v), 0);
        assert_true(v == values[i]);
    }
    uint8_t buf[9];
    proto_credit_encode(0x0102030405060708ull, buf);
    const uint8_t want[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    assert_memory_equal(buf, want, 8);
    uint64_t v;
    assert_int_equal(proto_credit_decode(buf, 7, &v), PROTO_E_LENGTH);
    assert_int_equal(proto_credit_decode(buf, 9, &v), PROTO_E_LENGTH);
    assert_int_equal(proto_credit_decode(buf, 0, &v), PROTO_E_LENGTH);
}

/* ---- the worked examples in PROTOCOL.md ---- */

static void test_spec_example_hello(void **state)
{
    (void)state;
    const uint8_t want[] = {
        0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x12, /* header */
        0x00, 0x01, 0x00, 0x01, 0x00, 0x00, /* max_frame_payload 65536 */
        0x00, 0x02, 0x00, 0x04, 0x00, 0x00, /* initial_window 262144 */
        0x00, 0x03, 0x00, 0x00, 0x04, 0x00, /* max_streams 1024 */
    };
    uint8_t buf[PROTO_HEADER_SIZE + PROTO_HELLO_SIZE];
    struct proto_hello h;
    proto_hello_default(&h);
    size_t n = proto_hello_encode(&h, buf + PROTO_HEADER_SIZE);
    proto_header_encode(buf, PROTO_HELLO, 0, 0, (uint32_t)n);
    assert_int_equal(sizeof(want), PROTO_HEADER_SIZE + n);
    assert_memory_equal(buf, want, sizeof(want));
}

static void test_spec_example_open(void **state)
{
    (void)state;
    const uint8_t want[] = {
        0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x10, /* header */
        0x01, 0x00, 0x00, 0x00,                                                 /* tcp */
        0x1f, 0x90,                                                             /* 8080 */
        0x09, '1',  '2',  '7',  '.',  '0',  '.',  '0',  '.',  '1',
    };
    struct proto_open o = {.kind = PROTO_KIND_TCP, .port = 8080};
    strcpy(o.host, "127.0.0.1");
    uint8_t buf[64];
    int n = proto_open_encode(&o, buf + PROTO_HEADER_SIZE, sizeof(buf) - PROTO_HEADER_SIZE);
    assert_int_equal(n, 16);
    proto_header_encode(buf, PROTO_OPEN, 0, 2, (uint32_t)n);
    assert_int_equal(sizeof(want), PROTO_HEADER_SIZE + (size_t)n);
    assert_memory_equal(buf, want, sizeof(want));

    struct proto_header h;
    assert_int_equal(proto_header_decode(want, sizeof(want), PROTO_DEFAULT_FRAME_PAYLOAD, &h), 0);
    assert_int_equal(h.length, 16);
}

static void test_spec_example_stream_frames(void **state)
{
    (void)state;
    uint8_t buf[64];

    /* OPEN_FAIL "connection refused" on stream 2 */
    const uint8_t open_fail[] = {0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,
                                 0x00, 0x00, 0x16, 0x00, 0x00, 0x00, 0x04, 'c',  'o',
                                 'n',  'n',  'e',  'c',  't',  'i',  'o',  'n',  ' ',
                                 'r',  'e',  'f',  'u',  's',  'e',  'd'};
    size_t n =
        proto_reason_encode(PROTO_CODE_REFUSED, "connection refused", buf + PROTO_HEADER_SIZE);
    proto_header_encode(buf, PROTO_OPEN_FAIL, 0, 2, (uint32_t)n);
    assert_int_equal(PROTO_HEADER_SIZE + n, sizeof(open_fail));
    assert_memory_equal(buf, open_fail, sizeof(open_fail));

    /* DATA "hello" with FIN on stream 2 */
    const uint8_t data[] = {0x01, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00,
                            0x00, 0x00, 0x05, 'h',  'e',  'l',  'l',  'o'};
    proto_header_encode(buf, PROTO_DATA, PROTO_FLAG_FIN, 2, 5);
    memcpy(buf + PROTO_HEADER_SIZE, "hello", 5);
    assert_memory_equal(buf, data, sizeof(data));

    /* CREDIT 393216 on stream 2 */
    const uint8_t credit[] = {0x01, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00,
                              0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00};
    proto_header_encode(buf, PROTO_CREDIT, 0, 2, 8);
    proto_credit_encode(131072 + PROTO_DEFAULT_WINDOW, buf + PROTO_HEADER_SIZE);
    assert_memory_equal(buf, credit, sizeof(credit));
}

/* ---- names ---- */

static void test_names(void **state)
{
    (void)state;
    for (int t = PROTO_HELLO; t <= PROTO_CONTROL; t++)
        assert_string_not_equal(proto_type_name(t), "UNKNOWN");
    assert_string_equal(proto_type_name(PROTO_GOAWAY), "GOAWAY");
    assert_string_equal(proto_type_name(0), "UNKNOWN");
    assert_string_equal(proto_type_name(12), "UNKNOWN");
    assert_string_equal(proto_type_name(-1), "UNKNOWN");
    for (uint32_t c = 0; c <= PROTO_CODE_MAX; c++)
        assert_string_not_equal(proto_code_name(c), "unknown error");
    assert_string_equal(proto_code_name(PROTO_CODE_MAX + 1), "unknown error");
    assert_string_equal(proto_code_name(0xffffffffu), "unknown error");
    for (int e = PROTO_E_JSON; e <= 0; e++)
        assert_string_not_equal(proto_strerror(e), "unknown error");
    assert_string_equal(proto_strerror(PROTO_E_JSON - 1), "unknown error");
}

/* ---- CONTROL ---- */

static int parse(const char *s, json_t **out)
{
    char err[256] = "";
    int rc = proto_control_parse((const uint8_t *)s, strlen(s), out, err, sizeof(err));
    if (rc < 0 && err[0] == '\0')
        fail_msg("no error text for %.200s", s);
    return rc;
}

static void expect_ok(const char *s)
{
    json_t *msg = (json_t *)0x1;
    int rc = parse(s, &msg);
    if (rc != 0)
        fail_msg("rejected (%d): %.200s", rc, s);
    assert_non_null(msg);
    assert_int_equal(proto_control_validate(msg, NULL, 0), 0);
    json_decref(msg);
}

static void expect_bad(const char *s)
{
    json_t *msg = (json_t *)0x1;
    int rc = parse(s, &msg);
    if (rc != PROTO_E_JSON)
        fail_msg("expected PROTO_E_JSON, got %d: %.200s", rc, s);
    assert_null(msg);
}

static void test_control_valid(void **state)
{
    (void)state;
    expect_ok("{\"type\":\"hello\",\"version\":\"0.1.0\",\"os\":\"linux\",\"arch\":\"amd64\","
              "\"hostname\":\"ws-1\"}");
    expect_ok("{\"type\":\"hello\",\"version\":\"0.1.0\",\"os\":\"linux\",\"arch\":\"amd64\","
              "\"hostname\":\"ws-1\",\"capabilities\":[\"ssh\",\"tcp\"]}");
    expect_ok("{\"type\":\"hello\",\"version\":\"\",\"os\":\"\",\"arch\":\"\","
              "\"hostname\":\"\",\"capabilities\":[],\"extra\":{\"x\":[1,2]}}");
    expect_ok("{\"type\":\"manifest\",\"workspace\":\"ws\"}");
    expect_ok("{\"type\":\"manifest\",\"workspace\":\"ws\",\"owner\":\"alice\","
              "\"directory\":\"/home/alice/src\",\"motd\":\"hi\",\"env\":{\"A\":\"1\",\"B\":\"\"},"
              "\"authorized_keys\":[\"ssh-ed25519 AAAA alice\"],\"stats_interval\":0}");
    expect_ok("{\"type\":\"manifest\",\"workspace\":\"ws\",\"stats_interval\":86400}");
    expect_ok("{\"type\":\"shutdown\"}");
    expect_ok("{\"type\":\"shutdown\",\"reason\":\"workspace stopped\"}");
    expect_ok("  {\"type\":\"shutdown\"}\n");
}

static void test_control_stats(void **state)
{
    (void)state;
    expect_ok("{\"type\":\"stats\",\"idle_ms\":0}");
    expect_ok("{\"type\":\"stats\",\"idle_ms\":5234,\"last_activity\":1796000000000,"
              "\"sessions\":{\"ssh\":1,\"pty\":2},\"rx_bytes\":{\"ssh\":5120},"
              "\"tx_bytes\":{\"later-kind\":9}}");
    expect_bad("{\"type\":\"stats\"}"); /* idle_ms is required */
    expect_bad("{\"type\":\"stats\",\"idle_ms\":-1}");
    expect_bad("{\"type\":\"stats\",\"idle_ms\":1.5}");
    expect_bad("{\"type\":\"stats\",\"idle_ms\":1,\"last_activity\":\"now\"}");
    expect_bad("{\"type\":\"stats\",\"idle_ms\":1,\"sessions\":[1]}");
    expect_bad("{\"type\":\"stats\",\"idle_ms\":1,\"sessions\":{\"ssh\":-1}}");
    expect_bad("{\"type\":\"stats\",\"idle_ms\":1,\"rx_bytes\":{\"\":1}}");
    expect_bad("{\"type\":\"stats\",\"idle_ms\":1,\"tx_bytes\":{\"ssh\":\"1\"}}");
    /* At most PROTO_MAX_STATS_KEYS counters. */
    char big[2048] = "{\"type\":\"stats\",\"idle_ms\":1,\"sessions\":{";
    for (unsigned i = 0; i <= PROTO_MAX_STATS_KEYS; i++)
        snprintf(big + strlen(big), sizeof(big) - strlen(big), "%s\"k%u\":1", i ? "," : "", i);
    strcat(big, "}}");
    expect_bad(big);
}

static void test_control_ports(void **state)
{
    (void)state;
    expect_ok("{\"type\":\"ports\",\"ports\":[]}");
    expect_ok("{\"type\":\"ports\",\"ports\":[{\"port\":8080,\"family\":\"ipv4\","
              "\"address\":\"0.0.0.0\",\"process\":\"node\"}],\"available\":true}");
    expect_bad("{\"type\":\"ports\"}");
    expect_bad(
        "{\"type\":\"ports\",\"ports\":[{\"port\":0,\"family\":\"ipv4\",\"address\":\"x\"}]}");
    expect_bad(
        "{\"type\":\"ports\",\"ports\":[{\"port\":65536,\"family\":\"ipv4\",\"address\":\"x\"}]}");
    expect_bad("{\"type\":\"ports\",\"ports\":[{\"port\":1,\"address\":\"x\"}]}");
    expect_bad("{\"type\":\"ports\",\"ports\":[7]}");
    expect_bad("{\"type\":\"ports\",\"ports\":[],\"available\":1}");
}

static void test_control_unknown_type_accepted(void **state)
{
    (void)state;
    expect_ok("{\"type\":\"log\",\"cpu\":0.5}"); /* not "logs" */
    expect_ok("{\"type\":\"future-thing\",\"version\":42,\"hostname\":[]}");
    expect_ok("{\"type\":\"\"}");
    expect_ok("{\"type\":\"Hello\"}"); /* type names are case sensitive */
}

static void test_control_not_object(void **state)
{
    (void)state;
    expect_bad("[]");
    expect_bad("[{\"type\":\"shutdown\"}]");
    expect_bad("\"shutdown\"");
    expect_bad("42");
    expect_bad("null");
    expect_bad("true");
}

static void test_control_type_field(void **state)
{
    (void)state;
    expect_bad("{}");
    expect_bad("{\"Type\":\"shutdown\"}");
    expect_bad("{\"type\":1}");
    expect_bad("{\"type\":null}");
    expect_bad("{\"type\":[\"shutdown\"]}");
    expect_bad("{\"type\":{}}");
}

static void test_control_duplicate_keys(void **state)
{
    (void)state;
    expect_bad("{\"type\":\"shutdown\",\"type\":\"shutdown\"}");
    expect_bad("{\"type\":\"shutdown\",\"reason\":\"a\",\"reason\":\"b\"}");
    expect_bad("{\"type\":\"x\",\"o\":{\"a\":1,\"a\":2}}");
}

static void test_control_wrong_field_types(void **state)
{
    (void)state;
    /* hello: every string member is required */
    expect_bad("{\"type\":\"hello\",\"os\":\"linux\",\"arch\":\"amd64\",\"hostname\":\"h\"}");
    expect_bad("{\"type\":\"hello\",\"version\":\"1\",\"arch\":\"amd64\",\"hostname\":\"h\"}");
    expect_bad("{\"type\":\"hello\",\"version\":\"1\",\"os\":\"linux\",\"hostname\":\"h\"}");
    expect_bad("{\"type\":\"hello\",\"version\":\"1\",\"os\":\"linux\",\"arch\":\"amd64\"}");
    expect_bad("{\"type\":\"hello\",\"version\":1,\"os\":\"linux\",\"arch\":\"amd64\","
               "\"hostname\":\"h\"}");
    expect_bad("{\"type\":\"hello\",\"version\":\"1\",\"os\":\"linux\",\"arch\":\"amd64\","
               "\"hostname\":null}");
    expect_bad("{\"type\":\"hello\",\"version\":\"1\",\"os\":\"linux\",\"arch\":\"amd64\","
               "\"hostname\":\"h\",\"capabilities\":\"ssh\"}");
    expect_bad("{\"type\":\"hello\",\"version\":\"1\",\"os\":\"linux\",\"arch\":\"amd64\","
               "\"hostname\":\"h\",\"capabilities\":[\"ssh\",1]}");
    /* manifest */
    expect_bad("{\"type\":\"manifest\"}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":7}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"owner\":7}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"directory\":[]}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"motd\":false}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"env\":[\"A=1\"]}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"env\":{\"A\":1}}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"env\":{\"A\":null}}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"authorized_keys\":\"k\"}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"authorized_keys\":[{}]}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"stats_interval\":-1}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"stats_interval\":86401}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"stats_interval\":1.5}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"stats_interval\":\"60\"}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"stats_interval\":null}");
    /* shutdown */
    expect_bad("{\"type\":\"shutdown\",\"reason\":1}");
    expect_bad("{\"type\":\"shutdown\",\"reason\":null}");
}

/* Formats fmt (one %s) with a string of n 'a's. The caller frees the result. */
static char *with_long_string(const char *fmt, size_t n)
{
    char *s = malloc(n + 1);
    assert_non_null(s);
    memset(s, 'a', n);
    s[n] = '\0';
    size_t cap = n + strlen(fmt) + 1;
    char *out = malloc(cap);
    assert_non_null(out);
    snprintf(out, cap, fmt, s);
    free(s);
    return out;
}

/* Every string of a known message, wherever it sits, is at most 4096 bytes. */
static void test_control_string_limits(void **state)
{
    (void)state;
    const char *fmts[] = {
        "{\"type\":\"manifest\",\"workspace\":\"%s\"}",
        "{\"type\":\"manifest\",\"workspace\":\"w\",\"owner\":\"%s\"}",
        "{\"type\":\"manifest\",\"workspace\":\"w\",\"directory\":\"%s\"}",
        "{\"type\":\"manifest\",\"workspace\":\"w\",\"motd\":\"%s\"}",
        "{\"type\":\"manifest\",\"workspace\":\"w\",\"authorized_keys\":[\"k\",\"%s\"]}",
        "{\"type\":\"manifest\",\"workspace\":\"w\",\"env\":{\"K\":\"%s\"}}",
        "{\"type\":\"manifest\",\"workspace\":\"w\",\"env\":{\"%s\":\"v\"}}",
        "{\"type\":\"hello\",\"version\":\"%s\",\"os\":\"l\",\"arch\":\"a\",\"hostname\":\"h\"}",
        "{\"type\":\"hello\",\"version\":\"1\",\"os\":\"%s\",\"arch\":\"a\",\"hostname\":\"h\"}",
        "{\"type\":\"hello\",\"version\":\"1\",\"os\":\"l\",\"arch\":\"%s\",\"hostname\":\"h\"}",
        "{\"type\":\"hello\",\"version\":\"1\",\"os\":\"l\",\"arch\":\"a\",\"hostname\":\"%s\"}",
        ("{\"type\":\"hello\",\"version\":\"1\",\"os\":\"l\",\"arch\":\"a\",\"hostname\":\"h\","
         "\"capabilities\":[\"%s\"]}"),
        "{\"type\":\"shutdown\",\"reason\":\"%s\"}",
    };
    for (size_t i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
        char *ok = with_long_string(fmts[i], 4096);
        char *bad = with_long_string(fmts[i], 4097);
        expect_ok(ok);
        expect_bad(bad);
        free(ok);
        free(bad);
    }
    /* Unknown types and unknown members are not limited (only the 1 MiB total is). */
    char *s = with_long_string("{\"type\":\"x\",\"blob\":\"%s\"}", 100000);
    expect_ok(s);
    free(s);

    /* Lengths are in bytes: 2049 two-byte characters are too many. */
    size_t n = 2049;
    s = malloc(n * 2 + 64);
    assert_non_null(s);
    strcpy(s, "{\"type\":\"shutdown\",\"reason\":\"");
    size_t k = strlen(s);
    for (size_t i = 0; i < n; i++) {
        s[k++] = '\xc3';
        s[k++] = '\xa9';
    }
    strcpy(s + k, "\"}");
    expect_bad(s);
    free(s);
}

static void test_control_invalid_json(void **state)
{
    (void)state;
    expect_bad("{");
    expect_bad("{\"type\":\"shutdown\"");
    expect_bad("{\"type\":\"shutdown\",}");
    expect_bad("{'type':'shutdown'}");
    expect_bad("{\"type\":\"shutdown\"} {}");
    expect_bad("{\"type\":\"shutdown\"}x");
    expect_bad("{\"type\":\"shut\\u0000down\"}");      /* NUL inside a string */
    expect_bad("{\"type\":\"\xff\xfe\"}");             /* not UTF-8 */
    expect_bad("{\"type\":\"shutdown\",\"n\":1e999}"); /* real overflow */
    expect_bad("\xef\xbb\xbf{\"type\":\"shutdown\"}"); /* BOM */

    /* A NUL byte after a valid object is trailing garbage, not an end marker. */
    const char s[] = "{\"type\":\"shutdown\"}\0";
    json_t *msg;
    assert_int_equal(proto_control_parse((const uint8_t *)s, sizeof(s) - 1, &msg, NULL, 0),
                     PROTO_E_JSON);
    assert_null(msg);
}

static void test_control_size_limit(void **state)
{
    (void)state;
    /* Over the limit: PROTO_E_LENGTH before parsing (this is not even JSON). */
    size_t n = PROTO_MAX_CONTROL + 1;
    uint8_t *big = malloc(n);
    assert_non_null(big);
    memset(big, '[', n);
    json_t *msg = (json_t *)0x1;
    char err[128] = "";
    assert_int_equal(proto_control_parse(big, n, &msg, err, sizeof(err)), PROTO_E_LENGTH);
    assert_null(msg);
    assert_true(err[0] != '\0');
    assert_int_equal(proto_control_parse(big, 0, &msg, err, sizeof(err)), PROTO_E_LENGTH);

    /* Exactly at the limit: a valid message of an unknown type with many small strings. */
    n = PROTO_MAX_CONTROL;
    const char *head = "{\"type\":\"x\",\"pad\":[";
    size_t k = strlen(head);
    memcpy(big, head, k);
    while (k + 2 + 4 < n) {
        memcpy(big + k, "\"\",", 3);
        k += 3;
    }
    /* close with a final string sized to land exactly on n: "...."]} */
    size_t rest = n - k - 2; /* bytes for the last string, quotes included */
    assert_true(rest >= 2);
    big[k++] = '"';
    memset(big + k, 'a', rest - 2);
    k += rest - 2;
    big[k++] = '"';
    big[k++] = ']';
    big[k++] = '}';
    assert_int_equal(k, n);
    assert_int_equal(proto_control_parse(big, n, &msg, NULL, 0), 0);
    assert_non_null(msg);
    json_decref(msg);
    free(big);
}

static void test_control_deep_nesting(void **state)
{
    (void)state;
    size_t n = 100000;
    uint8_t *p = malloc(n + 16);
    assert_non_null(p);
    json_t *msg = (json_t *)0x1;

    memset(p, '[', n);
    assert_int_equal(proto_control_parse(p, n, &msg, NULL, 0), PROTO_E_JSON);
    assert_null(msg);

    /* Inside an object, as a member of a message of unknown type. */
    const char *head = "{\"type\":\"x\",\"a\":";
    size_t k = strlen(head);
    memcpy(p, head, k);
    for (size_t i = k; i + 4 < n; i += 5)
        memcpy(p + i, "{\"a\":", 5);
    assert_int_equal(proto_control_parse(p, n, &msg, NULL, 0), PROTO_E_JSON);
    assert_null(msg);
    free(p);

    /* PROTOCOL.md: nesting up to 2048 levels (the object included) parses, 2049 does not. */
    for (int depth = 2048; depth <= 2049; depth++) {
        char *s = malloc(2 * (size_t)depth + 32);
        if (!s) /* not only assert_non_null: GCC must see it is not NULL */
            abort();
        int k = sprintf(s, "{\"type\":\"x\",\"a\":");
        for (int i = 1; i < depth; i++)
            s[k++] = '[';
        for (int i = 1; i < depth; i++)
            s[k++] = ']';
        s[k++] = '}';
        s[k] = '\0';
        if (depth == 2048)
            expect_ok(s);
        else
            expect_bad(s);
        free(s);
    }

    /* Modest nesting is fine. */
    expect_ok("{\"type\":\"x\",\"a\":[[[[[[[[[[{\"b\":{}}]]]]]]]]]]}");
}

/* Formats fmt (one %s) with s. The caller frees the result. */
static char *fmt1(const char *fmt, const char *s)
{
    size_t cap = strlen(fmt) + strlen(s) + 1;
    char *out = malloc(cap);
    assert_non_null(out);
    snprintf(out, cap, fmt, s);
    return out;
}

static void expect_ok_with(const char *fmt, const char *s)
{
    char *m = fmt1(fmt, s);
    expect_ok(m);
    free(m);
}

static void expect_bad_with(const char *fmt, const char *s)
{
    char *m = fmt1(fmt, s);
    expect_bad(m);
    free(m);
}

/* n copies of item (one %u: the index), comma-separated. The caller frees the result. */
static char *repeat(const char *item, unsigned n)
{
    size_t cap = (strlen(item) + 16) * (n + 1);
    char *out = malloc(cap);
    assert_non_null(out);
    out[0] = '\0';
    for (unsigned i = 0; i < n; i++) {
        size_t k = strlen(out);
        if (i)
            out[k++] = ',';
        snprintf(out + k, cap - k, item, i);
    }
    return out;
}

#define MANIFEST_SCRIPTS "{\"type\":\"manifest\",\"workspace\":\"w\",\"scripts\":[%s]}"
#define MANIFEST_METADATA "{\"type\":\"manifest\",\"workspace\":\"w\",\"metadata\":[%s]}"

static void test_control_manifest_scripts(void **state)
{
    (void)state;
    expect_ok_with(MANIFEST_SCRIPTS, "");
    expect_ok_with(MANIFEST_SCRIPTS, "{\"name\":\"build\",\"script\":\"make -j8\","
                                     "\"run_on\":\"start\",\"timeout\":300,\"blocks_login\":true}");
    expect_ok_with(MANIFEST_SCRIPTS, "{\"name\":\"a.B_9-z\",\"script\":\"x\",\"run_on\":\"stop\","
                                     "\"timeout\":86400,\"blocks_login\":false,\"later\":1}");
    expect_ok_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"start\","
                                     "\"timeout\":1},{\"name\":\"a\",\"script\":\"y\","
                                     "\"run_on\":\"stop\"}");
    /* the array itself */
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"scripts\":{}}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"scripts\":null}");
    expect_bad_with(MANIFEST_SCRIPTS, "\"make\"");
    /* required members */
    expect_bad_with(MANIFEST_SCRIPTS, "{\"script\":\"x\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"script\":\"x\"}");
    /* name: 1..64 bytes of A-Za-z0-9._- */
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"\",\"script\":\"x\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a b\",\"script\":\"x\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a/b\",\"script\":\"x\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a:b\",\"script\":\"x\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"caf\xc3\xa9\",\"script\":\"x\","
                                      "\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":7,\"script\":\"x\",\"run_on\":\"start\"}");
    char name[80];
    memset(name, 'n', 64);
    name[64] = '\0';
    char item[6000];
    snprintf(item, sizeof(item), "{\"name\":\"%s\",\"script\":\"x\",\"run_on\":\"start\"}", name);
    expect_ok_with(MANIFEST_SCRIPTS, item);
    snprintf(item, sizeof(item), "{\"name\":\"%sn\",\"script\":\"x\",\"run_on\":\"start\"}", name);
    expect_bad_with(MANIFEST_SCRIPTS, item);
    /* script: 1..4096 bytes */
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"script\":\"\",\"run_on\":\"start\"}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":[\"make\"],\"run_on\":\"start\"}");
    char *text = malloc(4098);
    assert_non_null(text);
    memset(text, 'x', 4097);
    text[4096] = '\0';
    snprintf(item, sizeof(item), "{\"name\":\"a\",\"script\":\"%s\",\"run_on\":\"start\"}", text);
    expect_ok_with(MANIFEST_SCRIPTS, item);
    text[4096] = 'x';
    text[4097] = '\0';
    snprintf(item, sizeof(item), "{\"name\":\"a\",\"script\":\"%s\",\"run_on\":\"start\"}", text);
    expect_bad_with(MANIFEST_SCRIPTS, item);
    free(text);
    /* run_on, timeout, blocks_login */
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"Start\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"\"}");
    expect_bad_with(MANIFEST_SCRIPTS, "{\"name\":\"a\",\"script\":\"x\",\"run_on\":1}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"start\",\"timeout\":0}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"start\",\"timeout\":86401}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"start\",\"timeout\":1.5}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"start\",\"timeout\":\"5m\"}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"start\",\"blocks_login\":1}");
    expect_bad_with(MANIFEST_SCRIPTS,
                    "{\"name\":\"a\",\"script\":\"x\",\"run_on\":\"stop\",\"blocks_login\":true}");
    /* at most PROTO_MAX_SCRIPTS */
    char *many =
        repeat("{\"name\":\"s%u\",\"script\":\"x\",\"run_on\":\"start\"}", PROTO_MAX_SCRIPTS);
    expect_ok_with(MANIFEST_SCRIPTS, many);
    free(many);
    many =
        repeat("{\"name\":\"s%u\",\"script\":\"x\",\"run_on\":\"start\"}", PROTO_MAX_SCRIPTS + 1);
    expect_bad_with(MANIFEST_SCRIPTS, many);
    free(many);

    /* A NUL in a built message's script would cut the shell text: refused. */
    json_t *m = json_pack("{s:s, s:s, s:[{s:s, s:s%, s:s}]}", "type", "manifest", "workspace", "w",
                          "scripts", "name", "a", "script", "ls\0rm", (size_t)5, "run_on", "start");
    assert_non_null(m);
    char err[256] = "";
    assert_int_equal(proto_control_validate(m, err, sizeof(err)), PROTO_E_JSON);
    assert_non_null(strstr(err, "scripts"));
    json_decref(m);
}

static void test_control_manifest_metadata(void **state)
{
    (void)state;
    expect_ok_with(MANIFEST_METADATA, "");
    expect_ok_with(MANIFEST_METADATA, "{\"key\":\"load\",\"script\":\"cat /proc/loadavg\","
                                      "\"interval\":10,\"timeout\":5}");
    expect_ok_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\",\"interval\":86400,"
                                      "\"timeout\":3600},{\"key\":\"b\",\"script\":\"y\","
                                      "\"interval\":1,\"timeout\":1}");
    expect_bad("{\"type\":\"manifest\",\"workspace\":\"w\",\"metadata\":{\"a\":\"x\"}}");
    expect_bad_with(MANIFEST_METADATA, "{\"script\":\"x\"}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\"}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"\",\"script\":\"x\"}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a=b\",\"script\":\"x\"}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"\"}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\",\"interval\":0}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\",\"interval\":86401}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\",\"timeout\":0}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\",\"timeout\":3601}");
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\",\"timeout\":true}");
    /* keys are unique (case matters) */
    expect_bad_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\"},{\"key\":\"b\","
                                       "\"script\":\"y\"},{\"key\":\"a\",\"script\":\"z\"}");
    expect_ok_with(MANIFEST_METADATA, "{\"key\":\"a\",\"script\":\"x\"},{\"key\":\"A\","
                                      "\"script\":\"y\"}");
    char *many = repeat("{\"key\":\"k%u\",\"script\":\"x\"}", PROTO_MAX_METADATA);
    expect_ok_with(MANIFEST_METADATA, many);
    free(many);
    many = repeat("{\"key\":\"k%u\",\"script\":\"x\"}", PROTO_MAX_METADATA + 1);
    expect_bad_with(MANIFEST_METADATA, many);
    free(many);
}

static void test_control_lifecycle(void **state)
{
    (void)state;
    const char *const *names = proto_lifecycle_states();
    int n = 0;
    for (; names[n]; n++) {
        char m[128];
        snprintf(m, sizeof(m), "{\"type\":\"lifecycle\",\"state\":\"%s\",\"changed_at\":0}",
                 names[n]);
        expect_ok(m);
        assert_int_equal(proto_lifecycle_state(names[n]), n);
        assert_string_equal(proto_lifecycle_name(n), names[n]);
    }
    assert_int_equal(n, PROTO_LC_COUNT);
    assert_string_equal(names[PROTO_LC_CREATED], "created");
    assert_string_equal(names[PROTO_LC_STARTING], "starting");
    assert_string_equal(names[PROTO_LC_READY], "ready");
    assert_string_equal(names[PROTO_LC_START_ERROR], "start_error");
    assert_string_equal(names[PROTO_LC_START_TIMEOUT], "start_timeout");
    assert_string_equal(names[PROTO_LC_SHUTTING_DOWN], "shutting_down");
    assert_string_equal(names[PROTO_LC_SHUTDOWN_ERROR], "shutdown_error");
    assert_string_equal(names[PROTO_LC_SHUTDOWN_TIMEOUT], "shutdown_timeout");
    assert_string_equal(names[PROTO_LC_OFF], "off");
    assert_int_equal(proto_lifecycle_state("Ready"), -1);
    assert_int_equal(proto_lifecycle_state(""), -1);
    assert_int_equal(proto_lifecycle_state(NULL), -1);
    assert_null(proto_lifecycle_name(-1));
    assert_null(proto_lifecycle_name(PROTO_LC_COUNT));

    /* the partial order: created < starting < {ready, start_*} < shutting_down < ... < off */
    assert_true(proto_lifecycle_rank(PROTO_LC_CREATED) < proto_lifecycle_rank(PROTO_LC_STARTING));
    assert_int_equal(proto_lifecycle_rank(PROTO_LC_READY),
                     proto_lifecycle_rank(PROTO_LC_START_ERROR));
    assert_int_equal(proto_lifecycle_rank(PROTO_LC_READY),
                     proto_lifecycle_rank(PROTO_LC_START_TIMEOUT));
    assert_true(proto_lifecycle_rank(PROTO_LC_STARTING) < proto_lifecycle_rank(PROTO_LC_READY));
    assert_true(proto_lifecycle_rank(PROTO_LC_START_TIMEOUT) <
                proto_lifecycle_rank(PROTO_LC_SHUTTING_DOWN));
    assert_int_equal(proto_lifecycle_rank(PROTO_LC_SHUTDOWN_ERROR),
                     proto_lifecycle_rank(PROTO_LC_SHUTDOWN_TIMEOUT));
    assert_true(proto_lifecycle_rank(PROTO_LC_SHUTTING_DOWN) <
                proto_lifecycle_rank(PROTO_LC_SHUTDOWN_ERROR));
    assert_true(proto_lifecycle_rank(PROTO_LC_SHUTDOWN_TIMEOUT) <
                proto_lifecycle_rank(PROTO_LC_OFF));
    assert_int_equal(proto_lifecycle_rank(PROTO_LC_COUNT), -1);
    assert_int_equal(proto_lifecycle_rank(-1), -1);

    expect_ok("{\"type\":\"lifecycle\",\"state\":\"ready\",\"changed_at\":1796000000000}");
    expect_ok("{\"type\":\"lifecycle\",\"state\":\"off\",\"changed_at\":9223372036854775807,"
              "\"later\":[]}");
    expect_bad("{\"type\":\"lifecycle\",\"changed_at\":1}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"ready\"}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"running\",\"changed_at\":1}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"READY\",\"changed_at\":1}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"ready \",\"changed_at\":1}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":2,\"changed_at\":1}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"ready\",\"changed_at\":-1}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"ready\",\"changed_at\":1.0}");
    expect_bad("{\"type\":\"lifecycle\",\"state\":\"ready\",\"changed_at\":\"1\"}");

    /* a built message with a NUL inside the state name */
    json_t *m = json_pack("{s:s, s:s%, s:i}", "type", "lifecycle", "state", "ready\0x", (size_t)7,
                          "changed_at", 1);
    assert_non_null(m);
    assert_int_equal(proto_control_validate(m, NULL, 0), PROTO_E_JSON);
    json_decref(m);
}

static void test_control_logs(void **state)
{
    (void)state;
    /* the schema only: what "data" holds is logbatch_decode's business */
    expect_ok("{\"type\":\"logs\",\"seq\":1,\"lines\":1,\"data\":\"eJwDAAAAAAE=\"}");
    expect_ok("{\"type\":\"logs\",\"seq\":9223372036854775807,\"lines\":65536,\"data\":\"\"}");
    expect_ok("{\"type\":\"logs\",\"seq\":7,\"lines\":123,\"data\":\"not base64 at all\"}");
    expect_bad("{\"type\":\"logs\",\"lines\":1,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"lines\":1}");
    expect_bad("{\"type\":\"logs\",\"seq\":0,\"lines\":1,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":-1,\"lines\":1,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1.0,\"lines\":1,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"lines\":0,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"lines\":65537,\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"lines\":\"1\",\"data\":\"\"}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"lines\":1,\"data\":[]}");
    expect_bad("{\"type\":\"logs\",\"seq\":1,\"lines\":1,\"data\":null}");
    /* "data" is not held to the 4096-byte string limit (a batch is up to ~85 KiB of it) */
    char *s = with_long_string("{\"type\":\"logs\",\"seq\":1,\"lines\":1,\"data\":\"%s\"}", 100000);
    expect_ok(s);
    free(s);
}

#define METADATA_MSG "{\"type\":\"metadata\",\"items\":[%s]}"

static void test_control_metadata(void **state)
{
    (void)state;
    expect_ok_with(METADATA_MSG, "{\"key\":\"load\",\"value\":\"0.1 0.2 0.3\",\"error\":\"\","
                                 "\"collected_at\":1796000000000}");
    expect_ok_with(METADATA_MSG, "{\"key\":\"a\",\"value\":\"\",\"error\":\"exit status 3\","
                                 "\"collected_at\":0},{\"key\":\"b\",\"value\":\"x\","
                                 "\"error\":\"\",\"collected_at\":5,\"later\":1}");
    expect_bad("{\"type\":\"metadata\"}");
    expect_bad_with(METADATA_MSG, ""); /* at least one item */
    expect_bad("{\"type\":\"metadata\",\"items\":{}}");
    expect_bad_with(METADATA_MSG, "\"load\"");
    /* every member is required */
    expect_bad_with(METADATA_MSG, "{\"value\":\"\",\"error\":\"\",\"collected_at\":0}");
    expect_bad_with(METADATA_MSG, "{\"key\":\"a\",\"error\":\"\",\"collected_at\":0}");
    expect_bad_with(METADATA_MSG, "{\"key\":\"a\",\"value\":\"\",\"collected_at\":0}");
    expect_bad_with(METADATA_MSG, "{\"key\":\"a\",\"value\":\"\",\"error\":\"\"}");
    /* types and ranges */
    expect_bad_with(METADATA_MSG,
                    "{\"key\":\"a b\",\"value\":\"\",\"error\":\"\",\"collected_at\":0}");
    expect_bad_with(METADATA_MSG, "{\"key\":\"a\",\"value\":1,\"error\":\"\",\"collected_at\":0}");
    expect_bad_with(METADATA_MSG,
                    "{\"key\":\"a\",\"value\":\"\",\"error\":null,\"collected_at\":0}");
    expect_bad_with(METADATA_MSG,
                    "{\"key\":\"a\",\"value\":\"\",\"error\":\"\",\"collected_at\":-1}");
    expect_bad_with(METADATA_MSG,
                    "{\"key\":\"a\",\"value\":\"\",\"error\":\"\",\"collected_at\":1.5}");
    expect_bad_with(METADATA_MSG, "{\"key\":\"a\",\"value\":\"\",\"error\":\"\","
                                  "\"collected_at\":0},{\"key\":\"a\",\"value\":\"\","
                                  "\"error\":\"\",\"collected_at\":0}");
    /* value up to PROTO_MAX_METADATA_VALUE bytes, error up to 4096 */
    const char *vfmt =
        "{\"type\":\"metadata\",\"items\":[{\"key\":\"a\",\"value\":\"%s\",\"error\":\"\","
        "\"collected_at\":0}]}";
    const char *efmt =
        "{\"type\":\"metadata\",\"items\":[{\"key\":\"a\",\"value\":\"\",\"error\":\"%s\","
        "\"collected_at\":0}]}";
    char *s = with_long_string(vfmt, PROTO_MAX_METADATA_VALUE);
    expect_ok(s);
    free(s);
    s = with_long_string(vfmt, PROTO_MAX_METADATA_VALUE + 1);
    expect_bad(s);
    free(s);
    s = with_long_string(efmt, PROTO_MAX_METADATA_ERROR);
    expect_ok(s);
    free(s);
    s = with_long_string(efmt, PROTO_MAX_METADATA_ERROR + 1);
    expect_bad(s);
    free(s);
    /* at most PROTO_MAX_METADATA items */
    char *many = repeat("{\"key\":\"k%u\",\"value\":\"v\",\"error\":\"\",\"collected_at\":1}",
                        PROTO_MAX_METADATA);
    expect_ok_with(METADATA_MSG, many);
    free(many);
    many = repeat("{\"key\":\"k%u\",\"value\":\"v\",\"error\":\"\",\"collected_at\":1}",
                  PROTO_MAX_METADATA + 1);
    expect_bad_with(METADATA_MSG, many);
    free(many);
}

#define PORTS_FWD "{\"type\":\"ports\",\"ports\":[],\"forward_ports\":[%s]}"

static void test_control_forward_ports(void **state)
{
    (void)state;
    expect_ok_with(PORTS_FWD, "");
    expect_ok_with(PORTS_FWD, "{\"port\":3000},{\"port\":5432,\"host\":\"db\"},"
                              "{\"port\":65535,\"host\":\"a.b-c_d:1\",\"label\":\"x\"}");
    expect_bad("{\"type\":\"ports\",\"ports\":[],\"forward_ports\":{}}");
    expect_bad("{\"type\":\"ports\",\"ports\":[],\"forward_ports\":[3000]}");
    expect_bad("{\"type\":\"ports\",\"ports\":[],\"forward_ports\":null}");
    expect_bad_with(PORTS_FWD, "{\"host\":\"db\"}");
    expect_bad_with(PORTS_FWD, "{\"port\":0}");
    expect_bad_with(PORTS_FWD, "{\"port\":65536}");
    expect_bad_with(PORTS_FWD, "{\"port\":\"3000\"}");
    expect_bad_with(PORTS_FWD, "{\"port\":1,\"host\":\"\"}");
    expect_bad_with(PORTS_FWD, "{\"port\":1,\"host\":7}");
    const char *hfmt = "{\"type\":\"ports\",\"ports\":[],\"forward_ports\":[{\"port\":1,"
                       "\"host\":\"%s\"}]}";
    char *s = with_long_string(hfmt, PROTO_MAX_HOST);
    expect_ok(s);
    free(s);
    s = with_long_string(hfmt, PROTO_MAX_HOST + 1);
    expect_bad(s);
    free(s);
    char *many = repeat("{\"port\":1%u}", PROTO_MAX_FORWARD_PORTS);
    expect_ok_with(PORTS_FWD, many);
    free(many);
    many = repeat("{\"port\":1%u}", PROTO_MAX_FORWARD_PORTS + 1);
    expect_bad_with(PORTS_FWD, many);
    free(many);
}

/* Error texts say where the fault is. */
static void test_control_new_errors(void **state)
{
    (void)state;
    const char *s = "{\"type\":\"manifest\",\"workspace\":\"w\",\"scripts\":[{\"name\":\"a\","
                    "\"script\":\"x\",\"run_on\":\"start\"},{\"name\":\"b\",\"script\":\"x\","
                    "\"run_on\":\"later\"}]}";
    json_t *msg;
    char err[256] = "";
    assert_int_equal(proto_control_parse((const uint8_t *)s, strlen(s), &msg, err, sizeof(err)),
                     PROTO_E_JSON);
    assert_non_null(strstr(err, "\"scripts\"[1]"));
    assert_non_null(strstr(err, "run_on"));
    s = "{\"type\":\"metadata\",\"items\":[{\"key\":\"a\",\"value\":\"\",\"error\":\"\","
        "\"collected_at\":0},{\"key\":\"a\",\"value\":\"\",\"error\":\"\",\"collected_at\":0}]}";
    assert_int_equal(proto_control_parse((const uint8_t *)s, strlen(s), &msg, err, sizeof(err)),
                     PROTO_E_JSON);
    assert_non_null(strstr(err, "twice"));
}

static void test_control_validate_built(void **state)
{
    (void)state;
    json_t *m =
        json_pack("{s:s, s:s, s:{s:s}, s:[s], s:i}", "type", "manifest", "workspace", "w", "env",
                  "HOME", "/home/w", "authorized_keys", "ssh-ed25519 AAAA", "stats_interval", 30);
    assert_non_null(m);
    assert_int_equal(proto_control_validate(m, NULL, 0), 0);
    char err[128] = "";
    json_object_set_new(m, "stats_interval", json_integer(-5));
    assert_int_equal(proto_control_validate(m, err, sizeof(err)), PROTO_E_JSON);
    assert_non_null(strstr(err, "stats_interval"));
    json_decref(m);

    json_t *arr = json_array();
    assert_int_equal(proto_control_validate(arr, NULL, 0), PROTO_E_JSON);
    json_decref(arr);

    /* An error text that does not fit is truncated, not overrun. */
    json_t *h = json_pack("{s:s}", "type", "hello");
    char tiny[4];
    memset(tiny, 'z', sizeof(tiny));
    assert_int_equal(proto_control_validate(h, tiny, sizeof(tiny)), PROTO_E_JSON);
    assert_int_equal(tiny[3], '\0');
    json_decref(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_round_trip),
        cmocka_unit_test(test_header_byte_order),
        cmocka_unit_test(test_header_short),
        cmocka_unit_test(test_header_bad_version),
        cmocka_unit_test(test_header_unknown_type),
        cmocka_unit_test(test_header_flags),
        cmocka_unit_test(test_header_stream_zero),
        cmocka_unit_test(test_header_lengths),
        cmocka_unit_test(test_header_data_limit_follows_max_data),
        cmocka_unit_test(test_hello_round_trip),
        cmocka_unit_test(test_hello_defaults),
        cmocka_unit_test(test_hello_ranges),
        cmocka_unit_test(test_hello_unknown_settings_ignored),
        cmocka_unit_test(test_hello_repeated_setting_last_wins),
        cmocka_unit_test(test_hello_bad_length),
        cmocka_unit_test(test_open_tcp_round_trip),
        cmocka_unit_test(test_open_tcp_max_port_and_host),
        cmocka_unit_test(test_open_ssh_round_trip),
        cmocka_unit_test(test_open_tcp_malformed),
        cmocka_unit_test(test_open_tcp_host_chars),
        cmocka_unit_test(test_open_encode_rejects),
        cmocka_unit_test(test_open_unknown_kind),
        cmocka_unit_test(test_open_pty_roundtrip),
        cmocka_unit_test(test_open_pty_malformed),
        cmocka_unit_test(test_ptyrec),
        cmocka_unit_test(test_open_ssh_trailing),
        cmocka_unit_test(test_reason_round_trip),
        cmocka_unit_test(test_goaway_round_trip),
        cmocka_unit_test(test_reason_malformed),
        cmocka_unit_test(test_reason_encode_sanitises),
        cmocka_unit_test(test_credit_round_trip),
        cmocka_unit_test(test_spec_example_hello),
        cmocka_unit_test(test_spec_example_open),
        cmocka_unit_test(test_spec_example_stream_frames),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_control_valid),
        cmocka_unit_test(test_control_stats),
        cmocka_unit_test(test_control_ports),
        cmocka_unit_test(test_control_unknown_type_accepted),
        cmocka_unit_test(test_control_not_object),
        cmocka_unit_test(test_control_type_field),
        cmocka_unit_test(test_control_duplicate_keys),
        cmocka_unit_test(test_control_wrong_field_types),
        cmocka_unit_test(test_control_string_limits),
        cmocka_unit_test(test_control_invalid_json),
        cmocka_unit_test(test_control_size_limit),
        cmocka_unit_test(test_control_deep_nesting),
        cmocka_unit_test(test_control_validate_built),
        cmocka_unit_test(test_control_manifest_scripts),
        cmocka_unit_test(test_control_manifest_metadata),
        cmocka_unit_test(test_control_lifecycle),
        cmocka_unit_test(test_control_logs),
        cmocka_unit_test(test_control_metadata),
        cmocka_unit_test(test_control_forward_ports),
        cmocka_unit_test(test_control_new_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
