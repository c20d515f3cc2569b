/*
 * libFuzzer target for proto/'s frame decoders.
 *
 * The input is one websocket message as the mux sees it: zero or more frames back to back.
 * Each header goes through proto_header_decode; a valid frame's payload, copied into a buffer
 * of exactly its length (so ASan sees any over-read), goes to its type's decoder. Whatever
 * decodes must re-encode to the same bytes (or, for HELLO, to the same values): a decoder
 * that accepts what the encoder cannot produce, or the reverse, is a bug. The payload
 * decoders also see the raw input directly, to reach lengths the header check forbids.
 *
 * Invariant violations call abort(), which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

static void check_hello(const uint8_t *p, size_t len)
{
    struct proto_hello h;
    int rc = proto_hello_decode(p, len, &h);
    if (len % 6 != 0 || len > PROTO_MAX_HELLO_SETTINGS * 6) {
        CHECK(rc == PROTO_E_LENGTH);
        return;
    }
    CHECK(rc == 0 || rc == PROTO_E_PAYLOAD);
    if (rc != 0)
        return;
    CHECK(h.max_frame_payload >= PROTO_MIN_FRAME_PAYLOAD);
    CHECK(h.max_frame_payload <= PROTO_MAX_FRAME_PAYLOAD);
    CHECK(h.initial_window >= PROTO_MIN_WINDOW && h.initial_window <= PROTO_MAX_WINDOW);
    CHECK(h.max_streams >= 1 && h.max_streams <= PROTO_MAX_STREAMS_LIMIT);

    /* Unknown settings are dropped and order is not kept, so compare values, not bytes. */
    uint8_t buf[PROTO_HELLO_SIZE];
    CHECK(proto_hello_encode(&h, buf) == PROTO_HELLO_SIZE);
    struct proto_hello again;
    CHECK(proto_hello_decode(buf, sizeof(buf), &again) == 0);
    CHECK(again.max_frame_payload == h.max_frame_payload);
    CHECK(again.initial_window == h.initial_window);
    CHECK(again.max_streams == h.max_streams);
}

static void check_open(const uint8_t *p, size_t len)
{
    struct proto_open o;
    int rc = proto_open_decode(p, len, &o);
    CHECK(rc == 0 || rc == PROTO_E_PAYLOAD || rc == PROTO_E_KIND);
    if (rc == PROTO_E_KIND)
        CHECK(o.kind != PROTO_KIND_TCP && o.kind != PROTO_KIND_SSH && o.kind != PROTO_KIND_PTY);
    if (rc != 0)
        return;
    CHECK(o.kind == PROTO_KIND_TCP || o.kind == PROTO_KIND_SSH || o.kind == PROTO_KIND_PTY);
    CHECK(o.flags == 0);
    if (o.kind == PROTO_KIND_TCP)
        CHECK(o.port != 0 && strlen(o.host) >= 1 && strlen(o.host) <= PROTO_MAX_HOST);
    if (o.kind == PROTO_KIND_PTY)
        CHECK(strlen(o.command) <= PROTO_MAX_PTY_COMMAND && !(o.pty_options & ~PROTO_PTY_OPT_ZLIB));

    uint8_t buf[PROTO_MAX_OPEN];
    int n = proto_open_encode(&o, buf, sizeof(buf));
    CHECK(n >= 0 && (size_t)n == len);
    CHECK(memcmp(buf, p, len) == 0);
}

/* pty stream records, back to back: each decodes to a length within the input, or waits. */
static void check_ptyrecs(const uint8_t *p, size_t len)
{
    while (len > 0) {
        struct proto_ptyrec r;
        int n = proto_ptyrec_decode(p, len, &r);
        CHECK(n == 0 || n == PROTO_E_PAYLOAD ||
              (n >= (int)PROTO_PTYREC_HEADER && (size_t)n <= len));
        if (n <= 0)
            return;
        CHECK((size_t)n == PROTO_PTYREC_HEADER + r.len && r.body == p + PROTO_PTYREC_HEADER);
        uint8_t hdr[PROTO_PTYREC_HEADER];
        proto_ptyrec_header(r.type, r.len, hdr);
        CHECK(memcmp(hdr, p, PROTO_PTYREC_HEADER) == 0);
        p += n;
        len -= (size_t)n;
    }
}

/* Re-encodes a decoded reason; text has no NUL (a control character), so it can be a C string. */
static void check_reason(const uint8_t *p, size_t len, int goaway)
{
    struct proto_reason r;
    int rc = goaway ? proto_goaway_decode(p, len, &r) : proto_reason_decode(p, len, &r);
    CHECK(rc == 0 || rc == PROTO_E_PAYLOAD);
    if (rc != 0)
        return;
    CHECK(r.text_len <= PROTO_MAX_TEXT);
    CHECK(r.text_len == len - (goaway ? 8u : 4u));
    char text[PROTO_MAX_TEXT + 1];
    memcpy(text, r.text, r.text_len);
    text[r.text_len] = '\0';
    CHECK(strlen(text) == r.text_len);

    uint8_t buf[PROTO_GOAWAY_MAX];
    size_t n = goaway ? proto_goaway_encode(r.last_stream, r.code, text, buf)
                      : proto_reason_encode(r.code, text, buf);
    CHECK(n == len);
    CHECK(memcmp(buf, p, len) == 0);
}

static void check_credit(const uint8_t *p, size_t len)
{
    uint64_t off;
    int rc = proto_credit_decode(p, len, &off);
    CHECK(rc == (len == 8 ? 0 : PROTO_E_LENGTH));
    if (rc != 0)
        return;
    uint8_t buf[8];
    proto_credit_encode(off, buf);
    CHECK(memcmp(buf, p, 8) == 0);
}

static void check_control(const uint8_t *p, size_t len)
{
    json_t *msg;
    char err[128];
    int rc = proto_control_parse(p, len, &msg, err, sizeof(err));
    CHECK(rc == 0 || rc == PROTO_E_JSON);
    CHECK((rc == 0) == (msg != NULL));
    json_decref(msg);
}

/* The payload of a frame whose header passed; every decoder must agree with the header. */
static void check_payload(const struct proto_header *h, const uint8_t *p)
{
    size_t len = h->length;
    switch (h->type) {
    case PROTO_HELLO:
        check_hello(p, len);
        break;
    case PROTO_OPEN:
        check_open(p, len);
        break;
    case PROTO_OPEN_FAIL:
    case PROTO_RST:
        check_reason(p, len, 0);
        break;
    case PROTO_GOAWAY:
        check_reason(p, len, 1);
        break;
    case PROTO_CREDIT:
        check_credit(p, len);
        break;
    case PROTO_CONTROL:
        check_control(p, len);
        break;
    case PROTO_OPEN_OK:
        CHECK(len == 0);
        break;
    case PROTO_PING:
    case PROTO_PONG:
        CHECK(len == PROTO_PING_SIZE);
        break;
    case PROTO_DATA:
        CHECK(len <= PROTO_DEFAULT_FRAME_PAYLOAD);
        break;
    default:
        abort();
    }
}

static void check_header(const uint8_t *p, const struct proto_header *h)
{
    uint8_t buf[PROTO_HEADER_SIZE];
    proto_header_encode(buf, h->type, h->flags, h->stream, h->length);
    CHECK(memcmp(buf, p, PROTO_HEADER_SIZE) == 0);
    CHECK(h->version == PROTO_VERSION);
    CHECK(h->type >= PROTO_HELLO && h->type <= PROTO_CONTROL);
    CHECK(h->flags == 0 || (h->type == PROTO_DATA && h->flags == PROTO_FLAG_FIN));
}

/* Walks the frames of one message as the mux would, stopping at the first error. */
static void walk_frames(const uint8_t *data, size_t size)
{
    size_t off = 0;
    while (off < size) {
        struct proto_header h;
        int rc = proto_header_decode(data + off, size - off, PROTO_DEFAULT_FRAME_PAYLOAD, &h);
        if (rc == PROTO_E_SHORT) {
            CHECK(size - off < PROTO_HEADER_SIZE);
            return;
        }
        CHECK(rc <= 0 && rc >= PROTO_E_STREAM);
        if (rc < 0)
            return;
        check_header(data + off, &h);
        off += PROTO_HEADER_SIZE;
        if (h.length > size - off)
            return; /* a partial frame: a connection error at the message's end */
        uint8_t *payload = malloc(h.length ? h.length : 1);
        CHECK(payload != NULL);
        memcpy(payload, data + off, h.length);
        check_payload(&h, payload);
        free(payload);
        off += h.length;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    walk_frames(data, size);

    /* The payload decoders on their own, at any length. */
    check_hello(data, size);
    check_open(data, size);
    check_ptyrecs(data, size);
    check_reason(data, size, 0);
    check_reason(data, size, 1);
    check_credit(data, size);
    return 0;
}
