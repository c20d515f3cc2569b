#include "route.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ptyconv.h"

/* ---- routes ---- */

void route_parse(const char *uri, struct route *rt)
{
    memset(rt, 0, sizeof(*rt));
    static const char ws_prefix[] = "/api/v1/workspaces";
    if (strcmp(uri, "/api/v1/agent") == 0) {
        rt->kind = ROUTE_AGENT;
        return;
    }
    if (strcmp(uri, "/metrics") == 0) {
        rt->kind = ROUTE_METRICS;
        return;
    }
    if (strcmp(uri, "/healthz") == 0) {
        rt->kind = ROUTE_HEALTH;
        return;
    }
    if (strcmp(uri, ws_prefix) == 0 || strcmp(uri, "/api/v1/workspaces/") == 0) {
        rt->kind = ROUTE_LIST;
        return;
    }
    if (strncmp(uri, ws_prefix, sizeof(ws_prefix) - 1) != 0 || uri[sizeof(ws_prefix) - 1] != '/')
        return;
    const char *name = uri + sizeof(ws_prefix);
    size_t nl = strcspn(name, "/");
    if (nl == 0 || nl > TOKENS_MAX_NAME)
        return;
    memcpy(rt->name, name, nl);
    rt->name[nl] = '\0';
    if (!tokens_name_valid(rt->name)) {
        rt->name[0] = '\0';
        return;
    }
    const char *rest = name + nl;
    if (*rest == '\0') {
        rt->kind = ROUTE_ONE;
    } else if (strcmp(rest, "/ssh") == 0) {
        rt->kind = ROUTE_SSH;
    } else if (strcmp(rest, "/logs") == 0) { /* its query: see route_logs_arg */
        rt->kind = ROUTE_LOGS;
    } else if (strcmp(rest, "/pty") == 0) { /* lws keeps the query apart: route_pty_query_* */
        rt->kind = ROUTE_PTY;
    } else if (strncmp(rest, "/tcp/", 5) == 0) {
        char *end;
        long port = strtol(rest + 5, &end, 10);
        if (end != rest + 5 && *end == '\0' && port >= 1 && port <= 65535) {
            rt->kind = ROUTE_TCP;
            rt->port = (int)port;
        }
    }
    if (rt->kind == ROUTE_NONE)
        rt->name[0] = '\0';
}

bool route_is_client(enum route_kind kind)
{
    return kind == ROUTE_TCP || kind == ROUTE_SSH || kind == ROUTE_PTY;
}

enum route_web_kind route_web(const char *uri, char name[TOKENS_MAX_NAME + 1])
{
    name[0] = '\0';
    if (strncmp(uri, "/web/", 5) == 0)
        return ROUTE_WEB_ASSET;
    if (strncmp(uri, "/w/", 3) != 0)
        return ROUTE_WEB_NONE;
    const char *n = uri + 3;
    size_t nl = strcspn(n, "/");
    if (nl == 0 || nl > TOKENS_MAX_NAME)
        return ROUTE_WEB_NONE;
    memcpy(name, n, nl);
    name[nl] = '\0';
    enum route_web_kind kind = ROUTE_WEB_NONE;
    const char *rest = n + nl;
    if (!tokens_name_valid(name))
        kind = ROUTE_WEB_NONE;
    else if (*rest == '\0' || strcmp(rest, "/") == 0)
        kind = ROUTE_WEB_PAGE;
    else if (strcmp(rest, "/login") == 0)
        kind = ROUTE_WEB_LOGIN;
    else if (strcmp(rest, "/logout") == 0)
        kind = ROUTE_WEB_LOGOUT;
    if (kind == ROUTE_WEB_NONE)
        name[0] = '\0';
    return kind;
}

/* ---- headers ---- */

void route_bearer_token(const char *hdr, char *buf, size_t len)
{
    buf[0] = '\0';
    size_t n = strlen(hdr);
    /* A token that does not fit is no token: never compare a truncated one. */
    if (n < 7 || strncasecmp(hdr, "Bearer ", 7) != 0 || n - 7 >= len)
        return;
    memcpy(buf, hdr + 7, n - 7 + 1);
}

static int hex_digit(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Decodes %XX (and '+' as a space when form is set) into out; -1 if it does not fit. */
static int percent_decode(const char *in, size_t n, bool form, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = in[i];
        if (ch == '%' && i + 2 < n && hex_digit(in[i + 1]) >= 0 && hex_digit(in[i + 2]) >= 0) {
            ch = (char)(hex_digit(in[i + 1]) * 16 + hex_digit(in[i + 2]));
            i += 2;
        } else if (ch == '+' && form) {
            ch = ' ';
        }
        if (ch == '\0' || o + 1 >= cap)
            return -1;
        out[o++] = ch;
    }
    out[o] = '\0';
    return 0;
}

bool route_cookie_token(const char *hdr, char *buf, size_t len)
{
    static const char key[] = ROUTE_COOKIE "=";
    buf[0] = '\0';
    for (const char *p = hdr; *p;) {
        p += strspn(p, " \t;");
        size_t n = strcspn(p, ";");
        if (n > sizeof(key) - 1 && strncmp(p, key, sizeof(key) - 1) == 0) {
            const char *v = p + sizeof(key) - 1;
            size_t vn = n - (sizeof(key) - 1);
            while (vn > 0 && (v[vn - 1] == ' ' || v[vn - 1] == '\t'))
                vn--;
            if (percent_decode(v, vn, false, buf, len) < 0) {
                buf[0] = '\0';
                return false;
            }
            return buf[0] != '\0';
        }
        p += n;
    }
    return false;
}

int route_cookie_set(const char *token, char *out, size_t cap)
{
    static const char key[] = ROUTE_COOKIE "=";
    static const char hexd[] = "0123456789ABCDEF";
    size_t o = sizeof(key) - 1;
    if (cap < sizeof(key))
        goto fail;
    memcpy(out, key, o);
    for (const unsigned char *t = (const unsigned char *)token; *t; t++) {
        bool plain = (*t >= 'A' && *t <= 'Z') || (*t >= 'a' && *t <= 'z') ||
                     (*t >= '0' && *t <= '9') || *t == '.' || *t == '_' || *t == '~' || *t == '-';
        if (o + (plain ? 1 : 3) >= cap)
            goto fail;
        if (plain) {
            out[o++] = (char)*t;
        } else {
            out[o++] = '%';
            out[o++] = hexd[*t >> 4];
            out[o++] = hexd[*t & 15];
        }
    }
    out[o] = '\0';
    return 0;
fail:
    if (cap)
        out[0] = '\0';
    return -1;
}

void route_form_token(const char *body, char *buf, size_t len)
{
    buf[0] = '\0';
    for (const char *p = body; *p;) {
        size_t n = strcspn(p, "&");
        if (n > 6 && strncmp(p, "token=", 6) == 0 &&
            percent_decode(p + 6, n - 6, true, buf, len) < 0)
            buf[0] = '\0';
        p += n;
        if (*p)
            p++;
    }
}

bool route_origin_is_self(const char *origin, const char *host, bool tls)
{
    const char *scheme = tls ? "https://" : "http://";
    size_t sl = strlen(scheme);
    return strncasecmp(origin, scheme, sl) == 0 && strcasecmp(origin + sl, host) == 0;
}

/* ---- the pty endpoint's query (PROTOCOL.md 14.7) ---- */

/* The 36-character text form, 8-4-4-4-12 hex digits in either case. */
static int parse_uuid(const char *s, size_t n, uint8_t out[PROTO_PTY_ID_SIZE])
{
    if (n != 36)
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i++] != '-')
                return -1;
            continue;
        }
        int hi = hex_digit(s[i]), lo = hex_digit(s[i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[k++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    return 0;
}

/*
 * A terminal size: 1 to 9 decimal digits, clamped into 1..65535 like the sizes of JSON
 * resizes (ptyconv.h); the agent clamps further to what a terminal can use.
 */
static int parse_size(const char *s, size_t n, uint16_t *out)
{
    if (n < 1 || n > 9)
        return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = (uint16_t)(v < (long)PTYCONV_MIN_SIZE   ? PTYCONV_MIN_SIZE
                      : v > (long)PTYCONV_MAX_SIZE ? PTYCONV_MAX_SIZE
                                                   : v);
    return 0;
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

static const char *const pty_arg_names[4] = {"id", "rows", "cols", "command"};

void route_pty_query_init(struct route_pty_query *q)
{
    memset(q, 0, sizeof(*q));
}

int route_pty_query_arg(struct route_pty_query *q, const char *arg, size_t n, char *why,
                        size_t whylen)
{
    if (n > ROUTE_ARG_MAX) {
        snprintf(why, whylen, "an argument is over %zu bytes (command: at most %u)", ROUTE_ARG_MAX,
                 PROTO_MAX_PTY_COMMAND);
        return -1;
    }
    const char *eq = memchr(arg, '=', n);
    size_t nl = eq ? (size_t)(eq - arg) : n;
    const char *v = eq ? eq + 1 : arg + n;
    size_t vl = n - nl - (eq ? 1 : 0);
    int which = -1;
    for (int i = 0; i < 4; i++)
        if (strlen(pty_arg_names[i]) == nl && memcmp(arg, pty_arg_names[i], nl) == 0)
            which = i;
    if (which < 0)
        return 0; /* unknown arguments are ignored */
    if (q->seen[which]) {
        snprintf(why, whylen, "%s is given twice", pty_arg_names[which]);
        return -1;
    }
    q->seen[which] = true;
    switch (which) {
    case 0:
        if (parse_uuid(v, vl, q->id) < 0) {
            snprintf(why, whylen, "id must be a UUID (8-4-4-4-12 hex digits)");
            return -1;
        }
        if (all_zero(q->id, sizeof(q->id))) {
            snprintf(why, whylen, "id must not be the nil UUID");
            return -1;
        }
        return 0;
    case 1:
    case 2:
        if (parse_size(v, vl, which == 1 ? &q->rows : &q->cols) < 0) {
            snprintf(why, whylen, "%s must be a decimal number", pty_arg_names[which]);
            return -1;
        }
        return 0;
    default:
        if (memchr(v, '\0', vl)) {
            snprintf(why, whylen, "command contains a NUL byte");
            return -1;
        }
        memcpy(q->command, v, vl); /* vl <= PROTO_MAX_PTY_COMMAND: n <= ROUTE_ARG_MAX */
        q->command[vl] = '\0';
        return 0;
    }
}

int route_pty_query_finish(const struct route_pty_query *q, char *why, size_t whylen)
{
    static const char *const missing[4] = {"id is missing", "rows is missing", "cols is missing",
                                           NULL};
    for (int i = 0; i < 4; i++)
        if (!q->seen[i] && missing[i]) {
            snprintf(why, whylen, "%s", missing[i]);
            return -1;
        }
    return 0;
}

/* ---- the logs endpoint's query (PROTOCOL.md 14.4.2) ---- */

int route_logs_arg(const char *arg, size_t n, uint64_t *after, bool *seen, char *why, size_t whylen)
{
    static const char bad[] = "after must be a decimal number from 0 to 9223372036854775807";
    if (n > ROUTE_ARG_MAX) {
        snprintf(why, whylen, "an argument is over %zu bytes", ROUTE_ARG_MAX);
        return -1;
    }
    /* "after" alone, or followed by '=' and its value; a NUL where '=' goes is a bad value. */
    if (n < 5 || memcmp(arg, "after", 5) != 0 || (n > 5 && arg[5] != '=' && arg[5] != '\0'))
        return 0;
    if (*seen) {
        snprintf(why, whylen, "after is given twice");
        return -1;
    }
    *seen = true;
    const char *v = arg + 6;
    size_t vl = n > 5 && arg[5] == '=' ? n - 6 : 0;
    uint64_t x = 0;
    for (size_t k = 0; k < vl; k++) {
        if (v[k] < '0' || v[k] > '9' || x > ((uint64_t)INT64_MAX - (uint64_t)(v[k] - '0')) / 10)
            vl = 0;
        else
            x = x * 10 + (uint64_t)(v[k] - '0');
    }
    if (vl == 0) {
        snprintf(why, whylen, "%s", bad);
        return -1;
    }
    *after = x;
    return 0;
}
