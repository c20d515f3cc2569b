/*
 * libFuzzer target for proto/logbatch: the "logs" control message (PROTOCOL.md 12.8).
 *
 * The input's first byte picks what it is:
 *   '{' or whitespace: a CONTROL payload as the relay receives it. What logbatch_decode
 *       accepts must hand out exactly "lines" records that obey the grammar; what it
 *       refuses must come with a reason and not a single record.
 *   any other even byte: text lines for the agent's encoder (the next byte is the line
 *       separator). Every batch it fills must decode to the same number of records, each
 *       text clean, unchanged if it was clean already, and cleaning it again must not
 *       change it.
 *   any other odd byte: the raw records of one batch (inflated form, any bytes), sent through
 *       the encoder's compression. If the decoder accepts them, writing the records it hands
 *       out back in the grammar must give the same bytes: one spelling per batch.
 *
 * Invariant violations call abort(), which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/logbatch.h"
#include "proto/proto.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

/* An independent UTF-8 check (RFC 3629) by code point, for the invariants below. */
static int utf8_clean(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint32_t c = s[i], min;
        size_t len;
        if (c < 0x80) {
            if (c == 0 || c == '\n')
                return 0;
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, min = 0x10000, c &= 0x07;
        } else {
            return 0;
        }
        if (n - i < len)
            return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
            c = (c << 6) | (s[i + k] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return 0;
        i += len;
    }
    return 1;
}

static void check_record(const struct log_record *r)
{
    CHECK(r->time_ms >= 0);
    CHECK(logbatch_source_ok(r->source, r->source_len));
    CHECK(r->text_len <= PROTO_MAX_LOG_LINE);
    CHECK(utf8_clean((const uint8_t *)r->text, r->text_len));
}

/* What the callbacks saw: a count, and the records written back in the grammar. */
struct seen {
    size_t n;
    uint8_t *out; /* PROTO_MAX_LOG_BATCH bytes, or NULL */
    size_t len;
    const uint8_t *const *texts; /* expected texts (encoder mode), or NULL */
    const size_t *text_lens;
};

static void on_record(void *ud, const struct log_record *r)
{
    struct seen *s = ud;
    check_record(r);
    if (s->texts) {
        CHECK(r->text_len == s->text_lens[s->n]);
        CHECK(memcmp(r->text, s->texts[s->n], r->text_len) == 0);
    }
    if (s->out) {
        char t[24];
        int tl = snprintf(t, sizeof(t), "%lld", (long long)r->time_ms);
        size_t need = (size_t)tl + 1 + r->source_len + 1 + r->text_len + 1;
        CHECK(s->len + need <= PROTO_MAX_LOG_BATCH);
        uint8_t *p = s->out + s->len;
        memcpy(p, t, (size_t)tl);
        p += tl;
        *p++ = ' ';
        memcpy(p, r->source, r->source_len);
        p += r->source_len;
        *p++ = ' ';
        memcpy(p, r->text, r->text_len);
        p += r->text_len;
        *p = '\n';
        s->len += need;
    }
    s->n++;
}

/* Sends msg as the agent does (compact JSON, CONTROL parse) and decodes it into s. */
static int wire_decode(json_t *msg, struct seen *s)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    CHECK(text != NULL);
    json_t *parsed = NULL;
    char err[256] = "";
    CHECK(proto_control_parse((const uint8_t *)text, strlen(text), &parsed, err, sizeof(err)) == 0);
    free(text);
    err[0] = '\0';
    int rc = logbatch_decode(parsed, on_record, s, err, sizeof(err));
    CHECK(rc == 0 || (err[0] != '\0' && s->n == 0));
    json_decref(parsed);
    return rc;
}

static void fuzz_control(const uint8_t *data, size_t size)
{
    json_t *msg = NULL;
    if (proto_control_parse(data, size, &msg, NULL, 0) != 0)
        return;
    struct seen s = {0};
    char err[256] = "";
    int rc = logbatch_decode(msg, on_record, &s, err, sizeof(err));
    if (rc == 0) {
        json_t *type = json_object_get(msg, "type");
        CHECK(json_is_string(type) && strcmp(json_string_value(type), "logs") == 0);
        CHECK((json_int_t)s.n == json_integer_value(json_object_get(msg, "lines")));
    } else {
        CHECK(err[0] != '\0');
        CHECK(s.n == 0);
        CHECK(rc == PROTO_E_JSON || rc == PROTO_E_PAYLOAD || rc == PROTO_E_LENGTH);
    }
    json_decref(msg);
}

/* The texts of one batch, as added and as they must come back. */
struct pending {
    size_t n;
    const uint8_t *texts[PROTO_MAX_LOG_BATCH / 5];
    size_t lens[PROTO_MAX_LOG_BATCH / 5];
};

static void flush(struct logbatch *b, struct pending *p)
{
    if (b->lines == 0)
        return;
    CHECK(b->lines == p->n);
    json_t *msg = logbatch_message(b, p->n);
    CHECK(msg != NULL);
    struct seen s = {.texts = p->texts, .text_lens = p->lens};
    CHECK(wire_decode(msg, &s) == 0);
    CHECK(s.n == p->n);
    json_decref(msg);
    logbatch_init(b);
    p->n = 0;
}

static void fuzz_encoder(const uint8_t *data, size_t size)
{
    if (size < 1)
        return;
    uint8_t sep = data[0];
    data++;
    size--;
    struct logbatch *b = malloc(sizeof(*b));
    struct pending *p = malloc(sizeof(*p));
    struct logbatch *again = malloc(sizeof(*again));
    CHECK(b && p && again);
    logbatch_init(b);
    p->n = 0;
    size_t start = 0;
    for (size_t i = 0; i <= size; i++) {
        if (i < size && data[i] != sep)
            continue;
        const char *text = (const char *)data + start;
        size_t len = i - start;
        start = i + 1;
        size_t before = b->len;
        int rc = logbatch_add(b, (int64_t)i, "fuzz", text, len);
        if (rc == PROTO_E_LENGTH) {
            flush(b, p);
            before = b->len;
            rc = logbatch_add(b, (int64_t)i, "fuzz", text, len);
        }
        CHECK(rc == 0);
        /* The record just written: TIME SP "fuzz" SP TEXT LF. */
        char t[24];
        size_t head = (size_t)snprintf(t, sizeof(t), "%zu fuzz ", i);
        CHECK(b->len >= before + head + 1);
        CHECK(memcmp(b->buf + before, t, head) == 0 && b->buf[b->len - 1] == '\n');
        const uint8_t *out = b->buf + before + head;
        size_t ol = b->len - before - head - 1;
        CHECK(ol <= PROTO_MAX_LOG_LINE);
        CHECK(utf8_clean(out, ol));
        /* clean input comes out as it went in (short of a trailing CR) */
        if (len <= PROTO_MAX_LOG_LINE && utf8_clean((const uint8_t *)text, len) &&
            (len == 0 || text[len - 1] != '\r'))
            CHECK(ol == len && memcmp(out, text, len) == 0);
        /* cleaning is idempotent (a trailing CR it kept would go the second time) */
        logbatch_init(again);
        CHECK(logbatch_add(again, 0, "x", (const char *)out, ol) == 0);
        if (ol == 0 || out[ol - 1] != '\r')
            CHECK(again->len == 4 + ol + 1 && memcmp(again->buf + 4, out, ol) == 0);
        p->texts[p->n] = out;
        p->lens[p->n] = ol;
        p->n++;
    }
    flush(b, p);
    free(again);
    free(p);
    free(b);
}

static void fuzz_raw(const uint8_t *data, size_t size, int extra_line)
{
    struct logbatch *b = malloc(sizeof(*b));
    uint8_t *out = malloc(PROTO_MAX_LOG_BATCH);
    CHECK(b && out);
    logbatch_init(b);
    b->len = size < PROTO_MAX_LOG_BATCH ? size : PROTO_MAX_LOG_BATCH;
    memcpy(b->buf, data, b->len);
    for (size_t i = 0; i < b->len; i++)
        b->lines += b->buf[i] == '\n';
    b->lines += (unsigned)extra_line;
    if (b->lines > 0 && b->len > 0) {
        json_t *msg = logbatch_message(b, 1);
        CHECK(msg != NULL);
        struct seen s = {.out = out};
        if (wire_decode(msg, &s) == 0) {
            CHECK(s.n == b->lines);
            CHECK(s.len == b->len && memcmp(out, b->buf, b->len) == 0);
        }
        json_decref(msg);
    }
    free(out);
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    uint8_t mode = data[0];
    if (mode == '{' || mode == ' ' || mode == '\t' || mode == '\n' || mode == '\r')
        fuzz_control(data, size);
    else if (mode % 2 == 0)
        fuzz_encoder(data + 1, size - 1);
    else
        fuzz_raw(data + 1, size - 1, (mode & 2) != 0);
    return 0;
}
