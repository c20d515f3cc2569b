#include "logbatch.h"

#include "proto.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

/* A record's longest form must fit an empty batch, so logbatch_add can always make progress. */
_Static_assert(PROTO_MAX_LOG_RECORD <= PROTO_MAX_LOG_BATCH, "a record must fit an empty batch");

#define LOGBATCH_ZLIB_LEVEL 6

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* U+FFFD REPLACEMENT CHARACTER, which stands for every byte we refuse to pass on. */
static const uint8_t replacement[3] = {0xef, 0xbf, 0xbd};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void logbatch_init(struct logbatch *b)
{
    b->len = 0;
    b->lines = 0;
}

static int source_char_ok(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == ':' || c == '/' || c == '-';
}

int logbatch_source_ok(const char *source, size_t len)
{
    if (!source || len == 0 || len > PROTO_MAX_LOG_SOURCE)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!source_char_ok((uint8_t)source[i]))
            return 0;
    return 1;
}

size_t proto_utf8_char(const uint8_t *p, size_t n)
{
    uint8_t c = p[0];
    if (c < 0x80)
        return 1;
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0)
            lo = 0xa0; /* overlong */
        else if (c == 0xed)
            hi = 0x9f; /* surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0)
            lo = 0x90; /* overlong */
        else if (c == 0xf4)
            hi = 0x8f; /* above U+10FFFF */
    } else {
        return 0;
    }
    if (n < len || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (p[i] < 0x80 || p[i] > 0xbf)
            return 0;
    return len;
}

/*
 * Writes text's clean form into out (at most PROTO_MAX_LOG_LINE bytes) and returns its length.
 * Each byte that does not start a well-formed character, and each LF and NUL, becomes one
 * U+FFFD; the text is cut before the first character that would not fit whole.
 */
static size_t sanitize(const uint8_t *s, size_t n, uint8_t *out)
{
    if (n > 0 && s[n - 1] == '\r')
        n--;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t cl = proto_utf8_char(s + i, n - i);
        const uint8_t *src = s + i;
        size_t ol = cl;
        if (cl == 0 || (cl == 1 && (s[i] == '\n' || s[i] == '\0'))) {
            src = replacement;
            ol = sizeof(replacement);
            cl = 1;
        }
        if (o + ol > PROTO_MAX_LOG_LINE)
            break;
        memcpy(out + o, src, ol);
        o += ol;
        i += cl;
    }
    return o;
}

static size_t put_decimal(uint8_t *out, uint64_t v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = (uint8_t)tmp[n - 1 - i];
    return n;
}

int logbatch_add(struct logbatch *b, int64_t time_ms, const char *source, const char *text,
                 size_t len)
{
    if (time_ms < 0)
        return PROTO_E_PAYLOAD;
    size_t sl = source ? strnlen(source, PROTO_MAX_LOG_SOURCE + 1) : 0;
    if (!logbatch_source_ok(source, sl))
        return PROTO_E_PAYLOAD;
    if (b->lines >= PROTO_MAX_LOG_RECORDS)
        return PROTO_E_LENGTH;

    uint8_t rec[PROTO_MAX_LOG_RECORD];
    size_t n = put_decimal(rec, (uint64_t)time_ms);
    rec[n++] = ' ';
    memcpy(rec + n, source, sl);
    n += sl;
    rec[n++] = ' ';
    n += sanitize((const uint8_t *)(text ? text : ""), text ? len : 0, rec + n);
    rec[n++] = '\n';
    if (n > PROTO_MAX_LOG_BATCH - b->len)
        return PROTO_E_LENGTH;
    memcpy(b->buf + b->len, rec, n);
    b->len += n;
    b->lines++;
    return 0;
}

static size_t b64_len(size_t n)
{
    return (n + 2) / 3 * 4;
}

static void b64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | in[i + 2];
        out[o++] = b64_alphabet[v >> 18];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = b64_alphabet[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        out[o++] = b64_alphabet[v >> 18];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
}

json_t *logbatch_message(const struct logbatch *b, uint64_t seq)
{
    if (b->lines == 0 || b->len == 0 || seq == 0 || seq > (uint64_t)INT64_MAX)
        return NULL;
    uLongf zlen = compressBound((uLong)b->len);
    uint8_t *z = malloc(zlen);
    char *text = NULL;
    json_t *msg = NULL;
    if (!z)
        goto out;
    if (compress2(z, &zlen, b->buf, (uLong)b->len, LOGBATCH_ZLIB_LEVEL) != Z_OK)
        goto out;
    size_t tl = b64_len(zlen);
    text = malloc(tl);
    if (!text)
        goto out;
    b64_encode(z, zlen, text);
    json_t *data = json_stringn_nocheck(text, tl);
    msg = json_object();
    if (!data || !msg || json_object_set_new(msg, "type", json_string("logs")) ||
        json_object_set_new(msg, "seq", json_integer((json_int_t)seq)) ||
        json_object_set_new(msg, "lines", json_integer((json_int_t)b->lines)) ||
        json_object_set_new(msg, "data", data)) {
        json_decref(msg);
        msg = NULL;
    }
out:
    free(text);
    free(z);
    return msg;
}

/*
 * The longest "data" we accept: the base64 form of the most a PROTO_MAX_LOG_BATCH batch can
 * take after zlib (its worst case, incompressible input, stays within compressBound).
 */
static size_t max_data_len(void)
{
    return b64_len(compressBound(PROTO_MAX_LOG_BATCH));
}

static int b64_value(uint8_t c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/*
 * Strict standard base64 (RFC 4648 section 4): groups of four, '=' padding only at the end,
 * no whitespace, and the unused bits of the last character zero, so each byte string has
 * exactly one accepted encoding. Returns the decoded length or -1.
 */
static long b64_decode(const char *in, size_t n, uint8_t *out)
{
    if (n == 0 || n % 4 != 0)
        return -1;
    size_t pad = 0;
    if (in[n - 1] == '=')
        pad = in[n - 2] == '=' ? 2 : 1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int last = i + 4 == n;
        int v[4];
        for (size_t k = 0; k < 4; k++) {
            if (last && k >= 4 - pad) {
                v[k] = 0;
                continue;
            }
            v[k] = b64_value((uint8_t)in[i + k]);
            if (v[k] < 0)
                return -1;
        }
        uint32_t w = ((uint32_t)v[0] << 18) | ((uint32_t)v[1] << 12) | ((uint32_t)v[2] << 6) |
                     (uint32_t)v[3];
        out[o++] = (uint8_t)(w >> 16);
        if (last && pad == 2) {
            if (w & 0xffff)
                return -1;
            break;
        }
        out[o++] = (uint8_t)(w >> 8);
        if (last && pad == 1) {
            if (w & 0xff)
                return -1;
            break;
        }
        out[o++] = (uint8_t)w;
    }
    return (long)o;
}

/*
 * Inflates exactly one zlib stream that must take all of in and give at most
 * PROTO_MAX_LOG_BATCH bytes. out has room for one byte more, which is how a stream that
 * would give more is caught without inflating the rest of it.
 */
static int inflate_batch(const uint8_t *in, size_t n, uint8_t *out, size_t *outlen, char *err,
                         size_t errlen)
{
    z_stream zs;
    memset(&zs, 0, sizeof(zs));
    if (inflateInit(&zs) != Z_OK) {
        set_err(err, errlen, "out of memory");
        return PROTO_E_PAYLOAD;
    }
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)n;
    zs.next_out = out;
    zs.avail_out = PROTO_MAX_LOG_BATCH + 1;
    int zr = inflate(&zs, Z_FINISH);
    size_t produced = PROTO_MAX_LOG_BATCH + 1 - zs.avail_out;
    size_t left = zs.avail_in;
    const char *msg = zs.msg;
    inflateEnd(&zs);

    if (produced > PROTO_MAX_LOG_BATCH) {
        set_err(err, errlen, "\"data\" inflates to more than %u bytes", PROTO_MAX_LOG_BATCH);
        return PROTO_E_LENGTH;
    }
    if (zr == Z_STREAM_END) {
        if (left != 0) {
            set_err(err, errlen, "%zu bytes after the end of the zlib stream", left);
            return PROTO_E_PAYLOAD;
        }
        *outlen = produced;
        return 0;
    }
    if (zr == Z_BUF_ERROR) {
        set_err(err, errlen, "the zlib stream is truncated");
        return PROTO_E_PAYLOAD;
    }
    if (zr == Z_NEED_DICT) {
        set_err(err, errlen, "the zlib stream wants a preset dictionary");
        return PROTO_E_PAYLOAD;
    }
    if (zr == Z_MEM_ERROR) {
        set_err(err, errlen, "out of memory");
        return PROTO_E_PAYLOAD;
    }
    set_err(err, errlen, "bad zlib stream: %s", msg ? msg : "error");
    return PROTO_E_PAYLOAD;
}

/*
 * Parses the record at p[0..n) into r. Returns the bytes it takes (through its LF) or
 * PROTO_E_PAYLOAD with a reason in err.
 */
static long parse_record(const uint8_t *p, size_t n, struct log_record *r, char *err, size_t errlen)
{
    size_t i = 0;
    uint64_t t = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9') {
        if (i == PROTO_MAX_LOG_TIME_DIGITS) {
            set_err(err, errlen, "time has more than %u digits", PROTO_MAX_LOG_TIME_DIGITS);
            return PROTO_E_PAYLOAD;
        }
        t = t * 10 + (uint64_t)(p[i] - '0');
        i++;
    }
    /* One spelling per time: no leading zeros (0 is "0"), as logbatch_add writes it. */
    const char *bad = NULL;
    if (i == 0)
        bad = "time is not a decimal number";
    else if (p[0] == '0' && i > 1)
        bad = "time has a leading zero";
    else if (t > (uint64_t)INT64_MAX)
        bad = "time is out of range";
    if (bad) {
        set_err(err, errlen, "%s", bad);
        return PROTO_E_PAYLOAD;
    }
    if (i == n || p[i] != ' ') {
        set_err(err, errlen, "no space after the time");
        return PROTO_E_PAYLOAD;
    }
    size_t s0 = ++i;
    while (i < n && i - s0 <= PROTO_MAX_LOG_SOURCE && p[i] != ' ')
        i++;
    if (i == n || p[i] != ' ' || !logbatch_source_ok((const char *)p + s0, i - s0)) {
        set_err(err, errlen, "bad source (1 to %u bytes of A-Za-z0-9._:/-, then a space)",
                PROTO_MAX_LOG_SOURCE);
        return PROTO_E_PAYLOAD;
    }
    size_t t0 = ++i;
    size_t room = n - t0 < PROTO_MAX_LOG_LINE + 1 ? n - t0 : PROTO_MAX_LOG_LINE + 1;
    const uint8_t *lf = memchr(p + t0, '\n', room);
    if (!lf) {
        if (room > PROTO_MAX_LOG_LINE)
            set_err(err, errlen, "text is longer than %u bytes", PROTO_MAX_LOG_LINE);
        else
            set_err(err, errlen, "the last record does not end in LF");
        return PROTO_E_PAYLOAD;
    }
    size_t tl = (size_t)(lf - (p + t0));
    for (size_t k = 0; k < tl;) {
        size_t cl = proto_utf8_char(p + t0 + k, tl - k);
        if (cl == 0 || p[t0 + k] == '\0') {
            set_err(err, errlen, cl ? "text holds a NUL byte" : "text is not valid UTF-8");
            return PROTO_E_PAYLOAD;
        }
        k += cl;
    }
    r->time_ms = (int64_t)t;
    r->source = (const char *)p + s0;
    r->source_len = t0 - 1 - s0;
    r->text = (const char *)p + t0;
    r->text_len = tl;
    return (long)(t0 + tl + 1);
}

/* Checks every record and their count; calls cb for each only if cb is set. */
static int walk_records(const uint8_t *p, size_t n, json_int_t lines,
                        void (*cb)(void *ud, const struct log_record *r), void *ud, char *err,
                        size_t errlen)
{
    json_int_t count = 0;
    for (size_t off = 0; off < n;) {
        struct log_record r;
        char why[128];
        long used = parse_record(p + off, n - off, &r, why, sizeof(why));
        if (used < 0) {
            set_err(err, errlen, "record %lld: %s", (long long)count + 1, why);
            return PROTO_E_PAYLOAD;
        }
        if (++count > lines) {
            set_err(err, errlen, "more records than \"lines\" (%lld)", (long long)lines);
            return PROTO_E_PAYLOAD;
        }
        if (cb)
            cb(ud, &r);
        off += (size_t)used;
    }
    if (count != lines) {
        set_err(err, errlen, "the batch holds %lld records, \"lines\" says %lld", (long long)count,
                (long long)lines);
        return PROTO_E_PAYLOAD;
    }
    return 0;
}

int logbatch_decode(const json_t *msg, void (*cb)(void *ud, const struct log_record *r), void *ud,
                    char *err, size_t errlen)
{
    json_t *type = json_object_get(msg, "type");
    if (!json_is_string(type) || strcmp(json_string_value(type), "logs") != 0) {
        set_err(err, errlen, "not a \"logs\" message");
        return PROTO_E_JSON;
    }
    int rc = proto_control_validate(msg, err, errlen);
    if (rc < 0)
        return rc;
    json_int_t lines = json_integer_value(json_object_get(msg, "lines"));
    json_t *data = json_object_get(msg, "data");
    size_t dl = json_string_length(data);
    if (dl > max_data_len()) {
        set_err(err, errlen, "\"data\" is %zu bytes, more than the %zu a batch can take", dl,
                max_data_len());
        return PROTO_E_LENGTH;
    }

    /* Both sizes are bounded by our limits, never by what the peer claims. */
    uint8_t *z = malloc(dl / 4 * 3 + 1);
    uint8_t *out = malloc(PROTO_MAX_LOG_BATCH + 1);
    size_t outlen = 0;
    if (!z || !out) {
        set_err(err, errlen, "out of memory");
        rc = PROTO_E_PAYLOAD;
        goto out;
    }
    long zl = b64_decode(json_string_value(data), dl, z);
    if (zl < 0) {
        set_err(err, errlen, "\"data\" is not canonical base64");
        rc = PROTO_E_PAYLOAD;
        goto out;
    }
    rc = inflate_batch(z, (size_t)zl, out, &outlen, err, errlen);
    if (rc < 0)
        goto out;
    rc = walk_records(out, outlen, lines, NULL, NULL, err, errlen);
    if (rc < 0)
        goto out;
    if (cb)
        walk_records(out, outlen, lines, cb, ud, NULL, 0);
out:
    free(out);
    free(z);
    return rc;
}
