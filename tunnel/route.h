/*
 * route: what the relay reads from a request's URI, query and headers, as pure functions on
 * strings: the JSON API's and the web terminal's routes, the bearer token, the web
 * terminal's cookie and login form, the Origin check, and the arguments of the pty and
 * logs queries. No libwebsockets in here: relay.c copies the URI, each header and each
 * query argument into a buffer of its own and calls these, so the fuzzer drives them
 * directly (tests/fuzz/fuzz_route.c).
 *
 * Every output is NUL-terminated within the size it is given, also when parsing fails.
 */
#ifndef TETHER_ROUTE_H
#define TETHER_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/proto.h"
#include "tokens.h"

/* Query arguments examined per request; a query is short anyway (lws keeps 4 KiB of headers). */
#define ROUTE_MAX_ARGS 64
/* Bytes of one query argument, "command=" and the longest command a pty OPEN carries. */
#define ROUTE_ARG_MAX (sizeof("command=") - 1 + PROTO_MAX_PTY_COMMAND)
/* The web terminal's cookie, which holds a user token. */
#define ROUTE_COOKIE "tether_token"

/*
 * ROUTE_TCP and ROUTE_SSH are client byte pipes, ROUTE_PTY a terminal: each websocket is
 * one tunnel stream. ROUTE_HEALTH is GET /healthz, answered without a token
 * (PROTOCOL.md 14.4.3).
 */
enum route_kind {
    ROUTE_NONE,
    ROUTE_LIST,
    ROUTE_ONE,
    ROUTE_LOGS,
    ROUTE_METRICS,
    ROUTE_HEALTH,
    ROUTE_AGENT,
    ROUTE_TCP,
    ROUTE_SSH,
    ROUTE_PTY
};
struct route {
    enum route_kind kind;
    char name[TOKENS_MAX_NAME + 1]; /* a valid workspace name for ROUTE_ONE..., else "" */
    int port;                       /* 1..65535 for ROUTE_TCP, else 0 */
};

/* The JSON API's route of uri (its path, without the query); kind ROUTE_NONE if none. */
void route_parse(const char *uri, struct route *rt);
/* Is kind a client's websocket to a workspace (tcp, ssh or pty)? */
bool route_is_client(enum route_kind kind);

enum route_web_kind {
    ROUTE_WEB_NONE,
    ROUTE_WEB_PAGE,
    ROUTE_WEB_LOGIN,
    ROUTE_WEB_LOGOUT,
    ROUTE_WEB_ASSET
};

/* /w/NAME, /w/NAME/login, /w/NAME/logout (name set, valid) or /web/FILE (name ""). */
enum route_web_kind route_web(const char *uri, char name[TOKENS_MAX_NAME + 1]);

/*
 * The token of an Authorization header's value ("Bearer TOKEN", the scheme in any case)
 * into buf; "" if there is none or it does not fit in len bytes with its NUL (a truncated
 * token is never compared).
 */
void route_bearer_token(const char *hdr, char *buf, size_t len);

/*
 * The token in a Cookie header's first non-empty ROUTE_COOKIE cookie, %XX decoded, into
 * buf; false (and buf "") if there is none, it is blank, it does not fit or it decodes to a
 * NUL byte.
 */
bool route_cookie_token(const char *hdr, char *buf, size_t len);

/*
 * Writes "ROUTE_COOKIE=VALUE" into out, VALUE being token with every byte outside
 * [A-Za-z0-9._~-] as %XX, so route_cookie_token reads token back. Returns -1 (out "") if
 * it does not fit in cap bytes with its NUL (3 * strlen(token) + 14 always do).
 */
int route_cookie_set(const char *token, char *out, size_t cap);

/*
 * The token of a login form's body (application/x-www-form-urlencoded: "token=VALUE"
 * among '&'-separated fields, %XX and '+' decoded; the last non-empty one wins) into buf;
 * "" if there is none, or that one does not fit or decodes to a NUL byte.
 */
void route_form_token(const char *body, char *buf, size_t len);

/* Is origin this relay itself: "http://HOST" (or "https://" when tls), in any case? */
bool route_origin_is_self(const char *origin, const char *host, bool tls);

/*
 * The pty endpoint's query (PROTOCOL.md 14.7): id, rows and cols required, command
 * optional, each at most once; unknown arguments are ignored. Start with
 * route_pty_query_init, feed each argument as lws splits and decodes it, then call
 * route_pty_query_finish. Each returns 0, or -1 with a one-line reason in why.
 */
struct route_pty_query {
    uint8_t id[PROTO_PTY_ID_SIZE];           /* never all zero once finished */
    uint16_t rows, cols;                     /* clamped into 1..65535 */
    char command[PROTO_MAX_PTY_COMMAND + 1]; /* "" = the login shell */
    bool seen[4];                            /* id, rows, cols, command */
};
void route_pty_query_init(struct route_pty_query *q);
/* One "name=value" argument of n bytes (a NUL among them is data, not an end); one over
 * ROUTE_ARG_MAX bytes is refused. */
int route_pty_query_arg(struct route_pty_query *q, const char *arg, size_t n, char *why,
                        size_t whylen);
int route_pty_query_finish(const struct route_pty_query *q, char *why, size_t whylen);

/*
 * One argument of n bytes of GET .../logs: "after=N", N decimal digits from 0 to INT64_MAX,
 * sets *after and *seen; others are ignored. Returns 0, or -1 with a one-line reason in why
 * (a bad number, after given twice, an argument over ROUTE_ARG_MAX bytes).
 */
int route_logs_arg(const char *arg, size_t n, uint64_t *after, bool *seen, char *why,
                   size_t whylen);

#endif
