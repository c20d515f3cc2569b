#include "ptyconv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ZLIB_CONST
#include <jansson.h>
#include <zlib.h>

#include "proto/proto.h"

/* Compressed bytes are produced into a stack buffer of this size, then appended to out. */
#define PTYCONV_DEFLATE_CHUNK (16u * 1024)
/* Largest body of a known record that is collected (RESIZE); any more is malformed. */
#define PTYCONV_SMALL_BODY 4u
/* A text buffer bigger than this is freed after its message instead of kept for the next. */
#define PTYCONV_KEEP_TEXT (64u * 1024)

/* Where the record parser is in the agent's bytes. */
enum rec_state {
    REC_HEADER, /* collecting the 3-byte header into rec[] */
    REC_DATA,   /* `left` bytes of a DATA body pass through as output */
    REC_SMALL,  /* collecting a RESIZE or EXIT body into rec[] up to `need` bytes */
    REC_SKIP,   /* `left` bytes of a record type we do not know */
};

struct ptyconv {
    bool zlib;
    bool def_ok, inf_ok;
    z_stream def; /* toward the agent */
    z_stream inf; /* from the agent */
    bool inf_pending;
    bool inf_end; /* the agent ended its zlib stream: nothing may follow */
    int failed;   /* sticky PTYCONV_E_* once the agent broke the protocol */
    int exit_status;

    enum rec_state state;
    uint8_t rec[PROTO_PTYREC_HEADER + PTYCONV_SMALL_BODY];
    size_t have; /* bytes in rec[] */
    size_t need; /* REC_SMALL: header + body */
    size_t left; /* REC_DATA, REC_SKIP: body bytes still to come */

    struct bytebuf text; /* a client text message being collected */
    bool text_skip;      /* the message being collected went over the limit: drop the rest */
};

const char *ptyconv_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case PTYCONV_E_NOMEM:
        return "out of memory";
    case PTYCONV_E_ZLIB:
        return "zlib failed";
    case PTYCONV_E_RECORD:
        return "malformed pty record";
    case PTYCONV_E_INFLATE:
        return "invalid zlib stream";
    case PTYCONV_E_IGNORED:
        return "message ignored";
    default:
        return "unknown error";
    }
}

struct ptyconv *ptyconv_new(bool zlib)
{
    struct ptyconv *pc = calloc(1, sizeof(*pc));
    if (!pc)
        return NULL;
    pc->zlib = zlib;
    pc->exit_status = -1;
    if (!zlib)
        return pc;
    pc->def_ok = deflateInit2(&pc->def, PTYCONV_ZLEVEL, Z_DEFLATED, PTYCONV_ZWBITS,
                              PTYCONV_ZMEMLEVEL, Z_DEFAULT_STRATEGY) == Z_OK;
    /* windowBits 15 accepts whatever window the agent's deflater chose. */
    pc->inf_ok = inflateInit(&pc->inf) == Z_OK;
    if (!pc->def_ok || !pc->inf_ok) {
        ptyconv_free(pc);
        return NULL;
    }
    return pc;
}

void ptyconv_free(struct ptyconv *pc)
{
    if (!pc)
        return;
    if (pc->def_ok)
        deflateEnd(&pc->def);
    if (pc->inf_ok)
        inflateEnd(&pc->inf);
    bytebuf_free(&pc->text);
    free(pc);
}

/* ---- toward the agent ---- */

/* Deflates n bytes (flush: Z_NO_FLUSH or Z_SYNC_FLUSH) and appends the output to out. */
static int put(struct ptyconv *pc, const uint8_t *p, size_t n, int flush, struct bytebuf *out)
{
    if (!pc->zlib)
        return n && bytebuf_append(out, p, n) < 0 ? PTYCONV_E_NOMEM : 0;
    uint8_t buf[PTYCONV_DEFLATE_CHUNK];
    pc->def.next_in = p;
    pc->def.avail_in = (uInt)n; /* at most a record header or body: far below uInt's range */
    do {
        pc->def.next_out = buf;
        pc->def.avail_out = sizeof(buf);
        if (deflate(&pc->def, flush) == Z_STREAM_ERROR)
            return PTYCONV_E_ZLIB;
        size_t got = sizeof(buf) - pc->def.avail_out;
        if (got && bytebuf_append(out, buf, got) < 0)
            return PTYCONV_E_NOMEM;
    } while (pc->def.avail_in > 0 || pc->def.avail_out == 0);
    return 0;
}

static int put_record(struct ptyconv *pc, uint8_t type, const uint8_t *body, size_t len,
                      struct bytebuf *out)
{
    uint8_t hdr[PROTO_PTYREC_HEADER];
    proto_ptyrec_header(type, (uint16_t)len, hdr);
    int rc = put(pc, hdr, sizeof(hdr), Z_NO_FLUSH, out);
    return rc ? rc : put(pc, body, len, Z_NO_FLUSH, out);
}

/* DATA records of at most PROTO_PTYREC_MAX_BODY bytes each; nothing for empty input. */
static int put_input(struct ptyconv *pc, const uint8_t *p, size_t len, struct bytebuf *out)
{
    while (len > 0) {
        size_t n = len < PROTO_PTYREC_MAX_BODY ? len : PROTO_PTYREC_MAX_BODY;
        int rc = put_record(pc, PROTO_PTYREC_DATA, p, n, out);
        if (rc)
            return rc;
        p += n;
        len -= n;
    }
    return 0;
}

static uint16_t clamp_size(long long v)
{
    if (v < (long long)PTYCONV_MIN_SIZE)
        return PTYCONV_MIN_SIZE;
    if (v > (long long)PTYCONV_MAX_SIZE)
        return PTYCONV_MAX_SIZE;
    return (uint16_t)v;
}

static int put_resize(struct ptyconv *pc, long long rows, long long cols, struct bytebuf *out)
{
    uint16_t r = clamp_size(rows), c = clamp_size(cols);
    uint8_t body[4] = {(uint8_t)(r >> 8), (uint8_t)r, (uint8_t)(c >> 8), (uint8_t)c};
    return put_record(pc, PROTO_PTYREC_RESIZE, body, sizeof(body), out);
}

/* Ends a call's output at a byte boundary the agent can decode (PROTOCOL.md 3.2). */
static int flush(struct ptyconv *pc, struct bytebuf *out)
{
    return pc->zlib ? put(pc, NULL, 0, Z_SYNC_FLUSH, out) : 0;
}

int ptyconv_client_input(struct ptyconv *pc, const uint8_t *p, size_t len, struct bytebuf *out)
{
    if (len == 0)
        return 0;
    int rc = put_input(pc, p, len, out);
    return rc ? rc : flush(pc, out);
}

int ptyconv_client_resize(struct ptyconv *pc, long long rows, long long cols, struct bytebuf *out)
{
    int rc = put_resize(pc, rows, cols, out);
    return rc ? rc : flush(pc, out);
}

static int ignored(char *why, size_t whylen, const char *reason)
{
    snprintf(why, whylen, "%s", reason);
    return PTYCONV_E_IGNORED;
}

/* Checks a whole message before acting on any of it: a bad one is ignored as a whole. */
static int client_message(struct ptyconv *pc, const uint8_t *p, size_t len, struct bytebuf *out,
                          char *why, size_t whylen)
{
    json_error_t jerr;
    /* Terminal input may hold NUL (Ctrl-@), which JSON can carry as \u0000. */
    json_t *msg = json_loadb((const char *)p, len, JSON_ALLOW_NUL, &jerr);
    if (!msg) {
        /* The position, not jansson's text: that quotes the client's bytes. */
        snprintf(why, whylen, "not valid JSON (at byte %d)", jerr.position);
        return PTYCONV_E_IGNORED;
    }
    int rc;
    json_t *data = json_object_get(msg, "data");
    json_t *rows = json_object_get(msg, "rows");
    json_t *cols = json_object_get(msg, "cols");
    if (!json_is_object(msg))
        rc = ignored(why, whylen, "not a JSON object");
    else if (data && !json_is_string(data))
        rc = ignored(why, whylen, "\"data\" is not a string");
    else if ((rows && !json_is_integer(rows)) || (cols && !json_is_integer(cols)))
        rc = ignored(why, whylen, "\"rows\" and \"cols\" must be integers");
    else if (!rows != !cols)
        rc = ignored(why, whylen, "a resize needs both \"rows\" and \"cols\"");
    else {
        /* Input first, then the resize (PROTOCOL.md 14.7); one flush for both. */
        rc = data ? put_input(pc, (const uint8_t *)json_string_value(data),
                              json_string_length(data), out)
                  : 0;
        if (rc == 0 && rows)
            rc = put_resize(pc, json_integer_value(rows), json_integer_value(cols), out);
        if (rc == 0 && (rows || (data && json_string_length(data) > 0)))
            rc = flush(pc, out);
    }
    json_decref(msg);
    return rc;
}

static void text_reset(struct ptyconv *pc)
{
    if (pc->text.cap > PTYCONV_KEEP_TEXT)
        bytebuf_free(&pc->text);
    else
        bytebuf_consume(&pc->text, pc->text.len);
}

int ptyconv_client_text(struct ptyconv *pc, const uint8_t *p, size_t len, bool first, bool final,
                        struct bytebuf *out, char *why, size_t whylen)
{
    if (first) {
        text_reset(pc);
        pc->text_skip = false;
    }
    if (pc->text_skip) {
        pc->text_skip = !final;
        return 0; /* already reported when it went over */
    }
    if (len > PTYCONV_MAX_JSON - pc->text.len) {
        text_reset(pc);
        pc->text_skip = !final;
        snprintf(why, whylen, "text message over %u bytes", PTYCONV_MAX_JSON);
        return PTYCONV_E_IGNORED;
    }
    if (len && bytebuf_append(&pc->text, p, len) < 0)
        return PTYCONV_E_NOMEM;
    if (!final)
        return 0;
    int rc = client_message(pc, bytebuf_peek(&pc->text), pc->text.len, out, why, whylen);
    text_reset(pc);
    return rc;
}

/* ---- from the agent ---- */

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* A record header is complete in rec[]: decide how its body is handled. */
static int record_start(struct ptyconv *pc)
{
    uint8_t type = pc->rec[0];
    size_t len = get16(pc->rec + 1);
    switch (type) {
    case PROTO_PTYREC_DATA:
        if (len == 0)
            return PTYCONV_E_RECORD;
        pc->state = REC_DATA;
        pc->left = len;
        return 0;
    case PROTO_PTYREC_RESIZE:
    case PROTO_PTYREC_EXIT:
        /* The size is checked here so that nothing waits for a body that is malformed
         * anyway; proto_ptyrec_decode checks the rest once the body is in. */
        if (len != (type == PROTO_PTYREC_RESIZE ? 4u : 2u))
            return PTYCONV_E_RECORD;
        pc->state = REC_SMALL;
        pc->need = PROTO_PTYREC_HEADER + len;
        return 0;
    default:
        pc->state = len ? REC_SKIP : REC_HEADER;
        pc->left = len;
        return 0;
    }
}

/* A RESIZE or EXIT record is complete in rec[]. */
static int record_small(struct ptyconv *pc)
{
    struct proto_ptyrec r;
    if (proto_ptyrec_decode(pc->rec, pc->need, &r) != (int)pc->need)
        return PTYCONV_E_RECORD;
    if (r.type == PROTO_PTYREC_EXIT)
        pc->exit_status = r.exit_how ? 128 + r.exit_value : r.exit_value;
    /* A RESIZE from the agent is well-formed but means nothing to the relay. */
    pc->state = REC_HEADER;
    return 0;
}

/*
 * Parses n bytes of records in buf, moving DATA bodies to the front of buf (never ahead of
 * where they are read, so in place is safe). Returns the output byte count or an error.
 */
static long parse_records(struct ptyconv *pc, uint8_t *buf, size_t n)
{
    size_t i = 0, w = 0;
    while (i < n) {
        size_t k;
        switch (pc->state) {
        case REC_HEADER:
        case REC_SMALL: {
            size_t want = pc->state == REC_HEADER ? PROTO_PTYREC_HEADER : pc->need;
            k = want - pc->have < n - i ? want - pc->have : n - i;
            memcpy(pc->rec + pc->have, buf + i, k);
            pc->have += k;
            i += k;
            if (pc->have < want)
                break;
            int rc = pc->state == REC_HEADER ? record_start(pc) : record_small(pc);
            if (rc)
                return rc;
            if (pc->state != REC_SMALL)
                pc->have = 0; /* a small record keeps its header in rec[] for decoding */
            break;
        }
        case REC_DATA:
            k = pc->left < n - i ? pc->left : n - i;
            memmove(buf + w, buf + i, k);
            w += k;
            i += k;
            pc->left -= k;
            if (pc->left == 0)
                pc->state = REC_HEADER;
            break;
        case REC_SKIP:
            k = pc->left < n - i ? pc->left : n - i;
            i += k;
            pc->left -= k;
            if (pc->left == 0)
                pc->state = REC_HEADER;
            break;
        }
    }
    return (long)w;
}

static int inflate_some(struct ptyconv *pc, const uint8_t *in, size_t len, size_t *used,
                        uint8_t *out, size_t cap, size_t *got)
{
    if (!pc->zlib) {
        *got = *used = len < cap ? len : cap;
        memcpy(out, in, *got);
        return 0;
    }
    if (pc->inf_end)
        return len ? PTYCONV_E_INFLATE : 0; /* bytes after the end of the zlib stream */
    uInt in_n = len > UINT32_MAX ? UINT32_MAX : (uInt)len;
    uInt out_n = cap > UINT32_MAX ? UINT32_MAX : (uInt)cap;
    pc->inf.next_in = in;
    pc->inf.avail_in = in_n;
    pc->inf.next_out = out;
    pc->inf.avail_out = out_n;
    int rc = inflate(&pc->inf, Z_NO_FLUSH);
    *used = in_n - pc->inf.avail_in;
    *got = out_n - pc->inf.avail_out;
    pc->inf_pending = pc->inf.avail_out == 0;
    switch (rc) {
    case Z_OK:
    case Z_BUF_ERROR: /* no progress possible now: more input is needed */
        return 0;
    case Z_STREAM_END:
        pc->inf_end = true;
        pc->inf_pending = false;
        return *used < len ? PTYCONV_E_INFLATE : 0;
    case Z_MEM_ERROR:
        return PTYCONV_E_NOMEM;
    case Z_NEED_DICT:
    case Z_DATA_ERROR:
        return PTYCONV_E_INFLATE;
    default:
        return PTYCONV_E_ZLIB;
    }
}

int ptyconv_agent_output(struct ptyconv *pc, const uint8_t *in, size_t len, size_t *used,
                         uint8_t *out, size_t cap, size_t *produced)
{
    *used = 0;
    *produced = 0;
    if (pc->failed)
        return pc->failed;
    size_t got = 0;
    int rc = inflate_some(pc, in, len, used, out, cap, &got);
    long w = rc ? rc : parse_records(pc, out, got);
    if (w < 0) {
        pc->failed = (int)w;
        pc->inf_pending = false;
        return pc->failed;
    }
    *produced = (size_t)w;
    return 0;
}

bool ptyconv_agent_pending(const struct ptyconv *pc)
{
    return !pc->failed && pc->inf_pending;
}

int ptyconv_exit_status(const struct ptyconv *pc)
{
    return pc->exit_status;
}
