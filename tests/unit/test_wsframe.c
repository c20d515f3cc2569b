/* wsframe: the client-side RFC 6455 codec. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tunnel/wsframe.h"

/* What the parser delivered: message bytes, message ends, and control frames. */
struct seen {
    uint8_t data[1 << 20];
    size_t len;
    int finals;
    bool binary;
    uint8_t control_op;
    uint8_t control[WSFRAME_MAX_CONTROL];
    size_t control_len;
    int controls;
    size_t empty_finals;
};

static int on_data(void *ud, const uint8_t *p, size_t len, bool binary, bool final)
{
    struct seen *s = ud;
    memcpy(s->data + s->len, p, len);
    s->len += len;
    s->binary = binary;
    if (final) {
        s->finals++;
        if (len == 0)
            s->empty_finals++;
    }
    return 0;
}

static int on_control(void *ud, uint8_t op, const uint8_t *p, size_t len)
{
    struct seen *s = ud;
    s->control_op = op;
    memcpy(s->control, p, len);
    s->control_len = len;
    s->controls++;
    return 0;
}

static const struct wsframe_events ev = {on_data, on_control};

/* A server frame (unmasked) into out; returns its size. */
static size_t server_frame(uint8_t *out, uint8_t b0, const uint8_t *payload, uint64_t len)
{
    size_t n = 0;
    out[n++] = b0;
    if (len < 126) {
        out[n++] = (uint8_t)len;
    } else if (len <= 0xffff) {
        out[n++] = 126;
        out[n++] = (uint8_t)(len >> 8);
        out[n++] = (uint8_t)len;
    } else {
        out[n++] = 127;
        for (int i = 0; i < 8; i++)
            out[n++] = (uint8_t)(len >> (56 - 8 * i));
    }
    if (payload)
        memcpy(out + n, payload, (size_t)len);
    return n + (size_t)len;
}

static struct seen *new_seen(void)
{
    struct seen *s = calloc(1, sizeof(*s));
    assert_non_null(s);
    return s;
}

static void test_lengths_all_encodings(void **state)
{
    (void)state;
    static uint8_t payload[70000], wire[80000];
    for (size_t i = 0; i < sizeof(payload); i++)
        payload[i] = (uint8_t)(i * 7);
    const size_t sizes[] = {0, 1, 125, 126, 65535, 65536, 70000};
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        struct wsframe_parser p;
        struct seen *s = new_seen();
        wsframe_parser_init(&p, 0);
        size_t n = server_frame(wire, 0x82, payload, sizes[k]);
        assert_int_equal(wsframe_parse(&p, wire, n, &ev, s), 0);
        assert_int_equal(s->len, sizes[k]);
        assert_memory_equal(s->data, payload, sizes[k]);
        assert_int_equal(s->finals, 1);
        assert_true(s->binary);
        free(s);
    }
}

static void test_byte_at_a_time_equals_whole(void **state)
{
    (void)state;
    uint8_t wire[4096];
    uint8_t msg[300];
    for (size_t i = 0; i < sizeof(msg); i++)
        msg[i] = (uint8_t)i;
    size_t n = server_frame(wire, 0x02, msg, 100);               /* fragment 1 */
    n += server_frame(wire + n, 0x89, (const uint8_t *)"hi", 2); /* ping between fragments */
    n += server_frame(wire + n, 0x80, msg + 100, 200);           /* final continuation */
    n += server_frame(wire + n, 0x82, NULL, 0);                  /* an empty message */
    struct wsframe_parser p;
    struct seen *s = new_seen();
    wsframe_parser_init(&p, 0);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(wsframe_parse(&p, wire + i, 1, &ev, s), 0);
    assert_int_equal(s->len, 300);
    assert_memory_equal(s->data, msg, 300);
    assert_int_equal(s->finals, 2);
    assert_int_equal(s->empty_finals, 1);
    assert_int_equal(s->controls, 1);
    assert_int_equal(s->control_op, WSFRAME_PING);
    assert_memory_equal(s->control, "hi", 2);
    free(s);
}

static void expect_error(const uint8_t *wire, size_t n, int err)
{
    struct wsframe_parser p;
    struct seen *s = new_seen();
    wsframe_parser_init(&p, 1000);
    assert_int_equal(wsframe_parse(&p, wire, n, &ev, s), err);
    free(s);
}

static void test_malformed(void **state)
{
    (void)state;
    uint8_t w[200];
    const uint8_t rsv[] = {0xc2, 0x00};
    expect_error(rsv, 2, WSFRAME_E_RSV);
    const uint8_t op3[] = {0x83, 0x00};
    expect_error(op3, 2, WSFRAME_E_OPCODE);
    const uint8_t opb[] = {0x8b, 0x00};
    expect_error(opb, 2, WSFRAME_E_OPCODE);
    const uint8_t masked[] = {0x82, 0x81, 1, 2, 3, 4, 5};
    expect_error(masked, sizeof(masked), WSFRAME_E_MASKED);
    const uint8_t frag_ping[] = {0x09, 0x00};
    expect_error(frag_ping, 2, WSFRAME_E_CONTROL);
    size_t n = server_frame(w, 0x89, NULL, 126);
    expect_error(w, 4, WSFRAME_E_CONTROL);
    (void)n;
    const uint8_t lone_cont[] = {0x80, 0x00};
    expect_error(lone_cont, 2, WSFRAME_E_SEQUENCE);
    const uint8_t nested[] = {0x02, 0x00, 0x82, 0x00};
    expect_error(nested, 4, WSFRAME_E_SEQUENCE);
    const uint8_t huge[] = {0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0};
    expect_error(huge, sizeof(huge), WSFRAME_E_LENGTH);
    /* Over the message limit (1000) across fragments, refused before the payload. */
    const uint8_t big[] = {0x02, 126, 0x01, 0xf4, 0x80, 126, 0x01, 0xf5};
    struct wsframe_parser p;
    struct seen *s = new_seen();
    wsframe_parser_init(&p, 1000);
    assert_int_equal(wsframe_parse(&p, big, 4, &ev, s), 0);
    static uint8_t zeros[500];
    assert_int_equal(wsframe_parse(&p, zeros, 500, &ev, s), 0);
    assert_int_equal(wsframe_parse(&p, big + 4, 4, &ev, s), WSFRAME_E_LENGTH);
    free(s);
}

static void test_close_frame_delivered(void **state)
{
    (void)state;
    uint8_t w[64];
    const uint8_t payload[] = {0x0f, 0xa4, 'n', 'o', 'p', 'e'}; /* 4004 "nope" */
    size_t n = server_frame(w, 0x88, payload, sizeof(payload));
    struct wsframe_parser p;
    struct seen *s = new_seen();
    wsframe_parser_init(&p, 0);
    assert_int_equal(wsframe_parse(&p, w, n, &ev, s), 0);
    assert_int_equal(s->control_op, WSFRAME_CLOSE);
    assert_int_equal(s->control_len, sizeof(payload));
    assert_memory_equal(s->control, payload, sizeof(payload));
    free(s);
}

/* What we send must parse as RFC 6455: unmask it by hand and compare. */
static void test_header_and_mask_round_trip(void **state)
{
    (void)state;
    const size_t sizes[] = {0, 5, 125, 126, 1000, 65535, 65536, 100003};
    static uint8_t buf[120000], orig[120000];
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        size_t len = sizes[k];
        uint8_t mask[4] = {0x12, 0x34, 0x56, (uint8_t)(0x78 + k)};
        size_t hl = wsframe_header(buf, WSFRAME_BINARY, true, len, mask);
        for (size_t i = 0; i < len; i++)
            orig[i] = buf[hl + i] = (uint8_t)(i * 31 + k);
        /* Mask in two pieces at an odd offset, as a caller with a split buffer would. */
        size_t cut = len / 3;
        wsframe_mask(buf + hl, cut, mask, 0);
        wsframe_mask(buf + hl + cut, len - cut, mask, cut);
        assert_int_equal(buf[0], 0x82);
        assert_true(buf[1] & 0x80);
        uint64_t l = buf[1] & 0x7f;
        size_t off = 2;
        if (l == 126) {
            l = ((uint64_t)buf[2] << 8) | buf[3];
            off = 4;
        } else if (l == 127) {
            l = 0;
            for (int i = 0; i < 8; i++)
                l = (l << 8) | buf[2 + i];
            off = 10;
        }
        assert_int_equal(l, len);
        assert_int_equal(off + 4, hl);
        assert_memory_equal(buf + off, mask, 4);
        for (size_t i = 0; i < len; i++)
            assert_int_equal(buf[hl + i] ^ mask[i & 3], orig[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lengths_all_encodings),
        cmocka_unit_test(test_byte_at_a_time_equals_whole),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_close_frame_delivered),
        cmocka_unit_test(test_header_and_mask_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
