/*
 * libFuzzer target for tunnel/route.c: what the relay reads from a request before anyone
 * is authenticated.
 *
 * The input is a request cut at '\n' into fields, each missing one empty:
 *   0 the URI path          route_parse, route_web
 *   1 the query             split at '&' as lws does: route_pty_query_*, route_logs_arg
 *   2 Authorization         route_bearer_token
 *   3 Cookie                route_cookie_token, and back through route_cookie_set
 *   4 Origin, 5 Host        route_origin_is_self
 *   6 a login form's body   route_form_token, and its token through the cookie
 * URI and header fields end at their first NUL, as C strings do; query arguments keep
 * theirs (lws decodes %00). Outputs go into heap buffers of exactly the size passed, so
 * ASan sees any write past it.
 *
 * Invariants: a route names a workspace only when it has one, and then a valid name
 * (tokens_name_valid) that is in the URI where it should be; a tcp port is 1..65535; every
 * output is NUL-terminated within its buffer; a token is never truncated; a token the relay
 * puts in its cookie reads back the same; a refused query says why. Violations abort().
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "tunnel/ptyconv.h"
#include "tunnel/route.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

#define NFIELDS 7
#define WHY_LEN 160 /* as relay.c's */

/* Output sizes tried: tiny, the relay's web token (1024 + 1) and header token (1100). */
static const size_t token_sizes[] = {1, 8, 1025, 1100};

struct field {
    const uint8_t *p;
    size_t n;
};

/* A fresh NUL-terminated copy of a field, cut at its first NUL. */
static char *field_str(struct field f)
{
    char *s = malloc(f.n + 1);
    CHECK(s != NULL);
    memcpy(s, f.p, f.n);
    s[f.n] = '\0';
    return s;
}

static bool terminated(const char *buf, size_t len)
{
    return memchr(buf, '\0', len) != NULL;
}

static bool kind_has_name(enum route_kind k)
{
    return k == ROUTE_ONE || k == ROUTE_LOGS || k == ROUTE_TCP || k == ROUTE_SSH || k == ROUTE_PTY;
}

static void check_route(const char *uri)
{
    static const char prefix[] = "/api/v1/workspaces/";
    struct route rt;
    memset(&rt, 0x5a, sizeof(rt));
    route_parse(uri, &rt);
    CHECK(rt.kind >= ROUTE_NONE && rt.kind <= ROUTE_PTY);
    CHECK(terminated(rt.name, sizeof(rt.name)));
    CHECK(route_is_client(rt.kind) ==
          (rt.kind == ROUTE_TCP || rt.kind == ROUTE_SSH || rt.kind == ROUTE_PTY));
    CHECK(rt.kind == ROUTE_TCP ? rt.port >= 1 && rt.port <= 65535 : rt.port == 0);
    if (!kind_has_name(rt.kind)) {
        CHECK(rt.name[0] == '\0');
        if (rt.kind == ROUTE_AGENT)
            CHECK(strcmp(uri, "/api/v1/agent") == 0);
        if (rt.kind == ROUTE_METRICS)
            CHECK(strcmp(uri, "/metrics") == 0);
        if (rt.kind == ROUTE_LIST)
            CHECK(strcmp(uri, "/api/v1/workspaces") == 0 || strcmp(uri, prefix) == 0);
        return;
    }
    CHECK(tokens_name_valid(rt.name));
    size_t nl = strlen(rt.name);
    CHECK(strncmp(uri, prefix, sizeof(prefix) - 1) == 0);
    CHECK(strncmp(uri + sizeof(prefix) - 1, rt.name, nl) == 0);
    const char *rest = uri + sizeof(prefix) - 1 + nl;
    switch (rt.kind) {
    case ROUTE_ONE:
        CHECK(*rest == '\0');
        break;
    case ROUTE_LOGS:
        CHECK(strcmp(rest, "/logs") == 0);
        break;
    case ROUTE_SSH:
        CHECK(strcmp(rest, "/ssh") == 0);
        break;
    case ROUTE_PTY:
        CHECK(strcmp(rest, "/pty") == 0);
        break;
    default:
        CHECK(strncmp(rest, "/tcp/", 5) == 0 && strtol(rest + 5, NULL, 10) == rt.port);
        break;
    }
}

static void check_web(const char *uri)
{
    char *name = malloc(TOKENS_MAX_NAME + 1);
    CHECK(name != NULL);
    memset(name, 0x5a, TOKENS_MAX_NAME + 1);
    enum route_web_kind kind = route_web(uri, name);
    CHECK(terminated(name, TOKENS_MAX_NAME + 1));
    switch (kind) {
    case ROUTE_WEB_NONE:
        CHECK(name[0] == '\0');
        break;
    case ROUTE_WEB_ASSET:
        CHECK(name[0] == '\0' && strncmp(uri, "/web/", 5) == 0);
        break;
    case ROUTE_WEB_PAGE:
    case ROUTE_WEB_LOGIN:
    case ROUTE_WEB_LOGOUT: {
        CHECK(tokens_name_valid(name));
        size_t nl = strlen(name);
        CHECK(strncmp(uri, "/w/", 3) == 0 && strncmp(uri + 3, name, nl) == 0);
        const char *rest = uri + 3 + nl;
        if (kind == ROUTE_WEB_PAGE)
            CHECK(*rest == '\0' || strcmp(rest, "/") == 0);
        else
            CHECK(strcmp(rest, kind == ROUTE_WEB_LOGIN ? "/login" : "/logout") == 0);
        break;
    }
    default:
        CHECK(0);
    }
    free(name);
}

static void check_bearer(const char *hdr)
{
    size_t hl = strlen(hdr);
    bool bearer = hl >= 7 && strncasecmp(hdr, "Bearer ", 7) == 0;
    for (size_t i = 0; i < sizeof(token_sizes) / sizeof(token_sizes[0]); i++) {
        size_t len = token_sizes[i];
        char *buf = malloc(len);
        CHECK(buf != NULL);
        memset(buf, 0x5a, len);
        route_bearer_token(hdr, buf, len);
        CHECK(terminated(buf, len));
        /* The whole token or nothing: a truncated one must never be compared. */
        if (bearer && hl - 7 < len)
            CHECK(strcmp(buf, hdr + 7) == 0);
        else
            CHECK(buf[0] == '\0');
        free(buf);
    }
}

/*
 * What the relay does after a login: the token goes into its cookie, and the browser sends
 * it back. It must come back whole, and the cookie must fit the size route.h promises and
 * not one byte less.
 */
static void check_cookie_round_trip(const char *token)
{
    size_t tl = strlen(token), cap = 3 * tl + sizeof(ROUTE_COOKIE "=");
    char *cookie = malloc(cap), *back = malloc(tl + 1);
    CHECK(cookie && back);
    CHECK(route_cookie_set(token, cookie, cap) == 0);
    size_t need = strlen(cookie) + 1;
    CHECK(need <= cap);
    CHECK(route_cookie_set(token, cookie, need - 1) == -1);
    CHECK(cookie[0] == '\0');
    CHECK(route_cookie_set(token, cookie, need) == 0);
    CHECK(strncmp(cookie, ROUTE_COOKIE "=", sizeof(ROUTE_COOKIE)) == 0);
    CHECK(strpbrk(cookie, "; \t\",\\") == NULL);
    memset(back, 0x5a, tl + 1);
    bool found = route_cookie_token(cookie, back, tl + 1);
    CHECK(found == (tl > 0));
    CHECK(strcmp(back, token) == 0);
    free(cookie);
    free(back);
}

static void check_cookie(const char *hdr)
{
    for (size_t i = 0; i < sizeof(token_sizes) / sizeof(token_sizes[0]); i++) {
        size_t len = token_sizes[i];
        char *buf = malloc(len);
        CHECK(buf != NULL);
        memset(buf, 0x5a, len);
        bool found = route_cookie_token(hdr, buf, len);
        CHECK(terminated(buf, len));
        CHECK(found == (buf[0] != '\0'));
        if (found)
            check_cookie_round_trip(buf);
        free(buf);
    }
}

static void check_form(const char *body)
{
    for (size_t i = 0; i < sizeof(token_sizes) / sizeof(token_sizes[0]); i++) {
        size_t len = token_sizes[i];
        char *buf = malloc(len);
        CHECK(buf != NULL);
        memset(buf, 0x5a, len);
        route_form_token(body, buf, len);
        CHECK(terminated(buf, len));
        if (buf[0])
            check_cookie_round_trip(buf);
        free(buf);
    }
}

static void check_origin(const char *origin, const char *host)
{
    for (int tls = 0; tls < 2; tls++) {
        const char *scheme = tls ? "https://" : "http://";
        size_t sl = strlen(scheme), hl = strlen(host);
        char *want = malloc(sl + hl + 1);
        CHECK(want != NULL);
        memcpy(want, scheme, sl);
        memcpy(want + sl, host, hl + 1);
        CHECK(route_origin_is_self(origin, host, tls) == (strcasecmp(origin, want) == 0));
        free(want);
    }
}

static void check_why(const char *why)
{
    CHECK(terminated(why, WHY_LEN));
    CHECK(why[0] != '\0');
}

/* After an accepted id=, rows=, cols= or command=, q holds exactly what the text said. */
static void check_pty_value(const struct route_pty_query *q, const char *arg, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    const char *eq = memchr(arg, '=', n);
    size_t nl = eq ? (size_t)(eq - arg) : n, vl = eq ? n - nl - 1 : 0;
    const char *v = eq ? eq + 1 : arg + n;
    if (nl == 2 && memcmp(arg, "id", 2) == 0) {
        char text[37];
        size_t k = 0;
        for (size_t i = 0; i < PROTO_PTY_ID_SIZE; i++) {
            if (i == 4 || i == 6 || i == 8 || i == 10)
                text[k++] = '-';
            text[k++] = hexd[q->id[i] >> 4];
            text[k++] = hexd[q->id[i] & 15];
        }
        text[k] = '\0';
        CHECK(vl == 36 && strncasecmp(v, text, 36) == 0);
    } else if ((nl == 4 && memcmp(arg, "rows", 4) == 0) ||
               (nl == 4 && memcmp(arg, "cols", 4) == 0)) {
        CHECK(vl >= 1 && vl <= 9);
        long x = 0;
        for (size_t i = 0; i < vl; i++) {
            CHECK(v[i] >= '0' && v[i] <= '9');
            x = x * 10 + (v[i] - '0');
        }
        long want = x < 1 ? 1 : x > 65535 ? 65535 : x;
        CHECK((arg[0] == 'r' ? q->rows : q->cols) == want);
    } else if (nl == 7 && memcmp(arg, "command", 7) == 0) {
        CHECK(vl <= PROTO_MAX_PTY_COMMAND);
        CHECK(strlen(q->command) == vl && memcmp(q->command, v, vl) == 0);
    }
}

static void check_pty_query(struct field query)
{
    struct route_pty_query *q = malloc(sizeof(*q));
    char *why = malloc(WHY_LEN);
    CHECK(q && why);
    route_pty_query_init(q);
    const uint8_t *p = query.p, *end = query.p + query.n;
    int rc = 0;
    for (int i = 0; i < ROUTE_MAX_ARGS && p < end && rc == 0; i++) {
        const uint8_t *amp = memchr(p, '&', (size_t)(end - p));
        size_t n = (size_t)((amp ? amp : end) - p);
        why[0] = '\0';
        rc = route_pty_query_arg(q, (const char *)p, n, why, WHY_LEN);
        if (rc < 0)
            check_why(why);
        else
            check_pty_value(q, (const char *)p, n);
        CHECK(rc == 0 || rc == -1);
        p += n + (amp ? 1 : 0);
    }
    if (rc == 0) {
        why[0] = '\0';
        rc = route_pty_query_finish(q, why, WHY_LEN);
        if (rc < 0) {
            check_why(why);
        } else {
            CHECK(q->seen[0] && q->seen[1] && q->seen[2]);
            uint8_t zero[PROTO_PTY_ID_SIZE] = {0};
            CHECK(memcmp(q->id, zero, sizeof(zero)) != 0);
            CHECK(q->rows >= PTYCONV_MIN_SIZE && q->cols >= PTYCONV_MIN_SIZE);
            CHECK(terminated(q->command, sizeof(q->command)));
        }
    }
    free(why);
    free(q);
}

static void check_logs_query(struct field query)
{
    char *why = malloc(WHY_LEN);
    CHECK(why != NULL);
    uint64_t after = 0;
    bool seen = false;
    const uint8_t *p = query.p, *end = query.p + query.n;
    for (int i = 0; i < ROUTE_MAX_ARGS && p < end; i++) {
        const uint8_t *amp = memchr(p, '&', (size_t)(end - p));
        size_t n = (size_t)((amp ? amp : end) - p);
        bool was_seen = seen;
        why[0] = '\0';
        if (route_logs_arg((const char *)p, n, &after, &seen, why, WHY_LEN) < 0) {
            check_why(why);
            break;
        }
        CHECK(after <= (uint64_t)INT64_MAX);
        if (seen && !was_seen) {
            /* This argument was "after=DIGITS": the value is those digits. */
            CHECK(n > 6 && memcmp(p, "after=", 6) == 0);
            uint64_t x = 0;
            for (size_t k = 6; k < n; k++) {
                CHECK(p[k] >= '0' && p[k] <= '9');
                x = x * 10 + (uint64_t)(p[k] - '0');
            }
            CHECK(x == after);
        }
        p += n + (amp ? 1 : 0);
    }
    free(why);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct field f[NFIELDS];
    memset(f, 0, sizeof(f));
    size_t at = 0;
    for (int i = 0; i < NFIELDS; i++) {
        const uint8_t *nl = at < size ? memchr(data + at, '\n', size - at) : NULL;
        size_t end = nl ? (size_t)(nl - data) : size;
        f[i].p = data + at;
        f[i].n = end - at;
        at = nl ? end + 1 : size;
    }

    char *uri = field_str(f[0]), *auth = field_str(f[2]), *cookie = field_str(f[3]);
    char *origin = field_str(f[4]), *host = field_str(f[5]), *body = field_str(f[6]);
    check_route(uri);
    check_web(uri);
    check_pty_query(f[1]);
    check_logs_query(f[1]);
    check_bearer(auth);
    check_cookie(cookie);
    check_origin(origin, host);
    check_form(body);
    free(uri);
    free(auth);
    free(cookie);
    free(origin);
    free(host);
    free(body);
    return 0;
}
