#include "proto.h"

#include "logbatch.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

const char *proto_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case PROTO_E_SHORT:
        return "incomplete frame";
    case PROTO_E_VERSION:
        return "unsupported protocol version";
    case PROTO_E_TYPE:
        return "unknown frame type";
    case PROTO_E_FLAGS:
        return "undefined flag set";
    case PROTO_E_LENGTH:
        return "bad payload length";
    case PROTO_E_STREAM:
        return "frame on the wrong stream";
    case PROTO_E_PAYLOAD:
        return "malformed payload";
    case PROTO_E_KIND:
        return "unknown stream kind";
    case PROTO_E_JSON:
        return "malformed control message";
    default:
        return "unknown error";
    }
}

const char *proto_type_name(int type)
{
    static const char *const names[] = {
        NULL,     "HELLO", "OPEN", "OPEN_OK", "OPEN_FAIL", "DATA",
        "CREDIT", "RST",   "PING", "PONG",    "GOAWAY",    "CONTROL",
    };
    if (type <= 0 || type > PROTO_CONTROL)
        return "UNKNOWN";
    return names[type];
}

const char *proto_code_name(uint32_t code)
{
    static const char *const names[] = {
        "ok",
        "protocol error",
        "flow control error",
        "too many streams",
        "connection refused",
        "unreachable",
        "timed out",
        "unsupported",
        "forbidden",
        "internal error",
        "cancelled",
        "shutting down",
        "replaced by a newer connection",
    };
    if (code > PROTO_CODE_MAX)
        return "unknown error";
    return names[code];
}

/*
 * The largest payload each type may carry, checked before a byte of it is buffered. DATA's
 * limit is the receiver's advertised max_frame_payload; fixed-size types must match exactly.
 */
static int check_length(const struct proto_header *h, uint32_t max_data)
{
    uint32_t n = h->length;
    switch (h->type) {
    case PROTO_HELLO:
        return n <= PROTO_MAX_HELLO_SETTINGS * 6u && n % 6u == 0;
    case PROTO_OPEN:
        return n >= 4 && n <= PROTO_MAX_OPEN;
    case PROTO_OPEN_OK:
        return n == 0;
    case PROTO_OPEN_FAIL:
    case PROTO_RST:
        return n >= 4 && n <= PROTO_REASON_MAX;
    case PROTO_DATA:
        return n <= max_data;
    case PROTO_CREDIT:
        return n == 8;
    case PROTO_PING:
    case PROTO_PONG:
        return n == PROTO_PING_SIZE;
    case PROTO_GOAWAY:
        return n >= 8 && n <= PROTO_GOAWAY_MAX;
    case PROTO_CONTROL:
        return n > 0 && n <= PROTO_MAX_CONTROL;
    }
    return 0;
}

static int is_session_type(uint8_t type)
{
    return type == PROTO_HELLO || type == PROTO_PING || type == PROTO_PONG ||
           type == PROTO_GOAWAY || type == PROTO_CONTROL;
}

int proto_header_decode(const uint8_t *buf, size_t len, uint32_t max_data, struct proto_header *h)
{
    if (len < PROTO_HEADER_SIZE)
        return PROTO_E_SHORT;
    h->version = buf[0];
    h->type = buf[1];
    h->flags = get16(buf + 2);
    h->stream = get32(buf + 4);
    h->length = get32(buf + 8);
    if (h->version != PROTO_VERSION)
        return PROTO_E_VERSION;
    if (h->type < PROTO_HELLO || h->type > PROTO_CONTROL)
        return PROTO_E_TYPE;
    if (h->flags & ~(h->type == PROTO_DATA ? PROTO_FLAG_FIN : 0u))
        return PROTO_E_FLAGS;
    if (is_session_type(h->type) != (h->stream == 0))
        return PROTO_E_STREAM;
    if (!check_length(h, max_data))
        return PROTO_E_LENGTH;
    return 0;
}

void proto_header_encode(uint8_t out[PROTO_HEADER_SIZE], uint8_t type, uint16_t flags,
                         uint32_t stream, uint32_t length)
{
    out[0] = PROTO_VERSION;
    out[1] = type;
    put16(out + 2, flags);
    put32(out + 4, stream);
    put32(out + 8, length);
}

void proto_hello_default(struct proto_hello *h)
{
    h->max_frame_payload = PROTO_DEFAULT_FRAME_PAYLOAD;
    h->initial_window = PROTO_DEFAULT_WINDOW;
    h->max_streams = PROTO_DEFAULT_MAX_STREAMS;
}

int proto_hello_decode(const uint8_t *p, size_t len, struct proto_hello *out)
{
    if (len % 6u != 0 || len > PROTO_MAX_HELLO_SETTINGS * 6u)
        return PROTO_E_LENGTH;
    proto_hello_default(out);
    for (size_t i = 0; i < len; i += 6) {
        uint16_t id = get16(p + i);
        uint32_t v = get32(p + i + 2);
        switch (id) {
        case PROTO_SETTING_MAX_FRAME_PAYLOAD:
            if (v < PROTO_MIN_FRAME_PAYLOAD || v > PROTO_MAX_FRAME_PAYLOAD)
                return PROTO_E_PAYLOAD;
            out->max_frame_payload = v;
            break;
        case PROTO_SETTING_INITIAL_WINDOW:
            if (v < PROTO_MIN_WINDOW || v > PROTO_MAX_WINDOW)
                return PROTO_E_PAYLOAD;
            out->initial_window = v;
            break;
        case PROTO_SETTING_MAX_STREAMS:
            if (v < 1 || v > PROTO_MAX_STREAMS_LIMIT)
                return PROTO_E_PAYLOAD;
            out->max_streams = v;
            break;
        default:
            break; /* unknown settings are ignored: forward compatibility */
        }
    }
    return 0;
}

size_t proto_hello_encode(const struct proto_hello *h, uint8_t *out)
{
    put16(out, PROTO_SETTING_MAX_FRAME_PAYLOAD);
    put32(out + 2, h->max_frame_payload);
    put16(out + 6, PROTO_SETTING_INITIAL_WINDOW);
    put32(out + 8, h->initial_window);
    put16(out + 12, PROTO_SETTING_MAX_STREAMS);
    put32(out + 14, h->max_streams);
    return PROTO_HELLO_SIZE;
}

/* A host is 1..255 bytes of letters, digits and ".-:_%" (names, IPv4, IPv6, zone ids). */
static int host_ok(const uint8_t *s, size_t n)
{
    if (n == 0 || n > PROTO_MAX_HOST)
        return 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '-' || c == ':' || c == '_' || c == '%';
        if (!ok)
            return 0;
    }
    return 1;
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/* id[16] | rows u16 | cols u16 | options u8 | reserved u8 | cmd_len u16 | command */
static int pty_open_decode(const uint8_t *p, size_t len, struct proto_open *out)
{
    if (len < PROTO_PTY_OPEN_FIXED)
        return PROTO_E_PAYLOAD;
    size_t cl = get16(p + 22);
    if (all_zero(p, PROTO_PTY_ID_SIZE) || (p[20] & ~PROTO_PTY_OPT_ZLIB) || p[21] != 0 ||
        cl > PROTO_MAX_PTY_COMMAND || len != PROTO_PTY_OPEN_FIXED + cl ||
        memchr(p + PROTO_PTY_OPEN_FIXED, 0, cl))
        return PROTO_E_PAYLOAD;
    memcpy(out->pty_id, p, PROTO_PTY_ID_SIZE);
    out->rows = get16(p + 16);
    out->cols = get16(p + 18);
    out->pty_options = p[20];
    memcpy(out->command, p + PROTO_PTY_OPEN_FIXED, cl);
    out->command[cl] = '\0';
    return 0;
}

static int pty_open_encode(const struct proto_open *o, uint8_t *out, size_t cap)
{
    size_t cl = strnlen(o->command, sizeof(o->command));
    if (cl > PROTO_MAX_PTY_COMMAND || all_zero(o->pty_id, PROTO_PTY_ID_SIZE) ||
        (o->pty_options & ~PROTO_PTY_OPT_ZLIB) || cap < 4 + PROTO_PTY_OPEN_FIXED + cl)
        return PROTO_E_PAYLOAD;
    uint8_t *b = out + 4;
    memcpy(b, o->pty_id, PROTO_PTY_ID_SIZE);
    put16(b + 16, o->rows);
    put16(b + 18, o->cols);
    b[20] = o->pty_options;
    b[21] = 0;
    put16(b + 22, (uint16_t)cl);
    memcpy(b + PROTO_PTY_OPEN_FIXED, o->command, cl);
    return (int)(4 + PROTO_PTY_OPEN_FIXED + cl);
}

int proto_ptyrec_decode(const uint8_t *p, size_t len, struct proto_ptyrec *out)
{
    if (len < PROTO_PTYREC_HEADER)
        return 0;
    memset(out, 0, sizeof(*out));
    out->type = p[0];
    out->len = get16(p + 1);
    if (len < PROTO_PTYREC_HEADER + (size_t)out->len)
        return 0;
    out->body = p + PROTO_PTYREC_HEADER;
    switch (out->type) {
    case PROTO_PTYREC_DATA:
        if (out->len == 0)
            return PROTO_E_PAYLOAD;
        break;
    case PROTO_PTYREC_RESIZE:
        if (out->len != 4)
            return PROTO_E_PAYLOAD;
        out->rows = get16(out->body);
        out->cols = get16(out->body + 2);
        break;
    case PROTO_PTYREC_EXIT:
        if (out->len != 2 || out->body[0] > 1)
            return PROTO_E_PAYLOAD;
        out->exit_how = out->body[0];
        out->exit_value = out->body[1];
        break;
    default:
        break; /* a later version's record: the caller skips it */
    }
    return (int)(PROTO_PTYREC_HEADER + out->len);
}

void proto_ptyrec_header(uint8_t type, uint16_t len, uint8_t *out)
{
    out[0] = type;
    put16(out + 1, len);
}

int proto_open_decode(const uint8_t *p, size_t len, struct proto_open *out)
{
    if (len < 4 || len > PROTO_MAX_OPEN)
        return PROTO_E_PAYLOAD;
    memset(out, 0, sizeof(*out));
    out->kind = p[0];
    out->flags = p[1];
    if (out->flags != 0 || get16(p + 2) != 0)
        return PROTO_E_PAYLOAD;
    p += 4;
    len -= 4;
    switch (out->kind) {
    case PROTO_KIND_TCP: {
        if (len < 3)
            return PROTO_E_PAYLOAD;
        out->port = get16(p);
        size_t hl = p[2];
        if (out->port == 0 || len != 3 + hl || !host_ok(p + 3, hl))
            return PROTO_E_PAYLOAD;
        memcpy(out->host, p + 3, hl);
        out->host[hl] = '\0';
        return 0;
    }
    case PROTO_KIND_SSH:
        return len == 0 ? 0 : PROTO_E_PAYLOAD;
    case PROTO_KIND_PTY:
        return pty_open_decode(p, len, out);
    default:
        return PROTO_E_KIND;
    }
}

int proto_open_encode(const struct proto_open *o, uint8_t *out, size_t cap)
{
    if (cap < 4)
        return PROTO_E_PAYLOAD;
    out[0] = o->kind;
    out[1] = 0;
    put16(out + 2, 0);
    switch (o->kind) {
    case PROTO_KIND_TCP: {
        size_t hl = strnlen(o->host, sizeof(o->host));
        if (o->port == 0 || !host_ok((const uint8_t *)o->host, hl) || cap < 7 + hl)
            return PROTO_E_PAYLOAD;
        put16(out + 4, o->port);
        out[6] = (uint8_t)hl;
        memcpy(out + 7, o->host, hl);
        return (int)(7 + hl);
    }
    case PROTO_KIND_SSH:
        return 4;
    case PROTO_KIND_PTY:
        return pty_open_encode(o, out, cap);
    default:
        return PROTO_E_KIND;
    }
}

/* Reason texts are printable: no control characters, so they can be logged as they are. */
static int text_ok(const uint8_t *s, size_t n)
{
    if (n > PROTO_MAX_TEXT)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] == 0x7f)
            return 0;
    return 1;
}

int proto_reason_decode(const uint8_t *p, size_t len, struct proto_reason *out)
{
    if (len < 4 || !text_ok(p + 4, len - 4))
        return PROTO_E_PAYLOAD;
    out->last_stream = 0;
    out->code = get32(p);
    out->text = (const char *)p + 4;
    out->text_len = len - 4;
    return 0;
}

int proto_goaway_decode(const uint8_t *p, size_t len, struct proto_reason *out)
{
    if (len < 8 || !text_ok(p + 8, len - 8))
        return PROTO_E_PAYLOAD;
    out->last_stream = get32(p);
    out->code = get32(p + 4);
    out->text = (const char *)p + 8;
    out->text_len = len - 8;
    return 0;
}

/* Copies text, dropping control characters so that what we send always decodes. */
static size_t put_text(uint8_t *out, const char *text)
{
    size_t n = 0;
    for (; text && text[n] && n < PROTO_MAX_TEXT; n++) {
        uint8_t c = (uint8_t)text[n];
        out[n] = (c < 0x20 || c == 0x7f) ? '?' : c;
    }
    return n;
}

size_t proto_reason_encode(uint32_t code, const char *text, uint8_t *out)
{
    put32(out, code);
    return 4 + put_text(out + 4, text);
}

size_t proto_goaway_encode(uint32_t last_stream, uint32_t code, const char *text, uint8_t *out)
{
    put32(out, last_stream);
    put32(out + 4, code);
    return 8 + put_text(out + 8, text);
}

int proto_credit_decode(const uint8_t *p, size_t len, uint64_t *offset)
{
    if (len != 8)
        return PROTO_E_LENGTH;
    *offset = ((uint64_t)get32(p) << 32) | get32(p + 4);
    return 0;
}

void proto_credit_encode(uint64_t offset, uint8_t out[8])
{
    put32(out, (uint32_t)(offset >> 32));
    put32(out + 4, (uint32_t)offset);
}

/* ---- control messages ---- */

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        if (err && errlen)                                                                         \
            snprintf(err, errlen, __VA_ARGS__);                                                    \
        return PROTO_E_JSON;                                                                       \
    } while (0)

/* Longest string member we accept in a known control message. */
#define PROTO_MAX_FIELD 4096u

/* A string member of min..max bytes; absent is fine unless required. */
/* *v gets o's member key, or NULL when it is absent: an error only if it is required. */
static int member(const json_t *o, const char *key, int required, json_t **v, char *err,
                  size_t errlen)
{
    *v = json_object_get(o, key);
    if (!*v && required)
        FAIL("\"%s\" is missing", key);
    return 0;
}

static int want_string_len(const json_t *o, const char *key, int required, size_t min, size_t max,
                           char *err, size_t errlen)
{
    json_t *v;
    if (member(o, key, required, &v, err, errlen) < 0)
        return -1;
    if (!v)
        return 0;
    if (!json_is_string(v))
        FAIL("\"%s\" must be a string", key);
    if (json_string_length(v) > max)
        FAIL("\"%s\" is longer than %zu bytes", key, max);
    if (json_string_length(v) < min)
        FAIL("\"%s\" must not be empty", key);
    return 0;
}

static int want_string(const json_t *o, const char *key, int required, char *err, size_t errlen)
{
    return want_string_len(o, key, required, 0, PROTO_MAX_FIELD, err, errlen);
}

static int want_string_array(const json_t *o, const char *key, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return 0;
    if (!json_is_array(v))
        FAIL("\"%s\" must be an array of strings", key);
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e)
    {
        if (!json_is_string(e) || json_string_length(e) > PROTO_MAX_FIELD)
            FAIL("\"%s\" must be an array of strings", key);
    }
    return 0;
}

static int want_string_map(const json_t *o, const char *key, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return 0;
    if (!json_is_object(v))
        FAIL("\"%s\" must be an object of strings", key);
    const char *k;
    json_t *e;
    json_object_foreach((json_t *)v, k, e)
    {
        if (!json_is_string(e))
            FAIL("\"%s\".\"%s\" must be a string", key, k);
        if (strlen(k) > PROTO_MAX_FIELD || json_string_length(e) > PROTO_MAX_FIELD)
            FAIL("\"%s\" has a name or value longer than %u bytes", key, PROTO_MAX_FIELD);
    }
    return 0;
}

static int want_uint(const json_t *o, const char *key, json_int_t max, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > max)
        FAIL("\"%s\" must be an integer from 0 to %lld", key, (long long)max);
    return 0;
}

/* Counters by name: at most PROTO_MAX_STATS_KEYS names of 1..64 bytes, integers >= 0. */
static int want_count_map(const json_t *o, const char *key, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return 0;
    if (!json_is_object(v) || json_object_size(v) > PROTO_MAX_STATS_KEYS)
        FAIL("\"%s\" must be an object of at most %u counters", key, PROTO_MAX_STATS_KEYS);
    const char *k;
    json_t *e;
    json_object_foreach((json_t *)v, k, e)
    {
        if (strlen(k) == 0 || strlen(k) > 64 || !json_is_integer(e) || json_integer_value(e) < 0)
            FAIL("\"%s\" must map names of 1 to 64 bytes to integers >= 0", key);
    }
    return 0;
}

/* "ports": an array of {port 1..65535, family, address, process?}. */
static int want_ports(const json_t *o, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, "ports");
    if (!json_is_array(v))
        FAIL("\"ports\" must be an array");
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e)
    {
        if (!json_is_object(e))
            FAIL("\"ports\" must hold objects");
        if (!json_object_get(e, "port") || want_uint(e, "port", 65535, err, errlen) ||
            json_integer_value(json_object_get(e, "port")) == 0 ||
            want_string(e, "family", 1, err, errlen) || want_string(e, "address", 1, err, errlen) ||
            want_string(e, "process", 0, err, errlen))
            FAIL("each port needs \"port\" 1..65535, \"family\" and \"address\"");
    }
    json_t *a = json_object_get(o, "available");
    if (a && !json_is_boolean(a))
        FAIL("\"available\" must be true or false");
    return 0;
}

/* An integer member in min..max; absent is fine unless required. */
static int want_int(const json_t *o, const char *key, int required, json_int_t min, json_int_t max,
                    char *err, size_t errlen)
{
    json_t *v;
    if (member(o, key, required, &v, err, errlen) < 0)
        return -1;
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        FAIL("\"%s\" must be an integer from %lld to %lld", key, (long long)min, (long long)max);
    return 0;
}

static int want_bool(const json_t *o, const char *key, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (v && !json_is_boolean(v))
        FAIL("\"%s\" must be true or false", key);
    return 0;
}

/*
 * A required name (a script's name, a metadata key): 1..max bytes of A-Za-z0-9._-, so it
 * can be used in log sources, file names and metric labels as it is.
 */
static int want_name(const json_t *o, const char *key, size_t max, char *err, size_t errlen)
{
    if (want_string_len(o, key, 1, 1, max, err, errlen))
        return PROTO_E_JSON;
    const char *s = json_string_value(json_object_get(o, key));
    size_t n = json_string_length(json_object_get(o, key));
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            FAIL("\"%s\" must be 1 to %zu bytes of A-Za-z0-9._-", key, max);
    }
    return 0;
}

/* Shell text for /bin/sh -c: 1..PROTO_MAX_SCRIPT_TEXT bytes, no NUL (it would cut it). */
static int want_script(const json_t *o, char *err, size_t errlen)
{
    if (want_string_len(o, "script", 1, 1, PROTO_MAX_SCRIPT_TEXT, err, errlen))
        return PROTO_E_JSON;
    json_t *v = json_object_get(o, "script");
    if (memchr(json_string_value(v), 0, json_string_length(v)))
        FAIL("\"script\" must not hold a NUL byte");
    return 0;
}

/* Puts "ARRAY[i]: " before the reason already in err. */
static int in_item(const char *array, size_t i, char *err, size_t errlen)
{
    if (err && errlen) {
        char why[256];
        snprintf(why, sizeof(why), "%s", err);
        snprintf(err, errlen, "\"%s\"[%zu]: %s", array, i, why);
    }
    return PROTO_E_JSON;
}

/*
 * The array member key of objects (at most max; required or optional, at least one entry
 * when required), each checked by item. If unique is set, the string member unique of every
 * entry must differ from the others'.
 */
static int want_objects(const json_t *o, const char *key, int required, size_t max,
                        int (*item)(const json_t *e, char *err, size_t errlen), const char *unique,
                        char *err, size_t errlen)
{
    json_t *v;
    if (member(o, key, required, &v, err, errlen) < 0)
        return -1;
    if (!v)
        return 0;
    if (!json_is_array(v) || json_array_size(v) > max || (required && json_array_size(v) == 0))
        FAIL("\"%s\" must be an array of %d to %zu objects", key, required ? 1 : 0, max);
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e)
    {
        if (!json_is_object(e))
            FAIL("\"%s\" must hold objects", key);
        if (item(e, err, errlen))
            return in_item(key, i, err, errlen);
        if (!unique)
            continue;
        json_t *name = json_object_get(e, unique);
        for (size_t j = 0; j < i; j++)
            if (json_equal(name, json_object_get(json_array_get(v, j), unique)))
                FAIL("\"%s\"[%zu]: \"%s\" \"%s\" is there twice", key, i, unique,
                     json_string_value(name));
    }
    return 0;
}

/* manifest "scripts": {name, script, run_on, timeout?, blocks_login?} */
static int want_script_item(const json_t *e, char *err, size_t errlen)
{
    if (want_name(e, "name", PROTO_MAX_SCRIPT_NAME, err, errlen) || want_script(e, err, errlen) ||
        want_string(e, "run_on", 1, err, errlen) ||
        want_int(e, "timeout", 0, 1, PROTO_MAX_SCRIPT_TIMEOUT, err, errlen) ||
        want_bool(e, "blocks_login", err, errlen))
        return PROTO_E_JSON;
    const char *run_on = json_string_value(json_object_get(e, "run_on"));
    int start = strcmp(run_on, "start") == 0;
    if (!start && strcmp(run_on, "stop") != 0)
        FAIL("\"run_on\" must be \"start\" or \"stop\"");
    if (!start && json_is_true(json_object_get(e, "blocks_login")))
        FAIL("\"blocks_login\" is for \"start\" scripts only");
    return 0;
}

/* manifest "metadata": {key, script, interval?, timeout?} */
static int want_metadata_spec(const json_t *e, char *err, size_t errlen)
{
    if (want_name(e, "key", PROTO_MAX_METADATA_KEY, err, errlen) || want_script(e, err, errlen) ||
        want_int(e, "interval", 0, 1, PROTO_MAX_METADATA_INTERVAL, err, errlen) ||
        want_int(e, "timeout", 0, 1, PROTO_MAX_METADATA_TIMEOUT, err, errlen))
        return PROTO_E_JSON;
    return 0;
}

/* metadata message "items": {key, value, error, collected_at} */
static int want_metadata_item(const json_t *e, char *err, size_t errlen)
{
    if (want_name(e, "key", PROTO_MAX_METADATA_KEY, err, errlen) ||
        want_string_len(e, "value", 1, 0, PROTO_MAX_METADATA_VALUE, err, errlen) ||
        want_string_len(e, "error", 1, 0, PROTO_MAX_METADATA_ERROR, err, errlen) ||
        want_int(e, "collected_at", 1, 0, INT64_MAX, err, errlen))
        return PROTO_E_JSON;
    return 0;
}

/* ports "forward_ports": {port, host?} */
static int want_forward_port(const json_t *e, char *err, size_t errlen)
{
    if (want_int(e, "port", 1, 1, 65535, err, errlen) ||
        want_string_len(e, "host", 0, 1, PROTO_MAX_HOST, err, errlen))
        return PROTO_E_JSON;
    return 0;
}

/* Indexed by enum proto_lifecycle; the NULL ends the list for proto_lifecycle_states. */
static const char *const lifecycle_names[PROTO_LC_COUNT + 1] = {
    [PROTO_LC_CREATED] = "created",
    [PROTO_LC_STARTING] = "starting",
    [PROTO_LC_READY] = "ready",
    [PROTO_LC_START_ERROR] = "start_error",
    [PROTO_LC_START_TIMEOUT] = "start_timeout",
    [PROTO_LC_SHUTTING_DOWN] = "shutting_down",
    [PROTO_LC_SHUTDOWN_ERROR] = "shutdown_error",
    [PROTO_LC_SHUTDOWN_TIMEOUT] = "shutdown_timeout",
    [PROTO_LC_OFF] = "off",
    [PROTO_LC_COUNT] = NULL,
};

const char *const *proto_lifecycle_states(void)
{
    return lifecycle_names;
}

int proto_lifecycle_state(const char *name)
{
    for (int i = 0; name && i < PROTO_LC_COUNT; i++)
        if (strcmp(name, lifecycle_names[i]) == 0)
            return i;
    return -1;
}

const char *proto_lifecycle_name(int state)
{
    return state >= 0 && state < PROTO_LC_COUNT ? lifecycle_names[state] : NULL;
}

int proto_lifecycle_rank(int state)
{
    static const int rank[PROTO_LC_COUNT] = {0, 1, 2, 2, 2, 3, 4, 4, 5};
    return state >= 0 && state < PROTO_LC_COUNT ? rank[state] : -1;
}

static int want_lifecycle(const json_t *msg, char *err, size_t errlen)
{
    if (want_string(msg, "state", 1, err, errlen) ||
        want_int(msg, "changed_at", 1, 0, INT64_MAX, err, errlen))
        return PROTO_E_JSON;
    json_t *state = json_object_get(msg, "state");
    if (strlen(json_string_value(state)) != json_string_length(state) ||
        proto_lifecycle_state(json_string_value(state)) < 0)
        FAIL("\"state\" must be one of created, starting, ready, start_error, start_timeout, "
             "shutting_down, shutdown_error, shutdown_timeout, off");
    return 0;
}

/*
 * "logs": the members only. "data" has no length limit here beyond the message's own: a
 * batch that does not decode (too long included) is dropped by logbatch_decode, which is
 * not a connection error.
 */
static int want_logs(const json_t *msg, char *err, size_t errlen)
{
    json_t *data = json_object_get(msg, "data");
    if (want_int(msg, "seq", 1, 1, INT64_MAX, err, errlen) ||
        want_int(msg, "lines", 1, 1, PROTO_MAX_LOG_RECORDS, err, errlen))
        return PROTO_E_JSON;
    if (!data)
        FAIL("\"data\" is missing");
    if (!json_is_string(data))
        FAIL("\"data\" must be a string");
    return 0;
}

int proto_control_validate(const json_t *msg, char *err, size_t errlen)
{
    if (!json_is_object(msg))
        FAIL("a control message must be a JSON object");
    json_t *t = json_object_get(msg, "type");
    if (!json_is_string(t))
        FAIL("\"type\" must be a string");
    const char *type = json_string_value(t);
    if (strcmp(type, "hello") == 0) {
        if (want_string(msg, "version", 1, err, errlen) || want_string(msg, "os", 1, err, errlen) ||
            want_string(msg, "arch", 1, err, errlen) ||
            want_string(msg, "hostname", 1, err, errlen) ||
            want_string_array(msg, "capabilities", err, errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "manifest") == 0) {
        if (want_string(msg, "workspace", 1, err, errlen) ||
            want_string(msg, "owner", 0, err, errlen) ||
            want_string(msg, "directory", 0, err, errlen) ||
            want_string(msg, "motd", 0, err, errlen) || want_string_map(msg, "env", err, errlen) ||
            want_string_array(msg, "authorized_keys", err, errlen) ||
            want_uint(msg, "stats_interval", 86400, err, errlen) ||
            want_objects(msg, "scripts", 0, PROTO_MAX_SCRIPTS, want_script_item, NULL, err,
                         errlen) ||
            want_objects(msg, "metadata", 0, PROTO_MAX_METADATA, want_metadata_spec, "key", err,
                         errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "shutdown") == 0) {
        if (want_string(msg, "reason", 0, err, errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "ports") == 0) {
        if (want_ports(msg, err, errlen) ||
            want_objects(msg, "forward_ports", 0, PROTO_MAX_FORWARD_PORTS, want_forward_port, NULL,
                         err, errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "lifecycle") == 0) {
        if (want_lifecycle(msg, err, errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "logs") == 0) {
        if (want_logs(msg, err, errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "metadata") == 0) {
        if (want_objects(msg, "items", 1, PROTO_MAX_METADATA, want_metadata_item, "key", err,
                         errlen))
            return PROTO_E_JSON;
    } else if (strcmp(type, "stats") == 0) {
        if (!json_object_get(msg, "idle_ms"))
            FAIL("\"idle_ms\" is missing");
        if (want_uint(msg, "idle_ms", INT64_MAX, err, errlen) ||
            want_uint(msg, "last_activity", INT64_MAX, err, errlen) ||
            want_count_map(msg, "sessions", err, errlen) ||
            want_count_map(msg, "rx_bytes", err, errlen) ||
            want_count_map(msg, "tx_bytes", err, errlen))
            return PROTO_E_JSON;
    }
    return 0;
}

int proto_control_parse(const uint8_t *p, size_t len, json_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (len == 0 || len > PROTO_MAX_CONTROL) {
        if (err && errlen)
            snprintf(err, errlen, "control message of %zu bytes (limit %u)", len,
                     PROTO_MAX_CONTROL);
        return PROTO_E_LENGTH;
    }
    json_error_t jerr;
    json_t *msg = json_loadb((const char *)p, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!msg)
        FAIL("invalid JSON: %s", jerr.text);
    int rc = proto_control_validate(msg, err, errlen);
    if (rc < 0) {
        json_decref(msg);
        return rc;
    }
    *out = msg;
    return 0;
}
