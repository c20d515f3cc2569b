/*
 * Unit tests for proto/logbatch: the records of a "logs" control message (PROTOCOL.md 12.8).
 *
 * What the agent adds must come out of the relay's decoder byte for byte (after the
 * documented clean-up), and every malformed batch must be refused whole: an error, a reason,
 * and not a single record handed out.
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

#include "proto/logbatch.h"
#include "proto/proto.h"

/* ---- helpers ---- */

struct got {
    size_t n;
    struct {
        int64_t time_ms;
        char source[PROTO_MAX_LOG_SOURCE + 1];
        char *text; /* NUL-terminated copy */
        size_t text_len;
    } rec[20000];
};

static void collect(void *ud, const struct log_record *r)
{
    struct got *g = ud;
    assert_true(g->n < sizeof(g->rec) / sizeof(g->rec[0]));
    g->rec[g->n].time_ms = r->time_ms;
    assert_true(r->source_len <= PROTO_MAX_LOG_SOURCE);
    memcpy(g->rec[g->n].source, r->source, r->source_len);
    g->rec[g->n].source[r->source_len] = '\0';
    g->rec[g->n].text = malloc(r->text_len + 1);
    assert_non_null(g->rec[g->n].text);
    memcpy(g->rec[g->n].text, r->text, r->text_len);
    g->rec[g->n].text[r->text_len] = '\0';
    g->rec[g->n].text_len = r->text_len;
    g->n++;
}

static struct got *got_new(void)
{
    struct got *g = calloc(1, sizeof(*g));
    assert_non_null(g);
    return g;
}

static void got_free(struct got *g)
{
    for (size_t i = 0; i < g->n; i++)
        free(g->rec[i].text);
    free(g);
}

static struct logbatch *batch_new(void)
{
    struct logbatch *b = malloc(sizeof(*b));
    assert_non_null(b);
    logbatch_init(b);
    return b;
}

/*
 * Sends b the way the agent does (message, compact JSON, CONTROL parse on the relay) and
 * decodes it into g. Returns logbatch_decode's result.
 */
static int wire_round_trip(const struct logbatch *b, uint64_t seq, struct got *g)
{
    json_t *msg = logbatch_message(b, seq);
    assert_non_null(msg);
    char *s = json_dumps(msg, JSON_COMPACT);
    assert_non_null(s);
    json_decref(msg);
    json_t *parsed = NULL;
    char err[256] = "";
    int rc = proto_control_parse((const uint8_t *)s, strlen(s), &parsed, err, sizeof(err));
    if (rc != 0)
        fail_msg("the relay refused our own message: %s", err);
    free(s);
    rc = logbatch_decode(parsed, collect, g, err, sizeof(err));
    if (rc != 0)
        fail_msg("the decoder refused our own batch: %s", err);
    json_decref(parsed);
    return rc;
}

/* Adds one record and returns the text the decoder gives back for it. */
static char *clean(const char *text, size_t len, size_t *outlen)
{
    struct logbatch *b = batch_new();
    assert_int_equal(logbatch_add(b, 1, "t", text, len), 0);
    struct got *g = got_new();
    wire_round_trip(b, 1, g);
    assert_int_equal(g->n, 1);
    char *s = g->rec[0].text;
    *outlen = g->rec[0].text_len;
    g->rec[0].text = NULL;
    got_free(g);
    free(b);
    return s;
}

static void expect_clean(const char *in, size_t inlen, const char *want, size_t wantlen)
{
    size_t n;
    char *s = clean(in, inlen, &n);
    if (n != wantlen || memcmp(s, want, n) != 0)
        fail_msg("clean(\"%.40s\") gave %zu bytes \"%.60s\", want %zu", in, n, s, wantlen);
    free(s);
}

#define FFFD "\xef\xbf\xbd"
/* in and want are string literals; their lengths are taken with sizeof (NULs included). */
#define EXPECT_CLEAN(in, want) expect_clean(in, sizeof(in) - 1, want, sizeof(want) - 1)

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64(const uint8_t *in, size_t n)
{
    char *out = malloc((n + 2) / 3 * 4 + 1);
    assert_non_null(out);
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = b64_alphabet[v >> 18];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? b64_alphabet[v & 63] : '=';
    }
    out[o] = '\0';
    return out;
}

static json_t *msg_data(json_int_t seq, json_int_t lines, const char *data)
{
    json_t *m =
        json_pack("{s:s, s:I, s:I, s:s}", "type", "logs", "seq", seq, "lines", lines, "data", data);
    assert_non_null(m);
    return m;
}

/* A "logs" message whose data is the given zlib bytes. */
static json_t *msg_zlib(json_int_t seq, json_int_t lines, const uint8_t *z, size_t zl)
{
    char *d = b64(z, zl);
    json_t *m = msg_data(seq, lines, d);
    free(d);
    return m;
}

/* zlib-compresses n bytes; *zl gets the length. The caller frees the result. */
static uint8_t *deflate_bytes(const void *p, size_t n, size_t *zl)
{
    uLongf cap = compressBound((uLong)n);
    uint8_t *z = malloc(cap);
    assert_non_null(z);
    assert_int_equal(compress2(z, &cap, p, (uLong)n, 6), Z_OK);
    *zl = cap;
    return z;
}

/* A "logs" message carrying the raw batch bytes records[0..n) (no clean-up, no checks). */
static json_t *msg_records(json_int_t seq, json_int_t lines, const void *records, size_t n)
{
    size_t zl;
    uint8_t *z = deflate_bytes(records, n, &zl);
    json_t *m = msg_zlib(seq, lines, z, zl);
    free(z);
    return m;
}

static int called;

static void count_calls(void *ud, const struct log_record *r)
{
    (void)ud;
    (void)r;
    called++;
}

/* The decoder refuses msg with rc, says why, and calls back for nothing. Takes msg. */
static void expect_refused(json_t *msg, int rc, const char *what)
{
    char err[256] = "";
    called = 0;
    int got = logbatch_decode(msg, count_calls, NULL, err, sizeof(err));
    if (got != rc)
        fail_msg("%s: got %d (%s), want %d", what, got, err, rc);
    if (err[0] == '\0')
        fail_msg("%s: no reason given", what);
    assert_int_equal(called, 0);
    json_decref(msg);
}

static void expect_records_refused(json_int_t lines, const char *records, const char *what)
{
    expect_refused(msg_records(1, lines, records, strlen(records)), PROTO_E_PAYLOAD, what);
}

static void expect_records_ok(json_int_t lines, const char *records, size_t n)
{
    json_t *m = msg_records(1, lines, records, n);
    char err[256] = "";
    called = 0;
    if (logbatch_decode(m, count_calls, NULL, err, sizeof(err)) != 0)
        fail_msg("refused \"%.60s\": %s", records, err);
    assert_int_equal(called, lines);
    json_decref(m);
}

/* ---- encoder ---- */

/* The source of record i in test_round_trip. */
static void source_of(unsigned i, char *out, size_t cap)
{
    if (i % 3 == 0)
        snprintf(out, cap, "agent");
    else
        snprintf(out, cap, "script:build-%u", i % 7);
}

static void test_round_trip(void **state)
{
    (void)state;
    struct logbatch *b = batch_new();
    char src[32], text[128];
    unsigned n = 0;
    for (;; n++) {
        source_of(n, src, sizeof(src));
        int len =
            snprintf(text, sizeof(text), "line %u: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", n);
        int rc = logbatch_add(b, 1796000000000 + n, src, text, (size_t)(n % 5 ? len : 0));
        if (rc == PROTO_E_LENGTH)
            break;
        assert_int_equal(rc, 0);
    }
    assert_int_equal(b->lines, n);
    assert_true(n > 1000);
    /* Edge values of TIME and SOURCE. */
    struct logbatch *e = batch_new();
    char longsrc[PROTO_MAX_LOG_SOURCE + 1];
    memset(longsrc, 'x', PROTO_MAX_LOG_SOURCE);
    longsrc[PROTO_MAX_LOG_SOURCE] = '\0';
    assert_int_equal(logbatch_add(e, 0, "a", "zero", 4), 0);
    assert_int_equal(logbatch_add(e, INT64_MAX, longsrc, "max", 3), 0);
    assert_int_equal(logbatch_add(e, 5, "devcontainer:postStartCommand:a.b_c/d-e", "", 0), 0);

    struct got *g = got_new();
    wire_round_trip(b, 7, g);
    assert_int_equal(g->n, n);
    for (unsigned i = 0; i < n; i++) {
        source_of(i, src, sizeof(src));
        int len =
            snprintf(text, sizeof(text), "line %u: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", i);
        assert_int_equal(g->rec[i].time_ms, 1796000000000 + i);
        assert_string_equal(g->rec[i].source, src);
        assert_int_equal(g->rec[i].text_len, i % 5 ? (size_t)len : 0);
        assert_memory_equal(g->rec[i].text, text, g->rec[i].text_len);
    }
    got_free(g);

    g = got_new();
    wire_round_trip(e, 1, g);
    assert_int_equal(g->n, 3);
    assert_int_equal(g->rec[0].time_ms, 0);
    assert_string_equal(g->rec[0].text, "zero");
    assert_int_equal(g->rec[1].time_ms, INT64_MAX);
    assert_string_equal(g->rec[1].source, longsrc);
    assert_string_equal(g->rec[2].source, "devcontainer:postStartCommand:a.b_c/d-e");
    assert_int_equal(g->rec[2].text_len, 0);
    got_free(g);
    free(b);
    free(e);
}

static void test_message_shape(void **state)
{
    (void)state;
    struct logbatch *b = batch_new();
    assert_null(logbatch_message(b, 1)); /* empty */
    assert_int_equal(logbatch_add(b, 1, "agent", "hello", 5), 0);
    assert_int_equal(logbatch_add(b, 2, "agent", "world", 5), 0);
    assert_null(logbatch_message(b, 0)); /* seq starts at 1 */
    assert_null(logbatch_message(b, (uint64_t)INT64_MAX + 1));
    json_t *m = logbatch_message(b, 42);
    assert_non_null(m);
    assert_string_equal(json_string_value(json_object_get(m, "type")), "logs");
    assert_int_equal(json_integer_value(json_object_get(m, "seq")), 42);
    assert_int_equal(json_integer_value(json_object_get(m, "lines")), 2);
    assert_int_equal(proto_control_validate(m, NULL, 0), 0);
    /* data is standard padded base64 of a zlib stream of exactly the records */
    const char *d = json_string_value(json_object_get(m, "data"));
    assert_int_equal(strlen(d) % 4, 0);
    assert_int_equal(strspn(d, b64_alphabet) + strspn(d + strspn(d, b64_alphabet), "="), strlen(d));
    json_decref(m);
    free(b);
}

static void test_sanitise(void **state)
{
    (void)state;
    EXPECT_CLEAN("plain", "plain");
    EXPECT_CLEAN("", "");
    EXPECT_CLEAN("tab\there\x1b[0m", "tab\there\x1b[0m"); /* other controls stay */
    EXPECT_CLEAN("a\nb", "a" FFFD "b");
    EXPECT_CLEAN("a\0b", "a" FFFD "b");
    EXPECT_CLEAN("crlf\r", "crlf");
    EXPECT_CLEAN("two\r\r", "two\r"); /* only one trailing CR goes */
    EXPECT_CLEAN("mid\rdle", "mid\rdle");
    EXPECT_CLEAN("\r", "");
    /* invalid UTF-8: each offending byte is one U+FFFD */
    EXPECT_CLEAN("\xff", FFFD);
    EXPECT_CLEAN("a\x80z", "a" FFFD "z");                  /* stray continuation */
    EXPECT_CLEAN("\xc0\xaf", FFFD FFFD);                   /* overlong '/' */
    EXPECT_CLEAN("\xe0\x80\xaf", FFFD FFFD FFFD);          /* overlong, 3 bytes */
    EXPECT_CLEAN("\xed\xa0\x80", FFFD FFFD FFFD);          /* surrogate U+D800 */
    EXPECT_CLEAN("\xf4\x90\x80\x80", FFFD FFFD FFFD FFFD); /* above U+10FFFF */
    EXPECT_CLEAN("end\xe2\x82", "end" FFFD FFFD);          /* truncated at the end */
    EXPECT_CLEAN("\xe2\x82\xac\xf0\x9f\x98\x80", "\xe2\x82\xac\xf0\x9f\x98\x80");
    /* a CR before an invalid byte is not trailing */
    EXPECT_CLEAN("x\r\xff", "x\r" FFFD);
    /* text is taken by length: bytes after len are not read */
    expect_clean("abcdef", 3, "abc", 3);
    size_t n;
    char *s = clean(NULL, 0, &n);
    assert_int_equal(n, 0);
    free(s);
}

static void test_sanitise_cut(void **state)
{
    (void)state;
    char *in = malloc(8192);
    char *want = malloc(8192);
    if (!in || !want) /* not only assert_non_null: GCC must see they are not NULL */
        abort();

    /* 5000 ASCII bytes: the first 4096 */
    memset(in, 'a', 5000);
    expect_clean(in, 5000, in, PROTO_MAX_LOG_LINE);
    /* exactly 4096 stays whole, and a trailing CR after it still goes */
    in[4096] = '\r';
    expect_clean(in, 4097, in, 4096);

    /* a two-byte character across the cut is dropped whole */
    memset(in, 'a', 4095);
    memcpy(in + 4095, "\xc3\xa9zz", 4);
    expect_clean(in, 4099, in, 4095);
    /* a four-byte one that ends exactly at the cut is kept */
    memset(in, 'b', 4092);
    memcpy(in + 4092, "\xf0\x9f\x98\x80zz", 6);
    expect_clean(in, 4098, in, 4096);
    /* three-byte characters: 1365 fit (4095 bytes), the 1366th does not */
    for (size_t i = 0; i < 2000; i++)
        memcpy(in + 3 * i, "\xe2\x82\xac", 3);
    expect_clean(in, 6000, in, 4095);
    /* a replacement character is never split either */
    memset(in, 'c', 4094);
    in[4094] = '\xff';
    expect_clean(in, 4095, in, 4094);
    memset(in, 'c', 4093);
    in[4093] = '\n';
    memcpy(want, in, 4093);
    memcpy(want + 4093, FFFD, 3);
    expect_clean(in, 4094, want, 4096);
    free(in);
    free(want);
}

static void test_full_batch(void **state)
{
    (void)state;
    struct logbatch *b = batch_new();
    char *text = malloc(PROTO_MAX_LOG_LINE);
    assert_non_null(text);
    /* Text that does not compress (random printable bytes): the worst case for "data". */
    uint32_t x = 12345;
    int rc;
    unsigned n = 0;
    size_t before;
    do {
        for (size_t i = 0; i < PROTO_MAX_LOG_LINE; i++) {
            x = x * 1103515245u + 12345u;
            text[i] = (char)(0x20 + (x >> 16) % 95);
        }
        before = b->len;
        rc = logbatch_add(b, INT64_MAX, "abcdefghijklmnopqrstuvwxyz0123456789", text,
                          PROTO_MAX_LOG_LINE);
        if (rc == 0)
            n++;
    } while (rc == 0);
    assert_int_equal(rc, PROTO_E_LENGTH);
    assert_int_equal(b->len, before); /* a refused record leaves the batch as it was */
    assert_int_equal(b->lines, n);
    assert_true(b->len <= PROTO_MAX_LOG_BATCH);
    assert_true(b->len + PROTO_MAX_LOG_RECORD > PROTO_MAX_LOG_BATCH);
    /* A short record may still fit where a long one did not. */
    while (logbatch_add(b, 1, "s", "x", 1) == 0)
        n++;
    assert_true(b->len > PROTO_MAX_LOG_BATCH - 6);
    assert_true(b->len <= PROTO_MAX_LOG_BATCH);

    struct got *g = got_new();
    wire_round_trip(b, 3, g);
    assert_int_equal(g->n, n);
    got_free(g);

    /* After init the batch takes records again. */
    logbatch_init(b);
    assert_int_equal(b->len, 0);
    assert_int_equal(b->lines, 0);
    assert_int_equal(logbatch_add(b, 1, "s", text, PROTO_MAX_LOG_LINE), 0);
    free(text);
    free(b);
}

static void test_bad_source(void **state)
{
    (void)state;
    struct logbatch *b = batch_new();
    char longsrc[PROTO_MAX_LOG_SOURCE + 2];
    memset(longsrc, 'x', sizeof(longsrc) - 1);
    longsrc[sizeof(longsrc) - 1] = '\0';
    const char *bad[] = {"", "has space", "tab\t", "caf\xc3\xa9", "a*b", "new\nline", longsrc};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (logbatch_add(b, 1, bad[i], "t", 1) != PROTO_E_PAYLOAD)
            fail_msg("source \"%s\" accepted", bad[i]);
        assert_false(logbatch_source_ok(bad[i], strlen(bad[i])));
    }
    assert_int_equal(logbatch_add(b, 1, NULL, "t", 1), PROTO_E_PAYLOAD);
    assert_int_equal(logbatch_add(b, -1, "agent", "t", 1), PROTO_E_PAYLOAD); /* TIME has no sign */
    assert_int_equal(b->len, 0);
    assert_int_equal(b->lines, 0);

    assert_true(logbatch_source_ok("script:my.build_1/x-y", 21));
    assert_true(logbatch_source_ok(longsrc, PROTO_MAX_LOG_SOURCE));
    assert_false(logbatch_source_ok(longsrc, PROTO_MAX_LOG_SOURCE + 1));
    assert_false(logbatch_source_ok("ab", 0));
    assert_true(logbatch_source_ok("a b", 1)); /* by length, not NUL */
    free(b);
}

/* ---- decoder ---- */

static void test_decode_records_ok(void **state)
{
    (void)state;
    expect_records_ok(1, "0 s \n", 5);
    expect_records_ok(2, "1 a hello\n2 b/c:d world\n", 24);
    expect_records_ok(1, "9223372036854775807 s x\n", 24);
    expect_records_ok(1, "1 s a  b \r\n", 11);         /* spaces and CR inside TEXT are text */
    expect_records_ok(1, "1 s \xf4\x8f\xbf\xbf\n", 9); /* U+10FFFF */

    /* The limit is exact: 65536 bytes of records pass, 65537 do not. */
    char *big = malloc(PROTO_MAX_LOG_BATCH + 1);
    assert_non_null(big);
    for (size_t r = 0; r < 16; r++) {
        char *p = big + r * 4096;
        memcpy(p, "0 s ", 4);
        memset(p + 4, 'z', 4091);
        p[4095] = '\n';
    }
    expect_records_ok(16, big, PROTO_MAX_LOG_BATCH);
    memcpy(big + PROTO_MAX_LOG_BATCH - 1, "z\n", 2);
    expect_refused(msg_records(1, 16, big, PROTO_MAX_LOG_BATCH + 1), PROTO_E_LENGTH, "65537 bytes");
    free(big);

    /* TEXT of exactly PROTO_MAX_LOG_LINE passes, one more does not. */
    char rec[PROTO_MAX_LOG_LINE + 16];
    memcpy(rec, "1 s ", 4);
    memset(rec + 4, 'q', PROTO_MAX_LOG_LINE + 1);
    rec[4 + PROTO_MAX_LOG_LINE] = '\n';
    expect_records_ok(1, rec, 4 + PROTO_MAX_LOG_LINE + 1);
    rec[4 + PROTO_MAX_LOG_LINE] = 'q';
    rec[4 + PROTO_MAX_LOG_LINE + 1] = '\n';
    rec[4 + PROTO_MAX_LOG_LINE + 2] = '\0';
    expect_records_refused(1, rec, "text too long");
}

static void test_decode_bad_records(void **state)
{
    (void)state;
    expect_records_refused(1, "", "no records");
    expect_records_refused(2, "1 s a\n", "fewer records than lines");
    expect_records_refused(1, "1 s a\n1 s b\n", "more records than lines");
    expect_records_refused(1, "1 s a", "no LF");
    expect_records_refused(2, "1 s a\n1 s b", "last record without LF");
    expect_records_refused(1, "\n", "empty record");
    /* TIME */
    expect_records_refused(1, " s a\n", "no time");
    expect_records_refused(1, "-1 s a\n", "negative time");
    expect_records_refused(1, "+1 s a\n", "signed time");
    expect_records_refused(1, "1a s a\n", "letters in time");
    expect_records_refused(1, "12345678901234567890 s a\n", "20 digits");
    expect_records_refused(1, "9223372036854775808 s a\n", "over INT64_MAX");
    expect_records_refused(1, "99999999999999999999 s a\n", "20 nines");
    expect_records_refused(1, "1\ts a\n", "tab after time");
    expect_records_refused(1, "01 s a\n", "leading zero");
    expect_records_refused(1, "00 s a\n", "zero twice");
    expect_records_refused(1, "1", "time alone");
    /* SOURCE */
    expect_records_refused(1, "1  a\n", "empty source");
    expect_records_refused(1, "1 a*b a\n", "bad char in source");
    expect_records_refused(1, "1 caf\xc3\xa9 a\n", "non-ASCII source");
    expect_records_refused(1, "1 s\n", "no space after source");
    expect_records_refused(1, "1 s", "source at the end");
    expect_records_refused(
        1, "1 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx a\n",
        "65-byte source");
    /* TEXT */
    expect_refused(msg_records(1, 1, "1 s a\0b\n", 8), PROTO_E_PAYLOAD, "NUL in text");
    expect_records_refused(1, "1 s \xff\n", "invalid UTF-8");
    expect_records_refused(1, "1 s \xc0\xaf\n", "overlong");
    expect_records_refused(1, "1 s \xed\xa0\x80\n", "surrogate");
    expect_records_refused(1, "1 s \xe2\x82\n", "truncated character");
    expect_records_refused(1, "1 s \xf4\x90\x80\x80\n", "above U+10FFFF");
    /* a bad record anywhere spoils the whole batch */
    expect_records_refused(3, "1 s a\n2 s b\n3 s \xff\n", "bad last record");
}

static void test_decode_bad_base64(void **state)
{
    (void)state;
    static const char records[] = "1 s a\n";
    size_t zl;
    uint8_t *z = deflate_bytes(records, 6, &zl);
    char *good = b64(z, zl);
    free(z);
    json_t *m = msg_data(1, 1, good);
    called = 0;
    assert_int_equal(logbatch_decode(m, count_calls, NULL, NULL, 0), 0);
    assert_int_equal(called, 1);
    json_decref(m);

    size_t n = strlen(good);
    char *s = malloc(n + 8);
    assert_non_null(s);

    const char *bad[] = {"", "!!!!", "QQ", "QQ=", "QQ==QQ==", "Q===", "====", "QR==", "QUI=x"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_refused(msg_data(1, 1, bad[i]), PROTO_E_PAYLOAD, bad[i]);
    /* whitespace, URL-safe letters and a missing pad in an otherwise good string */
    snprintf(s, n + 8, "%.4s\n%s", good, good + 4);
    expect_refused(msg_data(1, 1, s), PROTO_E_PAYLOAD, "newline in base64");
    snprintf(s, n + 8, " %s", good);
    expect_refused(msg_data(1, 1, s), PROTO_E_PAYLOAD, "leading space");
    strcpy(s, good);
    s[0] = '-';
    s[5] = '_';
    expect_refused(msg_data(1, 1, s), PROTO_E_PAYLOAD, "URL-safe alphabet");
    if (good[n - 1] == '=') {
        strcpy(s, good);
        s[n - 1] = '\0';
        expect_refused(msg_data(1, 1, s), PROTO_E_PAYLOAD, "no padding");
    }
    /* Unused bits set before the padding: the same bytes, but not the one canonical form. */
    for (size_t len = 6; len < 9; len++) {
        char recs[16];
        memcpy(recs, "1 s aaaaaaaa", len - 1);
        recs[len - 1] = '\n';
        z = deflate_bytes(recs, len, &zl);
        char *d = b64(z, zl);
        free(z);
        size_t dl = strlen(d);
        if (d[dl - 1] != '=') {
            free(d);
            continue;
        }
        size_t last = d[dl - 2] == '=' ? dl - 3 : dl - 2;
        json_t *m2 = msg_data(1, 1, d);
        assert_int_equal(logbatch_decode(m2, NULL, NULL, NULL, 0), 0);
        json_decref(m2);
        d[last] = b64_alphabet[(strchr(b64_alphabet, d[last]) - b64_alphabet) | 1];
        expect_refused(msg_data(1, 1, d), PROTO_E_PAYLOAD, "non-canonical base64");
        free(d);
    }
    free(s);
    free(good);
}

static void test_decode_bad_zlib(void **state)
{
    (void)state;
    static const char records[] = "1 s a\n2 s b\n";
    size_t zl;
    uint8_t *z = deflate_bytes(records, strlen(records), &zl);
    uint8_t *buf = malloc(zl + 16);
    assert_non_null(buf);

    /* not zlib at all, and raw deflate or gzip framing */
    expect_refused(msg_zlib(1, 2, (const uint8_t *)records, strlen(records)), PROTO_E_PAYLOAD,
                   "plain text");
    expect_refused(msg_zlib(1, 2, z + 2, zl - 2), PROTO_E_PAYLOAD, "raw deflate");
    /* a flipped byte in the middle (the Adler-32 catches what the inflater does not) */
    memcpy(buf, z, zl);
    buf[zl / 2] ^= 0x55;
    expect_refused(msg_zlib(1, 2, buf, zl), PROTO_E_PAYLOAD, "corrupted");
    memcpy(buf, z, zl);
    buf[zl - 1] ^= 1;
    expect_refused(msg_zlib(1, 2, buf, zl), PROTO_E_PAYLOAD, "bad checksum");
    /* truncated: no end of stream */
    expect_refused(msg_zlib(1, 2, z, zl - 4), PROTO_E_PAYLOAD, "truncated");
    expect_refused(msg_zlib(1, 2, z, 1), PROTO_E_PAYLOAD, "one byte");
    /* trailing garbage, and a second stream after the first */
    memcpy(buf, z, zl);
    buf[zl] = 'x';
    expect_refused(msg_zlib(1, 2, buf, zl + 1), PROTO_E_PAYLOAD, "trailing byte");
    size_t z2l;
    uint8_t *z2 = deflate_bytes("", 0, &z2l);
    uint8_t *two = malloc(zl + z2l);
    assert_non_null(two);
    memcpy(two, z, zl);
    memcpy(two + zl, z2, z2l);
    expect_refused(msg_zlib(1, 2, two, zl + z2l), PROTO_E_PAYLOAD, "two streams");
    free(two);
    free(z2);

    /* a stream that asks for a preset dictionary */
    z_stream zs;
    memset(&zs, 0, sizeof(zs));
    assert_int_equal(deflateInit(&zs, 6), Z_OK);
    assert_int_equal(deflateSetDictionary(&zs, (const Bytef *)"1 s ", 4), Z_OK);
    uint8_t dz[128];
    zs.next_in = (Bytef *)records;
    zs.avail_in = (uInt)strlen(records);
    zs.next_out = dz;
    zs.avail_out = sizeof(dz);
    assert_int_equal(deflate(&zs, Z_FINISH), Z_STREAM_END);
    size_t dzl = sizeof(dz) - zs.avail_out;
    deflateEnd(&zs);
    expect_refused(msg_zlib(1, 2, dz, dzl), PROTO_E_PAYLOAD, "preset dictionary");
    free(buf);
    free(z);
}

static void test_decode_bomb(void **state)
{
    (void)state;
    /* 1 MiB of zeros is about 1 KiB of zlib: refused for what it inflates to. */
    size_t n = 1u << 20;
    uint8_t *zeros = calloc(1, n);
    assert_non_null(zeros);
    size_t zl;
    uint8_t *z = deflate_bytes(zeros, n, &zl);
    assert_true(zl < 4096);
    expect_refused(msg_zlib(1, 1, z, zl), PROTO_E_LENGTH, "zlib bomb");
    free(z);
    /* The same with valid-looking records, and lines claiming all of them. */
    for (size_t i = 0; i + 5 <= n; i += 5)
        memcpy(zeros + i, "1 s \n", 5);
    z = deflate_bytes(zeros, n / 5 * 5, &zl);
    expect_refused(msg_zlib(1, PROTO_MAX_LOG_RECORDS, z, zl), PROTO_E_LENGTH, "record bomb");
    free(z);
    free(zeros);
}

static void test_decode_data_length(void **state)
{
    (void)state;
    /* Longer than any 64 KiB batch can compress to: refused before decoding. */
    size_t limit = (compressBound(PROTO_MAX_LOG_BATCH) + 2) / 3 * 4;
    char *s = malloc(limit + 8);
    assert_non_null(s);
    memset(s, 'A', limit + 4);
    s[limit + 4] = '\0';
    expect_refused(msg_data(1, 1, s), PROTO_E_LENGTH, "data too long");
    /* At the limit it is decoded (and fails as zlib, not as too long). */
    s[limit] = '\0';
    expect_refused(msg_data(1, 1, s), PROTO_E_PAYLOAD, "data at the limit");
    free(s);
}

static void test_decode_schema(void **state)
{
    (void)state;
    static const char records[] = "1 s a\n";
    size_t zl;
    uint8_t *z = deflate_bytes(records, 6, &zl);
    char *d = b64(z, zl);
    free(z);

    expect_refused(msg_data(0, 1, d), PROTO_E_JSON, "seq 0");
    expect_refused(msg_data(-1, 1, d), PROTO_E_JSON, "seq -1");
    expect_refused(msg_data(1, 0, d), PROTO_E_JSON, "lines 0");
    expect_refused(msg_data(1, PROTO_MAX_LOG_RECORDS + 1, d), PROTO_E_JSON, "lines too big");
    json_t *m = msg_data(1, 1, d);
    json_object_del(m, "seq");
    expect_refused(m, PROTO_E_JSON, "no seq");
    m = msg_data(1, 1, d);
    json_object_set_new(m, "seq", json_real(1.0));
    expect_refused(m, PROTO_E_JSON, "seq 1.0");
    m = msg_data(1, 1, d);
    json_object_set_new(m, "lines", json_string("1"));
    expect_refused(m, PROTO_E_JSON, "lines a string");
    m = msg_data(1, 1, d);
    json_object_del(m, "data");
    expect_refused(m, PROTO_E_JSON, "no data");
    m = msg_data(1, 1, d);
    json_object_set_new(m, "data", json_null());
    expect_refused(m, PROTO_E_JSON, "data null");
    m = msg_data(1, 1, d);
    json_object_set_new(m, "type", json_string("metadata"));
    expect_refused(m, PROTO_E_JSON, "not logs");
    m = json_array();
    expect_refused(m, PROTO_E_JSON, "not an object");

    /* seq has no upper bound but int64; unknown members are ignored */
    m = msg_data(INT64_MAX, 1, d);
    json_object_set_new(m, "future", json_true());
    called = 0;
    assert_int_equal(logbatch_decode(m, count_calls, NULL, NULL, 0), 0);
    assert_int_equal(called, 1);
    json_decref(m);
    free(d);
}

static void test_decode_err_truncated(void **state)
{
    (void)state;
    json_t *m = msg_data(1, 1, "!!!!");
    char tiny[5];
    memset(tiny, 'z', sizeof(tiny));
    assert_int_equal(logbatch_decode(m, count_calls, NULL, tiny, sizeof(tiny)), PROTO_E_PAYLOAD);
    assert_int_equal(tiny[4], '\0');
    /* no err buffer at all, and no callback */
    assert_int_equal(logbatch_decode(m, NULL, NULL, NULL, 0), PROTO_E_PAYLOAD);
    json_decref(m);
    m = msg_records(1, 1, "1 s a\n", 6);
    assert_int_equal(logbatch_decode(m, NULL, NULL, NULL, 0), 0);
    json_decref(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),        cmocka_unit_test(test_message_shape),
        cmocka_unit_test(test_sanitise),          cmocka_unit_test(test_sanitise_cut),
        cmocka_unit_test(test_full_batch),        cmocka_unit_test(test_bad_source),
        cmocka_unit_test(test_decode_records_ok), cmocka_unit_test(test_decode_bad_records),
        cmocka_unit_test(test_decode_bad_base64), cmocka_unit_test(test_decode_bad_zlib),
        cmocka_unit_test(test_decode_bomb),       cmocka_unit_test(test_decode_data_length),
        cmocka_unit_test(test_decode_schema),     cmocka_unit_test(test_decode_err_truncated),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
