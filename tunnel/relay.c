#include "relay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "bytebuf.h"
#include "chunkq.h"
#include "heap.h"
#include "log.h"
#include "manifestfile.h"
#include "mux.h"
#include "ptyconv.h"
#include "route.h"
#include "tokens.h"
#include "web/web_assets.h"
#include "wsstatus.h"

/* How often the relay ticks every agent's keepalive. */
#define RELAY_TICK_MS 500u
#define RELAY_STATS_INTERVAL_S 30u /* agents' stats, unless --stats-interval says otherwise */
#define RELAY_MAX_WORKSPACES 100000u
/* Log lines kept per workspace, unless --log-lines says otherwise. */
#define RELAY_LOG_LINES 2000u
/*
 * One GET .../logs reply holds at most this many lines and, past its first line, this many
 * bytes of text (a few MiB of JSON at worst); "next" tells the client where to go on.
 */
#define RELAY_LOGS_REPLY_LINES 10000u
#define RELAY_LOGS_REPLY_TEXT (1024u * 1024)
/* lws hands websocket payload to the relay in pieces of at most this many bytes. */
#define RELAY_RX_BUFFER (64u * 1024)
/* After GOAWAY, how long open streams may go on before the tunnel closes anyway. */
#define RELAY_DRAIN_MS 10000u
/* How long a closing tunnel may take to flush before its socket is dropped. */
#define RELAY_CLOSE_WAIT_MS 5000u
/* Close codes for client websockets: 4000 + an OPEN_FAIL/RST code (PROTOCOL.md). */
#define RELAY_CLOSE_CODE_BASE 4000

/*
 * pty endpoints (PROTOCOL.md 14.7). Output from the agent is inflated only while less than
 * RELAY_PTY_OUTPUT_HIGH bytes wait for the client, in calls that each offer at least
 * RELAY_PTY_INFLATE_ROOM bytes of room, at most RELAY_PTY_PUMP_CALLS calls per event (the
 * rest waits for the next WRITEABLE), so a zlib bomb costs a bounded amount of memory and
 * of loop time. Compressed bytes held meanwhile are bounded by the credit we granted.
 */
#define RELAY_PTY_OUTPUT_HIGH (256u * 1024)
#define RELAY_PTY_INFLATE_ROOM (16u * 1024)
#define RELAY_PTY_PUMP_CALLS 32u
/* Credit marks per pty client: past this many, new ones merge into the last (later credit). */
#define RELAY_PTY_MARKS 16u

struct relay_agent;

struct relay_workspace {
    char name[TOKENS_MAX_NAME + 1];
    struct relay_agent *agent; /* the connected agent, or NULL */
    char agent_version[64];
    char hostname[256];
    char os[32];
    char arch[32];
    int64_t last_seen_ms;   /* unix ms of the last frame from an agent, or -1 */
    struct wsstatus status; /* what its agents reported (clock: uv_now) */
    bool idle_fired;        /* on_idle ran for the current idle period */
};

/*
 * Agent bytes of a pty stream were inflated (`bytes` of them) into output that ends at
 * offset `end` of what was queued for the client: their credit is due once the client's
 * socket took that offset.
 */
struct relay_credit_mark {
    uint64_t end;
    size_t bytes;
};

/* The pty half of a client (PROTOCOL.md 14.7); NULL for byte pipes. */
struct relay_pty {
    struct ptyconv *conv;
    struct bytebuf from_agent; /* compressed, not inflated yet: bounded by our credit */
    uint64_t queued;           /* output bytes ever queued for the client */
    uint64_t written;          /* of those, written to its socket */
    struct relay_credit_mark marks[RELAY_PTY_MARKS];
    size_t mark_head, nmarks;
    bool exit_sent;
};

/* A client websocket bridged to one stream on an agent's tunnel. */
struct relay_client {
    struct lws *wsi;
    struct relay_agent *agent; /* NULL once the agent or the stream is gone */
    uint32_t stream;           /* 0 once the stream ended */
    bool fin_from_client;      /* the client sent its end-of-stream message */
    bool fin_from_agent;
    bool fin_to_client_sent;
    bool closing;
    bool close_sent;
    bool peer_closed; /* its close frame came: lws still passes on frames behind it */
    int close_code;
    char close_reason[124];
    struct chunkq to_client;    /* from the agent, waiting for the client's socket */
    struct bytebuf from_client; /* beyond the stream's credit: reading is paused meanwhile */
    struct relay_pty *pty;      /* ROUTE_PTY only */
    struct relay_client *next;  /* in agent->clients */
};

struct relay_agent {
    struct relay *relay;
    struct lws *wsi;
    struct mux *mux;
    struct relay_workspace *ws;
    bool current;            /* ws->agent == this */
    bool close_after_flush;  /* close once the output is out */
    bool peer_closed;        /* its close frame came: lws still passes on frames behind it */
    uint64_t drain_deadline; /* GOAWAY either way: streams may finish until then (0 = no) */
    uint64_t close_deadline; /* close_after_flush was set: kill the socket after this */
    uint64_t validity_ms;    /* wsctx_confirm_valid's last confirmation */
    struct relay_client *clients;
    struct relay_agent *next; /* in relay->agents */
};

enum pss_kind { PSS_NONE, PSS_AGENT, PSS_CLIENT, PSS_LOGIN };
struct relay_pss {
    enum pss_kind kind;
    void *obj;
    /* In relay->flush while it has output to write at the end of this loop iteration. */
    struct lws *flush_wsi;
    struct relay_pss *flush_next;
    struct relay_pss **flush_pprev; /* NULL when not in the list */
};

struct relay {
    uv_loop_t *loop;
    struct relay_config cfg;
    struct tokens *tokens;
    struct manifestfile *manifest; /* --manifest, or NULL */
    struct relay_workspace *workspaces;
    size_t nworkspaces;
    struct relay_agent *agents;
    /*
     * Client connections alive, counted until their CLOSED callback. Not the agents'
     * client lists: a client leaves those when its close starts, and its connection (and
     * lws's buffers for it) lives on until the peer answers the close.
     */
    size_t nclients;
    bool had_clients; /* some client connection was alive since the last tick */
    uv_timer_t tick;
    /*
     * Agents and clients with output made during this loop iteration: written when the
     * iteration's callbacks are done (an idle handle: it runs before the next poll, and
     * keeps that poll from blocking), straight to a socket with room, instead of after a
     * poll for POLLOUT (three epoll_ctl calls and a loop iteration per message).
     */
    uv_idle_t flush_idle;
    bool flush_running; /* between relay_start and relay_stop */
    struct relay_pss *flush;
    uint8_t *out; /* LWS_PRE + MUX_OUTPUT_MIN: shared, since lws keeps what it cannot send */
};

void relay_config_default(struct relay_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->keepalive_idle_ms = MUX_KEEPALIVE_IDLE_MS;
    cfg->keepalive_timeout_ms = MUX_KEEPALIVE_TIMEOUT_MS;
    cfg->stats_interval_s = RELAY_STATS_INTERVAL_S;
    cfg->log_lines = RELAY_LOG_LINES;
}

/*
 * Copies text from a peer into dst for logs, JSON and close reasons: printable ASCII only
 * (anything else becomes '?'), so no forged log lines, and always valid UTF-8 however it
 * is cut.
 */
static void copy_text(char *dst, size_t cap, const char *src, size_t len)
{
    size_t n = 0;
    for (; src && n < len && n + 1 < cap; n++) {
        unsigned char ch = (unsigned char)src[n];
        dst[n] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    dst[n] = '\0';
}

/* The close code for a client whose stream failed with code (PROTOCOL.md 14.5). */
static int client_close_code(uint32_t code)
{
    return RELAY_CLOSE_CODE_BASE + (int)(code <= PROTO_CODE_MAX ? code : PROTO_CODE_INTERNAL);
}

static int64_t unix_ms(void)
{
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    return tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

/* ---- workspaces ---- */

static struct relay_workspace *workspace_find(struct relay *r, const char *name)
{
    for (size_t i = 0; i < r->nworkspaces; i++)
        if (strcmp(r->workspaces[i].name, name) == 0)
            return &r->workspaces[i];
    return NULL;
}

/*
 * Connected, as the API says it: the agent's tunnel is up and its HELLO arrived, so streams
 * can be opened now (a client arriving between the websocket and the HELLO would get 1013).
 */
static bool agent_ready(const struct relay_workspace *w)
{
    return w->agent && mux_peer_hello_received(w->agent->mux);
}

/* Milliseconds the workspace has been idle, from its agent's last stats; -1 if unknown. */
static int64_t idle_ms(const struct relay *r, const struct relay_workspace *w)
{
    return wsstatus_idle_ms(&w->status, uv_now(r->loop));
}

static json_t *workspace_json(const struct relay *r, const struct relay_workspace *w)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(w->name));
    json_object_set_new(o, "connected", json_boolean(agent_ready(w)));
    json_object_set_new(o, "agent_version",
                        w->agent_version[0] ? json_string(w->agent_version) : json_null());
    json_object_set_new(o, "last_seen",
                        w->last_seen_ms >= 0 ? json_integer(w->last_seen_ms) : json_null());
    json_object_set_new(o, "hostname", w->hostname[0] ? json_string(w->hostname) : json_null());
    json_object_set_new(o, "os", w->os[0] ? json_string(w->os) : json_null());
    json_object_set_new(o, "arch", w->arch[0] ? json_string(w->arch) : json_null());
    wsstatus_json(&w->status, o, uv_now(r->loop));
    return o;
}

/* ---- HTTP helpers ---- */

/* Copies the bearer token of the request into buf, or "" if there is none. */
static void bearer_token(struct lws *wsi, char *buf, size_t len)
{
    char hdr[1100];
    buf[0] = '\0';
    if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_AUTHORIZATION) >= (int)sizeof(hdr))
        return;
    if (lws_hdr_copy(wsi, hdr, sizeof(hdr), WSI_TOKEN_HTTP_AUTHORIZATION) <= 0)
        return;
    route_bearer_token(hdr, buf, len);
}

/* Writes a response body after its headers; lws keeps what the socket does not take. */
static int http_body(struct lws *wsi, const void *body, size_t blen)
{
    if (!blen)
        return 0;
    uint8_t *buf = malloc(LWS_PRE + blen);
    if (!buf)
        return -1;
    memcpy(buf + LWS_PRE, body, blen);
    int n = lws_write(wsi, buf + LWS_PRE, blen, LWS_WRITE_HTTP_FINAL);
    free(buf);
    return n < 0 ? -1 : 0;
}

/* Writes a 200 text/plain response (the Prometheus text format's media type). */
static int http_send_text(struct lws *wsi, const char *body)
{
    size_t blen = strlen(body);
    uint8_t head[LWS_PRE + 512];
    uint8_t *start = head + LWS_PRE, *p = start, *end = head + sizeof(head) - 1;
    if (lws_add_http_common_headers(wsi, 200, "text/plain; version=0.0.4", blen, &p, end) ||
        lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    return http_body(wsi, body, blen);
}

/* Writes a whole JSON response now. */
static int http_reply(struct lws *wsi, unsigned status, const char *body)
{
    size_t blen = strlen(body);
    uint8_t head[LWS_PRE + 512];
    uint8_t *start = head + LWS_PRE, *p = start, *end = head + sizeof(head) - 1;
    if (lws_add_http_common_headers(wsi, status, "application/json", blen, &p, end) ||
        lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    return http_body(wsi, body, blen);
}

/*
 * Refuses a websocket upgrade with a status and a JSON body. Written by hand: during
 * HTTP_CONFIRM_UPGRADE lws has not recorded the request's HTTP version yet, and its header
 * helpers would answer "HTTP/1.0", which websocket clients reject (RFC 6455 wants 1.1).
 * Returns 1 (the connection is answered) or -1.
 */
static int refuse_upgrade(struct lws *wsi, unsigned status, const char *msg)
{
    static const struct {
        unsigned code;
        const char *text;
    } reasons[] = {{400, "Bad Request"},
                   {401, "Unauthorized"},
                   {403, "Forbidden"},
                   {404, "Not Found"},
                   {503, "Service Unavailable"}};
    const char *text = "Error";
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
        if (reasons[i].code == status)
            text = reasons[i].text;
    json_t *o = json_pack("{s:s}", "error", msg);
    char *body = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!body)
        return -1;
    uint8_t buf[LWS_PRE + 512];
    int n = snprintf((char *)buf + LWS_PRE, sizeof(buf) - LWS_PRE,
                     "HTTP/1.1 %u %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n%s\n",
                     status, text, strlen(body) + 1, body);
    free(body);
    if (n < 0 || (size_t)n >= sizeof(buf) - LWS_PRE)
        return -1;
    if (lws_write(wsi, buf + LWS_PRE, (size_t)n, LWS_WRITE_HTTP_FINAL) < n)
        return -1;
    return 1;
}

static int http_error(struct lws *wsi, unsigned status, const char *msg)
{
    char body[300];
    json_t *o = json_pack("{s:s}", "error", msg);
    char *s = json_dumps(o, JSON_COMPACT);
    snprintf(body, sizeof(body), "%s\n", s ? s : "{}");
    free(s);
    json_decref(o);
    return http_reply(wsi, status, body);
}

/* ---- routes ---- */

static void get_uri(struct lws *wsi, char *buf, size_t len)
{
    buf[0] = '\0';
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) < (int)len)
        lws_hdr_copy(wsi, buf, (int)len, WSI_TOKEN_GET_URI);
}

/* ---- the pty endpoint's query (PROTOCOL.md 14.7) ---- */

/*
 * Reads the query of a pty upgrade. lws has split it at '&' and decoded it already (%XX,
 * and '+' as a space, as in HTML forms). Returns 0, or -1 with the reason in why.
 */
static int parse_pty_query(struct lws *wsi, struct route_pty_query *q, char *why, size_t whylen)
{
    char arg[ROUTE_ARG_MAX + 1];
    route_pty_query_init(q);
    for (int i = 0; i < ROUTE_MAX_ARGS; i++) {
        int n = lws_hdr_copy_fragment(wsi, arg, (int)sizeof(arg), WSI_TOKEN_HTTP_URI_ARGS, i);
        if (n < 0) {
            if (lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i) >= (int)sizeof(arg)) {
                snprintf(why, whylen, "an argument is over %zu bytes (command: at most %u)",
                         ROUTE_ARG_MAX, PROTO_MAX_PTY_COMMAND);
                return -1;
            }
            break; /* no more arguments */
        }
        if (route_pty_query_arg(q, arg, (size_t)n, why, whylen) < 0)
            return -1;
    }
    return route_pty_query_finish(q, why, whylen);
}

/* ---- the web terminal (PROTOCOL.md 14.8) ---- */

/*
 * The page at /w/NAME, its login form at /w/NAME/login, and its assets under /web/. The
 * user token rides in an HttpOnly, SameSite=Strict cookie, never in a URL or the page; it
 * is accepted on GET /w/NAME and on the pty websocket, where the Origin must then be the
 * relay itself (no cross-site websocket hijacking).
 */
#define WEB_TOKEN_MAX 1024u
#define WEB_BODY_MAX 4096u
/*
 * A login form's whole body must arrive within this long of its headers. lws's own content
 * timeout (5 s) starts again with every piece, so a byte every few seconds would hold the
 * connection for as long as the client likes.
 */
#define WEB_BODY_TIMEOUT_MS 10000u
#define WEB_COOKIE_MAX_AGE "2592000" /* 30 days */
#define WEB_HEAD_MAX (LWS_PRE + 6144u)

/* Scripts only from the relay. xterm.js writes <style> elements, hence inline styles. */
static const char web_csp[] =
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'";
static const char web_no_assets[] =
    "built without the web terminal assets: run npm ci in tunnel/web\n";

/* A POST to /w/NAME/login being read. */
struct web_login {
    char name[TOKENS_MAX_NAME + 1];
    uint64_t deadline; /* uv_now() by which the body must be complete */
    char body[WEB_BODY_MAX + 1];
    size_t len;
    bool too_big;
};

/* The token in the request's tether_token cookie into buf; false if there is none. */
static bool cookie_token(struct lws *wsi, char *buf, size_t len)
{
    char hdr[4096];
    buf[0] = '\0';
    int total = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_COOKIE);
    if (total <= 0 || total >= (int)sizeof(hdr))
        return false;
    if (lws_hdr_copy(wsi, hdr, sizeof(hdr), WSI_TOKEN_HTTP_COOKIE) <= 0)
        return false;
    return route_cookie_token(hdr, buf, len);
}

/* Is the request's Origin this relay itself (scheme, host and port as in Host)? */
static bool origin_is_self(struct lws *wsi)
{
    char origin[512], host[400];
    if (lws_hdr_total_length(wsi, WSI_TOKEN_ORIGIN) >= (int)sizeof(origin) ||
        lws_hdr_total_length(wsi, WSI_TOKEN_HOST) >= (int)sizeof(host))
        return false;
    if (lws_hdr_copy(wsi, origin, sizeof(origin), WSI_TOKEN_ORIGIN) <= 0 ||
        lws_hdr_copy(wsi, host, sizeof(host), WSI_TOKEN_HOST) <= 0)
        return false;
    return route_origin_is_self(origin, host, lws_is_ssl(wsi));
}

struct web_header {
    const char *name; /* lowercase, with the colon */
    const char *value;
};

/* Writes a whole web response with the page's security headers and extra ones. */
static int web_send(struct lws *wsi, unsigned status, const char *ctype, const char *cache,
                    const struct web_header *extra, size_t nextra, const void *body, size_t blen)
{
    uint8_t *head = malloc(WEB_HEAD_MAX);
    if (!head)
        return -1;
    uint8_t *start = head + LWS_PRE, *p = start, *end = head + WEB_HEAD_MAX - 1;
    const struct web_header common[] = {
        {"cache-control:", cache},
        {"content-security-policy:", web_csp},
        {"x-content-type-options:", "nosniff"},
        {"referrer-policy:", "no-referrer"},
        {"x-frame-options:", "DENY"},
    };
    int rc = lws_add_http_common_headers(wsi, status, ctype, blen, &p, end);
    for (size_t i = 0; !rc && i < sizeof(common) / sizeof(common[0]); i++)
        rc = lws_add_http_header_by_name(wsi, (const unsigned char *)common[i].name,
                                         (const unsigned char *)common[i].value,
                                         (int)strlen(common[i].value), &p, end);
    for (size_t i = 0; !rc && i < nextra; i++)
        rc = lws_add_http_header_by_name(wsi, (const unsigned char *)extra[i].name,
                                         (const unsigned char *)extra[i].value,
                                         (int)strlen(extra[i].value), &p, end);
    if (rc || lws_finalize_write_http_header(wsi, start, &p, end)) {
        free(head);
        return -1;
    }
    free(head);
    return http_body(wsi, body, blen);
}

static int web_text(struct lws *wsi, unsigned status, const char *text)
{
    return web_send(wsi, status, "text/plain; charset=utf-8", "no-store", NULL, 0, text,
                    strlen(text));
}

static int web_redirect(struct lws *wsi, const char *location, const char *cookie)
{
    struct web_header h[] = {{"location:", location}, {"set-cookie:", cookie}};
    return web_send(wsi, 303, "text/plain; charset=utf-8", "no-store", h, cookie ? 2 : 1, "", 0);
}

/* The login form for workspace name (valid names need no escaping in HTML). */
static int web_login_page(struct lws *wsi, unsigned status, const char *name, const char *msg)
{
    char page[2048];
    int n = snprintf(page, sizeof(page),
                     "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                     "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                     "<title>tether: %s</title><link rel=\"icon\" href=\"data:,\">"
                     "<link rel=\"stylesheet\" href=\"/web/term.css\">"
                     "<script src=\"/web/login.js\" defer></script></head>\n"
                     "<body class=\"login\"><form id=\"login\" method=\"post\" "
                     "action=\"/w/%s/login\"><h1>tether: %s</h1><p class=\"msg\">%s</p>"
                     "<label for=\"token\">User token</label>"
                     "<input id=\"token\" name=\"token\" type=\"password\" "
                     "autocomplete=\"current-password\" required autofocus>"
                     "<button type=\"submit\">Log in</button></form></body></html>\n",
                     name, name, name, msg);
    if (n < 0 || (size_t)n >= sizeof(page))
        return -1;
    return web_send(wsi, status, "text/html; charset=utf-8", "no-store", NULL, 0, page, (size_t)n);
}

static int web_asset(struct lws *wsi, const char *uri)
{
    const struct web_asset *a = web_asset_find(uri);
    if (!a)
        return web_text(wsi, 404, "not found\n");
    char inm[128];
    struct web_header h[] = {{"etag:", a->etag}};
    if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_IF_NONE_MATCH) < (int)sizeof(inm) &&
        lws_hdr_copy(wsi, inm, sizeof(inm), WSI_TOKEN_HTTP_IF_NONE_MATCH) > 0 &&
        strcmp(inm, a->etag) == 0)
        return web_send(wsi, 304, a->content_type, "no-cache", h, 1, "", 0);
    return web_send(wsi, 200, a->content_type, "no-cache", h, 1, a->data, a->len);
}

/* GET /w/NAME: the page for a logged-in user, else a redirect to the login form. */
static int web_page(struct relay *r, struct lws *wsi, const char *name)
{
    char token[WEB_TOKEN_MAX + 1], location[TOKENS_MAX_NAME + 16];
    if (!web_assets_complete)
        return web_text(wsi, 503, web_no_assets);
    bearer_token(wsi, token, sizeof(token));
    if (!token[0])
        cookie_token(wsi, token, sizeof(token));
    if (!tokens_user_valid(r->tokens, token)) {
        snprintf(location, sizeof(location), "/w/%s/login", name);
        return web_redirect(wsi, location, NULL);
    }
    if (!workspace_find(r, name) || !tokens_user_allows(r->tokens, token, name))
        return web_text(wsi, 404, "no such workspace\n");
    const struct web_asset *a = web_asset_find("index.html");
    if (!a)
        return web_text(wsi, 500, "the page is missing\n");
    return web_send(wsi, 200, a->content_type, "no-store", NULL, 0, a->data, a->len);
}

static int web_logout(struct lws *wsi, const char *name)
{
    char location[TOKENS_MAX_NAME + 16], cookie[160];
    snprintf(location, sizeof(location), "/w/%s/login", name);
    snprintf(cookie, sizeof(cookie),
             ROUTE_COOKIE "=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict%s",
             lws_is_ssl(wsi) ? "; Secure" : "");
    return web_redirect(wsi, location, cookie);
}

/* The end of POST /w/NAME/login: a good token sets the cookie, a bad one gets 401. */
static int web_login_done(struct relay *r, struct lws *wsi, struct web_login *l)
{
    char token[WEB_TOKEN_MAX + 1];
    token[0] = '\0';
    if (!l->too_big) {
        l->body[l->len] = '\0';
        route_form_token(l->body, token, sizeof(token));
    }
    bool ok = token[0] && tokens_user_valid(r->tokens, token) && workspace_find(r, l->name) &&
              tokens_user_allows(r->tokens, token, l->name);
    if (!ok) {
        memset(token, 0, sizeof(token));
        return web_login_page(wsi, 401, l->name, "That token was refused.");
    }
    /* The cookie's value: the token with every byte outside [A-Za-z0-9._~-] as %XX, which
     * always fits (route_cookie_set). */
    size_t cap = sizeof(ROUTE_COOKIE) + 3 * WEB_TOKEN_MAX + 128;
    char *cookie = malloc(cap), location[TOKENS_MAX_NAME + 8];
    int rc = -1;
    if (cookie && route_cookie_set(token, cookie, cap) == 0) {
        size_t o = strlen(cookie);
        snprintf(cookie + o, cap - o,
                 "; Path=/; Max-Age=" WEB_COOKIE_MAX_AGE "; HttpOnly; SameSite=Strict%s",
                 lws_is_ssl(wsi) ? "; Secure" : "");
        snprintf(location, sizeof(location), "/w/%s", l->name);
        rc = web_redirect(wsi, location, cookie);
    }
    if (cookie)
        memset(cookie, 0, cap);
    memset(token, 0, sizeof(token));
    free(cookie);
    return rc;
}

/* pss may be NULL: see LWS_CALLBACK_CLOSED_HTTP in relay_callback. */
static void web_login_free(struct relay_pss *pss)
{
    if (!pss || pss->kind != PSS_LOGIN)
        return;
    struct web_login *l = pss->obj;
    memset(l, 0, sizeof(*l));
    free(l);
    pss->kind = PSS_NONE;
    pss->obj = NULL;
}

/*
 * A web request: returns 1 if it was not one (the JSON API goes on), 0 once answered, 2 when
 * a login body is to be read, -1 on failure.
 */
static int serve_web(struct relay *r, struct lws *wsi, struct relay_pss *pss, const char *uri)
{
    char name[TOKENS_MAX_NAME + 1];
    enum route_web_kind kind = route_web(uri, name);
    if (kind == ROUTE_WEB_NONE)
        return 1;
    bool get = lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) > 0;
    bool post = lws_hdr_total_length(wsi, WSI_TOKEN_POST_URI) > 0;
    if (kind == ROUTE_WEB_LOGIN && post) {
        char cl[32] = "";
        if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH) < (int)sizeof(cl))
            lws_hdr_copy(wsi, cl, sizeof(cl), WSI_TOKEN_HTTP_CONTENT_LENGTH);
        long want = strtol(cl, NULL, 10);
        if (want > (long)WEB_BODY_MAX)
            return web_text(wsi, 413, "request too large\n") < 0 ? -1 : 0;
        struct web_login *l = calloc(1, sizeof(*l));
        if (!l)
            return -1;
        snprintf(l->name, sizeof(l->name), "%s", name);
        l->deadline = uv_now(r->loop) + WEB_BODY_TIMEOUT_MS;
        web_login_free(pss);
        pss->kind = PSS_LOGIN;
        pss->obj = l;
        if (want <= 0) {
            int rc = web_login_done(r, wsi, l);
            web_login_free(pss);
            return rc < 0 ? -1 : 0;
        }
        return 2;
    }
    if (kind == ROUTE_WEB_LOGOUT && (get || post))
        return web_logout(wsi, name) < 0 ? -1 : 0;
    if (!get)
        return web_text(wsi, 405, "method not allowed\n") < 0 ? -1 : 0;
    int rc;
    switch (kind) {
    case ROUTE_WEB_PAGE:
        rc = web_page(r, wsi, name);
        break;
    case ROUTE_WEB_LOGIN:
        rc = web_login_page(wsi, 200, name, "");
        break;
    case ROUTE_WEB_ASSET:
        rc = web_asset(wsi, uri);
        break;
    default:
        rc = web_text(wsi, 404, "not found\n");
        break;
    }
    return rc < 0 ? -1 : 0;
}

/* A Prometheus label value: backslash, quote and newline escaped (the agent chose the
 * counter names; workspace names are plain). */
static void prom_label(struct bytebuf *b, const char *v)
{
    for (; *v; v++) {
        char c = *v;
        const char *esc = c == '\\' ? "\\\\" : c == '"' ? "\\\"" : c == '\n' ? "\\n" : NULL;
        if (esc)
            bytebuf_append(b, esc, 2);
        else
            bytebuf_append(b, &c, 1);
    }
}

static void prom_line(struct bytebuf *b, const char *metric, const char *ws, const char *label,
                      const char *lv, long long value)
{
    char num[32];
    bytebuf_append(b, metric, strlen(metric));
    bytebuf_append(b, "{workspace=\"", 12);
    prom_label(b, ws);
    if (label) {
        bytebuf_append(b, "\",", 2);
        bytebuf_append(b, label, strlen(label));
        bytebuf_append(b, "=\"", 2);
        prom_label(b, lv);
    }
    int n = snprintf(num, sizeof(num), "\"} %lld\n", value);
    bytebuf_append(b, num, (size_t)n);
}

/* GET /metrics: the Prometheus text format, the workspaces the token may see. */
static int serve_metrics(struct relay *r, struct lws *wsi, const char *token)
{
    static const struct {
        const char *name, *type, *help, *member, *label;
    } per_key[] = {
        {"tether_workspace_sessions", "gauge", "Open sessions by type.", "sessions", "type"},
        {"tether_workspace_rx_bytes", "counter",
         "Bytes into the workspace since its agent started.", "rx_bytes", "kind"},
        {"tether_workspace_tx_bytes", "counter",
         "Bytes out of the workspace since its agent started.", "tx_bytes", "kind"},
    };
    struct bytebuf b = {0};
    const char *head =
        "# HELP tether_workspace_connected 1 while the workspace's agent is connected.\n"
        "# TYPE tether_workspace_connected gauge\n";
    bytebuf_append(&b, head, strlen(head));
    for (size_t i = 0; i < r->nworkspaces; i++)
        if (tokens_user_allows(r->tokens, token, r->workspaces[i].name))
            prom_line(&b, "tether_workspace_connected", r->workspaces[i].name, NULL, NULL,
                      agent_ready(&r->workspaces[i]));
    head = "# HELP tether_workspace_lifecycle The workspace's lifecycle state, as its agent "
           "reported it.\n"
           "# TYPE tether_workspace_lifecycle gauge\n";
    bytebuf_append(&b, head, strlen(head));
    for (size_t i = 0; i < r->nworkspaces; i++) {
        const char *state = wsstatus_lifecycle(&r->workspaces[i].status);
        if (state && tokens_user_allows(r->tokens, token, r->workspaces[i].name))
            prom_line(&b, "tether_workspace_lifecycle", r->workspaces[i].name, "state", state, 1);
    }
    head = "# HELP tether_workspace_idle_seconds Seconds since the last activity.\n"
           "# TYPE tether_workspace_idle_seconds gauge\n";
    bytebuf_append(&b, head, strlen(head));
    for (size_t i = 0; i < r->nworkspaces; i++) {
        int64_t idle = idle_ms(r, &r->workspaces[i]);
        if (idle >= 0 && tokens_user_allows(r->tokens, token, r->workspaces[i].name))
            prom_line(&b, "tether_workspace_idle_seconds", r->workspaces[i].name, NULL, NULL,
                      idle / 1000);
    }
    for (size_t m = 0; m < sizeof(per_key) / sizeof(per_key[0]); m++) {
        char h[256];
        int n = snprintf(h, sizeof(h), "# HELP %s %s\n# TYPE %s %s\n", per_key[m].name,
                         per_key[m].help, per_key[m].name, per_key[m].type);
        bytebuf_append(&b, h, (size_t)n);
        for (size_t i = 0; i < r->nworkspaces; i++) {
            const struct relay_workspace *w = &r->workspaces[i];
            json_t *obj =
                w->status.stats ? json_object_get(w->status.stats, per_key[m].member) : NULL;
            if (!obj || !tokens_user_allows(r->tokens, token, w->name))
                continue;
            const char *k;
            json_t *v;
            json_object_foreach(obj, k, v) prom_line(&b, per_key[m].name, w->name, per_key[m].label,
                                                     k, (long long)json_integer_value(v));
        }
    }
    bytebuf_append(&b, "", 1); /* NUL: out of memory shows as a short body, never a crash */
    int rc = b.data ? http_send_text(wsi, (const char *)bytebuf_peek(&b)) : -1;
    bytebuf_free(&b);
    return rc;
}

/* Writes a 200 JSON response of body (released here), with a newline after it. */
static int http_json(struct lws *wsi, json_t *body)
{
    char *s = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!s)
        return http_error(wsi, 500, "out of memory");
    size_t n = strlen(s);
    char *withnl = realloc(s, n + 2);
    if (!withnl) {
        free(s);
        return http_error(wsi, 500, "out of memory");
    }
    memcpy(withnl + n, "\n", 2);
    int rc = http_reply(wsi, 200, withnl);
    free(withnl);
    return rc;
}

/*
 * Reads ?after=N of GET .../logs (0 if absent): decimal digits, at most INT64_MAX. Other
 * arguments are ignored. Returns 0, or -1 with the reason in why.
 */
static int parse_logs_query(struct lws *wsi, uint64_t *after, char *why, size_t whylen)
{
    char arg[ROUTE_ARG_MAX + 1];
    bool seen = false;
    *after = 0;
    for (int i = 0; i < ROUTE_MAX_ARGS; i++) {
        int n = lws_hdr_copy_fragment(wsi, arg, (int)sizeof(arg), WSI_TOKEN_HTTP_URI_ARGS, i);
        if (n < 0) {
            if (lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i) >= (int)sizeof(arg)) {
                snprintf(why, whylen, "an argument is over %zu bytes", ROUTE_ARG_MAX);
                return -1;
            }
            break; /* no more arguments */
        }
        if (route_logs_arg(arg, (size_t)n, after, &seen, why, whylen) < 0)
            return -1;
    }
    return 0;
}

/* GET .../logs?after=N: the kept log lines after line N (PROTOCOL.md 14.4.2). */
static int serve_logs(struct lws *wsi, const struct relay_workspace *w)
{
    uint64_t after;
    char why[128];
    if (parse_logs_query(wsi, &after, why, sizeof(why)) < 0)
        return http_error(wsi, 400, why);
    return http_json(
        wsi, logring_json(&w->status.logs, after, RELAY_LOGS_REPLY_LINES, RELAY_LOGS_REPLY_TEXT));
}

/* Did the request announce a body (a Content-Length other than 0, or a Transfer-Encoding)? */
static bool http_has_body(struct lws *wsi)
{
    char cl[32] = "";
    if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0)
        return true;
    int n = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH);
    if (n <= 0)
        return false;
    if (n >= (int)sizeof(cl) ||
        lws_hdr_copy(wsi, cl, sizeof(cl), WSI_TOKEN_HTTP_CONTENT_LENGTH) <= 0)
        return true;
    return cl[strspn(cl, "0")] != '\0';
}

/*
 * Ends a request answered without reading its body. lws would discard such a body (a POST
 * to the JSON API, a login body over WEB_BODY_MAX, a chunked one) piece by piece, each piece
 * restarting its content timeout, so a client sending a byte every few seconds could hold
 * the connection for ever: close it once the answer is out instead. Returns what the lws
 * callback returns.
 */
static int http_finish_unread(struct lws *wsi)
{
    if (http_has_body(wsi))
        return -1;
    return lws_http_transaction_completed(wsi) ? -1 : 0;
}

static int serve_http(struct relay *r, struct lws *wsi, const char *uri)
{
    char token[1100];
    struct route rt;
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0)
        return http_error(wsi, 405, "method not allowed");
    route_parse(uri, &rt);
    /* For load balancers and Kubernetes probes, which carry no token: it says nothing but
     * that the relay's loop is serving. */
    if (rt.kind == ROUTE_HEALTH)
        return http_json(wsi, json_pack("{s:s}", "status", "ok"));
    if (rt.kind != ROUTE_LIST && rt.kind != ROUTE_ONE && rt.kind != ROUTE_LOGS &&
        rt.kind != ROUTE_METRICS)
        return http_error(wsi, 404, "not found");
    bearer_token(wsi, token, sizeof(token));
    if (!tokens_user_valid(r->tokens, token))
        return http_error(wsi, 401, "unauthorized");
    if (rt.kind == ROUTE_METRICS)
        return serve_metrics(r, wsi, token);
    if (rt.kind == ROUTE_LIST) {
        json_t *body = json_array();
        for (size_t i = 0; body && i < r->nworkspaces; i++)
            if (tokens_user_allows(r->tokens, token, r->workspaces[i].name))
                json_array_append_new(body, workspace_json(r, &r->workspaces[i]));
        return http_json(wsi, body);
    }
    struct relay_workspace *w = workspace_find(r, rt.name);
    if (!w || !tokens_user_allows(r->tokens, token, rt.name))
        return http_error(wsi, 404, "no such workspace");
    if (rt.kind == ROUTE_LOGS)
        return serve_logs(wsi, w);
    return http_json(wsi, workspace_json(r, w));
}

/*
 * Decides an upgrade before the websocket exists, so refusals are plain HTTP statuses:
 * 401 for a missing or unknown token, 404 for a workspace the token may not see (whether it
 * exists or not), 400 for a bad pty query, 503 for a workspace whose agent is not
 * connected.
 */
static int confirm_upgrade(struct relay *r, struct lws *wsi)
{
    char uri[512], token[1100];
    struct route rt;
    get_uri(wsi, uri, sizeof(uri));
    route_parse(uri, &rt);
    bearer_token(wsi, token, sizeof(token));
    if (rt.kind == ROUTE_AGENT) {
        if (!tokens_agent_workspace(r->tokens, token))
            return refuse_upgrade(wsi, 401, "unauthorized");
        return 0;
    }
    if (!route_is_client(rt.kind))
        return refuse_upgrade(wsi, 404, "not found");
    /* The web terminal's cookie stands in for the header on pty upgrades from the relay's
     * own pages only: a cross-site page's websocket would carry it too (PROTOCOL.md 14.8). */
    if (!token[0] && rt.kind == ROUTE_PTY && cookie_token(wsi, token, sizeof(token)) &&
        !origin_is_self(wsi)) {
        memset(token, 0, sizeof(token));
        return refuse_upgrade(wsi, 403, "cross-origin request refused");
    }
    if (!tokens_user_valid(r->tokens, token))
        return refuse_upgrade(wsi, 401, "unauthorized");
    struct relay_workspace *w = workspace_find(r, rt.name);
    if (!w || !tokens_user_allows(r->tokens, token, rt.name))
        return refuse_upgrade(wsi, 404, "no such workspace");
    if (rt.kind == ROUTE_PTY) {
        struct route_pty_query q;
        char why[160], msg[200];
        if (parse_pty_query(wsi, &q, why, sizeof(why)) < 0) {
            snprintf(msg, sizeof(msg), "bad pty query: %s", why);
            return refuse_upgrade(wsi, 400, msg);
        }
    }
    if (!w->agent) {
        char msg[128];
        snprintf(msg, sizeof(msg), "workspace %s is offline", w->name);
        return refuse_upgrade(wsi, 503, msg);
    }
    return 0;
}

/* ---- output once the loop iteration's callbacks are done ---- */

static int agent_writable(struct relay *r, struct relay_agent *a);
static int client_writable(struct relay *r, struct relay_client *c);

static void flush_unlink(struct relay_pss *pss)
{
    if (!pss->flush_pprev)
        return;
    *pss->flush_pprev = pss->flush_next;
    if (pss->flush_next)
        pss->flush_next->flush_pprev = pss->flush_pprev;
    pss->flush_next = NULL;
    pss->flush_pprev = NULL;
}

/*
 * Writes what each queued agent or client has, if its socket has room: what the socket
 * does not take lws keeps and sends on POLLOUT, and any further output waits for WRITEABLE
 * as before. Connections that are closing (either end sent its close frame), or whose
 * socket is full, take the WRITEABLE path, where lws orders the close frames and sends
 * nothing after them.
 */
static void on_flush_idle(uv_idle_t *h)
{
    struct relay *r = h->data;
    while (r->flush) {
        struct relay_pss *pss = r->flush;
        struct lws *wsi = pss->flush_wsi;
        flush_unlink(pss);
        struct relay_agent *a = pss->kind == PSS_AGENT ? pss->obj : NULL;
        struct relay_client *c = pss->kind == PSS_CLIENT ? pss->obj : NULL;
        bool closing = a ? a->close_after_flush || a->peer_closed : c->closing || c->peer_closed;
        if (closing || lws_send_pipe_choked(wsi)) {
            lws_callback_on_writable(wsi);
            continue;
        }
        int rc = a ? agent_writable(r, a) : client_writable(r, c);
        if (rc < 0)
            wsctx_kill(wsi); /* what returning -1 from WRITEABLE would have done */
    }
    uv_idle_stop(h);
}

/* wsi (an agent's or a client's websocket) has output: write it before the loop polls again. */
static void want_write(struct relay *r, struct lws *wsi)
{
    struct relay_pss *pss = lws_wsi_user(wsi);
    if (!r->flush_running || !pss || (pss->kind != PSS_AGENT && pss->kind != PSS_CLIENT)) {
        lws_callback_on_writable(wsi);
        return;
    }
    if (pss->flush_pprev)
        return;
    pss->flush_wsi = wsi;
    pss->flush_next = r->flush;
    if (r->flush)
        r->flush->flush_pprev = &pss->flush_next;
    pss->flush_pprev = &r->flush;
    r->flush = pss;
    uv_idle_start(&r->flush_idle, on_flush_idle);
}

/* ---- client bridges ---- */

static void client_close(struct relay_client *c, int code, const char *reason)
{
    if (c->closing)
        return;
    c->closing = true;
    c->close_code = code;
    snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    /* Reading may be paused (the stream had no credit): the client's answering close must
     * get through, or the close waits out WSCTX_CLOSE_WAIT_S. What comes before it is
     * dropped (client_receive ignores a closing client). */
    lws_rx_flow_control(c->wsi, 1);
    lws_callback_on_writable(c->wsi);
}

static void client_detach(struct relay_client *c)
{
    struct relay_agent *a = c->agent;
    if (!a)
        return;
    for (struct relay_client **pp = &a->clients; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    c->agent = NULL;
    c->next = NULL;
}

/* Moves bytes the client sent beyond credit into the stream, and resumes reading if done. */
static void client_push_pending(struct relay_client *c)
{
    struct relay_agent *a = c->agent;
    if (!a || !c->stream || c->from_client.len == 0)
        return;
    int n = mux_stream_send(a->mux, c->stream, bytebuf_peek(&c->from_client), c->from_client.len);
    if (n > 0)
        bytebuf_consume(&c->from_client, (size_t)n);
    if (c->from_client.len == 0) {
        if (c->fin_from_client)
            mux_stream_shutdown(a->mux, c->stream);
        lws_rx_flow_control(c->wsi, 1);
    }
}

/* The OPEN for a client's route: tcp to 127.0.0.1:PORT, ssh, or pty with the zlib option. */
static int client_open_for(struct lws *wsi, const struct route *rt, struct proto_open *o)
{
    memset(o, 0, sizeof(*o));
    switch (rt->kind) {
    case ROUTE_TCP:
        o->kind = PROTO_KIND_TCP;
        o->port = (uint16_t)rt->port;
        snprintf(o->host, sizeof(o->host), "127.0.0.1");
        return 0;
    case ROUTE_SSH:
        o->kind = PROTO_KIND_SSH;
        return 0;
    case ROUTE_PTY: {
        struct route_pty_query q;
        char why[160];
        if (parse_pty_query(wsi, &q, why, sizeof(why)) < 0)
            return -1; /* confirm_upgrade answered 400 already */
        o->kind = PROTO_KIND_PTY;
        memcpy(o->pty_id, q.id, sizeof(o->pty_id));
        o->rows = q.rows;
        o->cols = q.cols;
        o->pty_options = PROTO_PTY_OPT_ZLIB;
        memcpy(o->command, q.command, sizeof(o->command));
        return 0;
    }
    default:
        return -1;
    }
}

static struct relay_pty *client_pty_new(void)
{
    struct relay_pty *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->conv = ptyconv_new(true);
    if (!p->conv) {
        free(p);
        return NULL;
    }
    return p;
}

static void client_pty_free(struct relay_pty *p)
{
    if (!p)
        return;
    ptyconv_free(p->conv);
    bytebuf_free(&p->from_agent);
    free(p);
}

static int client_established(struct relay *r, struct lws *wsi, struct relay_pss *pss)
{
    char uri[512];
    struct route rt;
    struct proto_open o;
    get_uri(wsi, uri, sizeof(uri));
    route_parse(uri, &rt);
    struct relay_workspace *w = workspace_find(r, rt.name);
    if (!route_is_client(rt.kind) || !w || !w->agent || client_open_for(wsi, &rt, &o) < 0)
        return -1; /* confirm_upgrade checked; the agent may have left since */
    struct relay_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -1;
    if (rt.kind == ROUTE_PTY && !(c->pty = client_pty_new())) {
        free(c);
        return -1;
    }
    c->wsi = wsi;
    chunkq_init(&c->to_client, LWS_PRE);
    pss->kind = PSS_CLIENT;
    pss->obj = c;
    r->nclients++;
    r->had_clients = true; /* a burst may open and close between two ticks */
    struct relay_agent *a = w->agent;
    int rc = mux_stream_open(a->mux, &o, c, &c->stream);
    if (rc < 0) {
        c->stream = 0;
        client_close(c, (enum lws_close_status)1013,
                     rc == MUX_E_LIMIT ? "too many streams to this workspace"
                                       : "workspace agent is not ready");
        return 0;
    }
    c->agent = a;
    c->next = a->clients;
    a->clients = c;
    if (rt.kind == ROUTE_TCP)
        log_debug("client stream %u to %s port %d", c->stream, w->name, rt.port);
    else
        log_debug("client stream %u to %s %s", c->stream, w->name,
                  rt.kind == ROUTE_PTY ? "pty" : "ssh");
    return 0;
}

/* ---- pty bridges (PROTOCOL.md 14.7) ---- */

/* Remembers that `used` agent bytes were inflated into what is queued up to p->queued. */
static void pty_mark(struct relay_pty *p, size_t used)
{
    if (used == 0)
        return;
    if (p->nmarks > 0) {
        struct relay_credit_mark *last =
            &p->marks[(p->mark_head + p->nmarks - 1) % RELAY_PTY_MARKS];
        if (p->nmarks == RELAY_PTY_MARKS || last->end == p->queued) {
            last->end = p->queued;
            last->bytes += used;
            return;
        }
    }
    p->marks[(p->mark_head + p->nmarks) % RELAY_PTY_MARKS] =
        (struct relay_credit_mark){.end = p->queued, .bytes = used};
    p->nmarks++;
}

/* Credit for agent bytes whose output the client's socket has taken (PROTOCOL.md 6). */
static void pty_release_credit(struct relay_client *c)
{
    struct relay_pty *p = c->pty;
    size_t n = 0;
    while (p->nmarks > 0 && p->marks[p->mark_head].end <= p->written) {
        n += p->marks[p->mark_head].bytes;
        p->mark_head = (p->mark_head + 1) % RELAY_PTY_MARKS;
        p->nmarks--;
    }
    if (n && c->agent && c->stream)
        mux_stream_consumed(c->agent->mux, c->stream, n);
}

/* The stream's bytes from the agent are unusable (or we ran out of memory): end it. */
static void pty_fail(struct relay_client *c, int err)
{
    bool peer = err == PTYCONV_E_RECORD || err == PTYCONV_E_INFLATE;
    const char *why = ptyconv_strerror(err);
    if (c->agent && c->stream) {
        log_warn("workspace %s: pty stream %u: %s", c->agent->ws->name, c->stream, why);
        mux_stream_reset(c->agent->mux, c->stream, peer ? PROTO_CODE_PROTOCOL : PROTO_CODE_INTERNAL,
                         why);
    }
    c->stream = 0;
    client_detach(c);
    client_close(
        c, peer ? client_close_code(PROTO_CODE_PROTOCOL) : LWS_CLOSE_STATUS_UNEXPECTED_CONDITION,
        why);
}

static bool pty_work_left(const struct relay_client *c)
{
    return c->pty->from_agent.len > 0 || ptyconv_agent_pending(c->pty->conv);
}

/*
 * Inflates agent bytes from in into the client's queue while it is below
 * RELAY_PTY_OUTPUT_HIGH, for at most RELAY_PTY_PUMP_CALLS calls. *taken says how many
 * bytes of in were used. Returns 0 or a PTYCONV_E_* error.
 */
static int pty_inflate(struct relay_client *c, const uint8_t *in, size_t len, size_t *taken)
{
    struct relay_pty *p = c->pty;
    *taken = 0;
    for (unsigned i = 0; i < RELAY_PTY_PUMP_CALLS; i++) {
        if (c->to_client.len >= RELAY_PTY_OUTPUT_HIGH ||
            (*taken == len && !ptyconv_agent_pending(p->conv)))
            break;
        size_t room, used, produced;
        uint8_t *tail = chunkq_tail(&c->to_client, RELAY_PTY_INFLATE_ROOM, &room);
        if (!tail)
            return PTYCONV_E_NOMEM;
        int rc = ptyconv_agent_output(p->conv, len > *taken ? in + *taken : NULL, len - *taken,
                                      &used, tail, room, &produced);
        if (rc)
            return rc;
        chunkq_commit(&c->to_client, produced);
        p->queued += produced;
        *taken += used;
        pty_mark(p, used);
    }
    return 0;
}

/* Inflates what is held from the agent. Returns 0, or -1 once the client is being closed. */
static int pty_pump(struct relay_client *c)
{
    struct relay_pty *p = c->pty;
    size_t taken = 0;
    int rc = pty_inflate(c, p->from_agent.len ? bytebuf_peek(&p->from_agent) : NULL,
                         p->from_agent.len, &taken);
    bytebuf_consume(&p->from_agent, taken);
    if (p->from_agent.len == 0)
        bytebuf_free(&p->from_agent); /* an idle terminal holds no buffer */
    if (rc) {
        pty_fail(c, rc);
        return -1;
    }
    pty_release_credit(c);
    return 0;
}

/* DATA from the agent: inflated now if nothing waits before it, else held in order. */
static void pty_agent_data(struct relay_client *c, const uint8_t *data, size_t len)
{
    struct relay_pty *p = c->pty;
    size_t taken = 0;
    int rc = 0;
    if (p->from_agent.len == 0)
        rc = pty_inflate(c, data, len, &taken);
    if (rc == 0 && taken < len && bytebuf_append(&p->from_agent, data + taken, len - taken) < 0)
        rc = PTYCONV_E_NOMEM;
    if (rc) {
        pty_fail(c, rc);
        return;
    }
    pty_release_credit(c);
    want_write(c->agent->relay, c->wsi);
}

/* The agent's FIN (after EXIT): input has nowhere to go now; our FIN ends the stream. */
static void pty_agent_fin(struct relay_client *c)
{
    c->fin_from_agent = true;
    if (c->agent && c->stream) {
        bytebuf_free(&c->from_client);
        mux_stream_shutdown(c->agent->mux, c->stream);
        lws_rx_flow_control(c->wsi, 1);
    }
    lws_callback_on_writable(c->wsi);
}

/* Sends the client's converted bytes under credit; reading pauses while some are left. */
static void pty_send_to_agent(struct relay_client *c)
{
    if (c->from_client.len == 0)
        return;
    int n = mux_stream_send(c->agent->mux, c->stream, bytebuf_peek(&c->from_client),
                            c->from_client.len);
    if (n > 0)
        bytebuf_consume(&c->from_client, (size_t)n);
    if (c->from_client.len > 0)
        lws_rx_flow_control(c->wsi, 0); /* client_push_pending resumes it */
}

/* A text (JSON) or binary (raw input) message, or a piece of one, from the client. */
static void pty_client_receive(struct relay_client *c, const uint8_t *in, size_t len, bool binary,
                               bool first, bool final)
{
    if (!c->agent || !c->stream || c->fin_from_agent)
        return; /* the stream is gone or ending: input has nowhere to go */
    char why[128];
    int rc = binary ? ptyconv_client_input(c->pty->conv, in, len, &c->from_client)
                    : ptyconv_client_text(c->pty->conv, in, len, first, final, &c->from_client, why,
                                          sizeof(why));
    if (rc == PTYCONV_E_IGNORED) {
        log_info("workspace %s: pty stream %u: client message ignored: %s", c->agent->ws->name,
                 c->stream, why);
        rc = 0;
    }
    if (rc < 0) {
        /* The deflate stream toward the agent may be cut mid-flush: it cannot go on. */
        client_close(c, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION, ptyconv_strerror(rc));
        return;
    }
    pty_send_to_agent(c);
}

/* Output first, one message per WRITEABLE; then {"exit": N} and 1000 once the agent ended. */
static int pty_writable(struct relay *r, struct relay_client *c)
{
    struct relay_pty *p = c->pty;
    size_t n;
    uint8_t *front = chunkq_front(&c->to_client, &n);
    if (front) {
        if (lws_write(c->wsi, front, n, LWS_WRITE_BINARY) < (int)n)
            return -1;
        chunkq_consume(&c->to_client, n);
        p->written += n;
    }
    if (pty_pump(c) < 0)
        return 0; /* closing: the close frame goes out on the next WRITEABLE */
    if (c->to_client.len > 0 || pty_work_left(c)) {
        lws_callback_on_writable(c->wsi);
        return 0;
    }
    if (!c->fin_from_agent)
        return 0;
    if (front) { /* one lws_write per WRITEABLE: the end goes out on the next */
        lws_callback_on_writable(c->wsi);
        return 0;
    }
    int status = ptyconv_exit_status(p->conv);
    if (status >= 0 && !p->exit_sent) {
        p->exit_sent = true;
        int len = snprintf((char *)r->out + LWS_PRE, 32, "{\"exit\":%d}", status);
        if (lws_write(c->wsi, r->out + LWS_PRE, (size_t)len, LWS_WRITE_TEXT) < len)
            return -1;
    }
    /* Without an EXIT record the agent ended the stream anyway: a normal close, no status. */
    client_close(c, LWS_CLOSE_STATUS_NORMAL, "");
    return 0;
}

static void client_receive(struct relay_client *c, const uint8_t *in, size_t len, bool binary,
                           bool first, bool final)
{
    if (c->closing || c->peer_closed)
        return;
    if (c->pty) {
        pty_client_receive(c, in, len, binary, first, final);
        return;
    }
    if (!binary) {
        client_close(c, LWS_CLOSE_STATUS_UNACCEPTABLE_OPCODE, "text messages are not accepted");
        return;
    }
    if (len == 0 && first && final) { /* an empty message is the client's end of stream */
        c->fin_from_client = true;
        if (c->agent && c->stream && c->from_client.len == 0)
            mux_stream_shutdown(c->agent->mux, c->stream);
        return;
    }
    if (!c->agent || !c->stream || c->fin_from_client)
        return; /* the stream is gone: the close is on its way */
    size_t taken = 0;
    if (c->from_client.len == 0) {
        int n = mux_stream_send(c->agent->mux, c->stream, in, len);
        taken = n > 0 ? (size_t)n : 0;
    }
    if (taken < len) {
        if (bytebuf_append(&c->from_client, in + taken, len - taken) < 0) {
            client_close(c, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION, "out of memory");
            return;
        }
        lws_rx_flow_control(c->wsi, 0); /* resumes when the stream has credit again */
    }
}

static int client_writable(struct relay *r, struct relay_client *c)
{
    if (c->closing) {
        if (!c->close_sent) {
            c->close_sent = true;
            wsctx_close_ws(c->wsi, c->close_code, c->close_reason);
        }
        return 0;
    }
    if (c->pty)
        return pty_writable(r, c);
    size_t n;
    uint8_t *front = chunkq_front(&c->to_client, &n);
    if (front) {
        /* lws writes the frame header into the LWS_PRE bytes the block keeps in front. */
        if (lws_write(c->wsi, front, n, LWS_WRITE_BINARY) < (int)n)
            return -1;
        chunkq_consume(&c->to_client, n);
        if (c->agent && c->stream)
            mux_stream_consumed(c->agent->mux, c->stream, n);
        if (c->to_client.len > 0 || c->fin_from_agent)
            lws_callback_on_writable(c->wsi);
        return 0;
    }
    if (c->fin_from_agent && !c->fin_to_client_sent) {
        c->fin_to_client_sent = true;
        if (lws_write(c->wsi, r->out + LWS_PRE, 0, LWS_WRITE_BINARY) < 0)
            return -1;
    }
    /* Both ends said all they had: a normal close. */
    if (c->fin_to_client_sent && c->fin_from_client && !c->stream)
        client_close(c, LWS_CLOSE_STATUS_NORMAL, "");
    return 0;
}

static void client_closed(struct relay_client *c)
{
    if (c->agent && c->stream)
        mux_stream_reset(c->agent->mux, c->stream, PROTO_CODE_CANCEL, "client went away");
    client_detach(c);
    chunkq_free(&c->to_client);
    bytebuf_free(&c->from_client);
    client_pty_free(c->pty);
    free(c);
}

/* ---- agent tunnel: mux callbacks ---- */

static void a_stream_opened(void *ud, uint32_t id, const struct proto_open *o)
{
    struct relay_agent *a = ud;
    (void)o;
    /* Agents open no streams toward the relay in this version. */
    mux_stream_reject(a->mux, id, PROTO_CODE_UNSUPPORTED, "the relay accepts no streams");
}

static void a_open_result(void *ud, uint32_t id, void *sud, uint32_t code, const char *text,
                          size_t len)
{
    struct relay_client *c = sud;
    (void)ud;
    (void)id;
    if (code == 0)
        return; /* OPEN_OK: bytes already queued go out now */
    char reason[124];
    copy_text(reason, sizeof(reason), text, len);
    if (!reason[0])
        snprintf(reason, sizeof(reason), "%s", proto_code_name(code));
    c->stream = 0;
    client_detach(c);
    client_close(c, client_close_code(code), reason);
}

static void a_stream_data(void *ud, uint32_t id, void *sud, const uint8_t *data, size_t len)
{
    struct relay_agent *a = ud;
    struct relay_client *c = sud;
    (void)id;
    if (c->closing)
        return;
    if (c->pty) {
        pty_agent_data(c, data, len);
        return;
    }
    if (chunkq_append(&c->to_client, data, len) < 0) {
        client_close(c, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION, "out of memory");
        return;
    }
    want_write(a->relay, c->wsi);
}

static void a_stream_fin(void *ud, uint32_t id, void *sud)
{
    struct relay_client *c = sud;
    (void)ud;
    (void)id;
    if (c->pty) {
        pty_agent_fin(c);
        return;
    }
    c->fin_from_agent = true;
    lws_callback_on_writable(c->wsi);
}

static void a_stream_writable(void *ud, uint32_t id, void *sud)
{
    (void)ud;
    (void)id;
    client_push_pending(sud);
}

static void a_stream_closed(void *ud, uint32_t id, void *sud, uint32_t code, const char *text,
                            size_t len)
{
    struct relay_client *c = sud;
    (void)ud;
    (void)id;
    c->stream = 0;
    client_detach(c);
    if (code == 0) {
        lws_callback_on_writable(c->wsi); /* flush, then FIN, then close */
        return;
    }
    char reason[124];
    copy_text(reason, sizeof(reason), text, len);
    client_close(c, client_close_code(code), reason[0] ? reason : proto_code_name(code));
}

static void a_control(void *ud, json_t *msg)
{
    struct relay_agent *a = ud;
    const char *type = json_string_value(json_object_get(msg, "type"));
    struct relay_workspace *w = a->ws;
    if (!a->current)
        return; /* a replaced connection's reports are stale */
    /* proto checked the schema of every known type */
    if (wsstatus_control(&w->status, w->name, msg, uv_now(a->relay->loop), unix_ms()))
        return;
    if (strcmp(type, "hello") != 0)
        return;
    /* proto_control_validate checked these are strings; they are still the agent's words. */
    const struct {
        const char *key;
        char *dst;
        size_t cap;
    } fields[] = {
        {"version", w->agent_version, sizeof(w->agent_version)},
        {"hostname", w->hostname, sizeof(w->hostname)},
        {"os", w->os, sizeof(w->os)},
        {"arch", w->arch, sizeof(w->arch)},
    };
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        json_t *v = json_object_get(msg, fields[i].key);
        copy_text(fields[i].dst, fields[i].cap, json_string_value(v), json_string_length(v));
    }
    log_info("workspace %s: agent %s on %s (%s/%s) connected", w->name, w->agent_version,
             w->hostname, w->os, w->arch);
    wsstatus_agent_hello(&w->status);
    json_t *manifest =
        manifestfile_manifest(a->relay->manifest, w->name, a->relay->cfg.stats_interval_s);
    int rc = manifest ? mux_send_control(a->mux, manifest) : MUX_E_NOMEM;
    json_decref(manifest);
    if (rc < 0) /* relay_new checked that every manifest is valid and fits in a frame */
        log_error("workspace %s: cannot send the manifest (error %d)", w->name, rc);
}

static void a_hello(void *ud, const struct proto_hello *peer)
{
    (void)ud;
    (void)peer;
}

/* Closes the tunnel once the output is flushed; a peer that does not read gets killed. */
static void agent_close_soon(struct relay_agent *a)
{
    if (a->close_after_flush)
        return;
    a->close_after_flush = true;
    a->close_deadline = uv_now(a->relay->loop) + RELAY_CLOSE_WAIT_MS;
    lws_callback_on_writable(a->wsi);
}

/* After GOAWAY (sent or received) open streams may finish, for a while (PROTOCOL.md 8). */
static void agent_drain(struct relay_agent *a)
{
    if (!a->drain_deadline)
        a->drain_deadline = uv_now(a->relay->loop) + RELAY_DRAIN_MS;
    if (mux_stream_count(a->mux) == 0)
        agent_close_soon(a);
}

static void a_goaway(void *ud, uint32_t code, const char *text, size_t len)
{
    struct relay_agent *a = ud;
    log_info("workspace %s: agent sent GOAWAY: %s%s%.*s", a->ws->name, proto_code_name(code),
             len ? ": " : "", (int)len, text);
    agent_drain(a);
}

static void a_want_write(void *ud)
{
    struct relay_agent *a = ud;
    want_write(a->relay, a->wsi);
}

static const struct mux_callbacks agent_mux_cb = {
    .stream_opened = a_stream_opened,
    .stream_open_result = a_open_result,
    .stream_data = a_stream_data,
    .stream_fin = a_stream_fin,
    .stream_writable = a_stream_writable,
    .stream_closed = a_stream_closed,
    .control = a_control,
    .hello = a_hello,
    .goaway = a_goaway,
    .want_write = a_want_write,
};

/* ---- agent connections ---- */

static void agent_make_current(struct relay_agent *a)
{
    struct relay_workspace *w = a->ws;
    struct relay_agent *old = w->agent;
    if (old && old != a) {
        log_info("workspace %s: a new agent connection replaces the old one", w->name);
        old->current = false;
        mux_goaway(old->mux, PROTO_CODE_REPLACED, "another agent connected for this workspace");
        agent_drain(old);
    }
    w->agent = a;
    a->current = true;
    w->agent_version[0] = w->hostname[0] = w->os[0] = w->arch[0] = '\0';
}

static int agent_established(struct relay *r, struct lws *wsi, struct relay_pss *pss)
{
    char token[1100];
    bearer_token(wsi, token, sizeof(token));
    const char *name = tokens_agent_workspace(r->tokens, token);
    struct relay_workspace *w = name ? workspace_find(r, name) : NULL;
    if (!w)
        return -1;
    struct relay_agent *a = calloc(1, sizeof(*a));
    if (!a)
        return -1;
    struct mux_config mc;
    mux_config_default(&mc, MUX_ROLE_RELAY);
    mc.keepalive_idle_ms = r->cfg.keepalive_idle_ms;
    mc.keepalive_timeout_ms = r->cfg.keepalive_timeout_ms;
    a->relay = r;
    a->wsi = wsi;
    a->ws = w;
    a->mux = mux_new(&mc, &agent_mux_cb, a, uv_now(r->loop));
    if (!a->mux) {
        free(a);
        return -1;
    }
    a->next = r->agents;
    r->agents = a;
    pss->kind = PSS_AGENT;
    pss->obj = a;
    w->last_seen_ms = unix_ms();
    agent_make_current(a);
    lws_callback_on_writable(wsi);
    return 0;
}

static void agent_receive(struct relay_agent *a, const uint8_t *in, size_t len, bool binary,
                          bool final)
{
    if (a->close_after_flush || a->peer_closed)
        return;
    if (a->current)
        a->ws->last_seen_ms = unix_ms();
    wsctx_confirm_valid(a->wsi, uv_now(a->relay->loop), &a->validity_ms);
    int rc = binary ? mux_feed(a->mux, in, len, uv_now(a->relay->loop)) : MUX_E_PROTOCOL;
    if (rc == 0 && final)
        rc = mux_message_end(a->mux);
    if (rc < 0) {
        if (!binary)
            mux_goaway(a->mux, PROTO_CODE_PROTOCOL, "text message on the tunnel");
        log_warn("workspace %s: agent broke the protocol; closing its tunnel", a->ws->name);
        agent_close_soon(a);
    }
}

static int agent_writable(struct relay *r, struct relay_agent *a)
{
    size_t n = mux_output(a->mux, r->out + LWS_PRE, MUX_OUTPUT_MIN);
    if (n > 0 && lws_write(a->wsi, r->out + LWS_PRE, n, LWS_WRITE_BINARY) < (int)n)
        return -1;
    if (mux_wants_output(a->mux)) {
        lws_callback_on_writable(a->wsi);
        return 0;
    }
    if (a->close_after_flush) {
        wsctx_close_ws(a->wsi, LWS_CLOSE_STATUS_NORMAL, "goaway");
        return 0;
    }
    return 0;
}

static void agent_closed(struct relay *r, struct relay_agent *a)
{
    if (a->current) {
        a->ws->agent = NULL;
        log_info("workspace %s: agent disconnected", a->ws->name);
    }
    mux_fail_all(a->mux, PROTO_CODE_CANCEL, "workspace agent disconnected");
    /* mux_fail_all detached every client through stream_closed. */
    mux_free(a->mux);
    for (struct relay_agent **pp = &r->agents; *pp; pp = &(*pp)->next)
        if (*pp == a) {
            *pp = a->next;
            break;
        }
    free(a);
}

static void on_idle_exit(uv_process_t *p, int64_t status, int signum)
{
    log_info("--on-idle command for %s ended (status %lld%s%s)", (char *)p->data, (long long)status,
             signum ? ", signal " : "", signum ? strsignal(signum) : "");
    uv_close((uv_handle_t *)p, (uv_close_cb)free);
}

/* Runs the --on-idle command for w, once per idle period. */
static void run_on_idle(struct relay *r, struct relay_workspace *w)
{
    extern char **environ;
    size_t n = 0;
    while (environ[n])
        n++;
    char var[TOKENS_MAX_NAME + 32];
    snprintf(var, sizeof(var), "TETHER_WORKSPACE=%s", w->name);
    char **env = calloc(n + 2, sizeof(char *));
    /* The process handle and the name it logs live in one block, freed when it closes. */
    uv_process_t *p = malloc(sizeof(*p) + sizeof(w->name));
    if (!env || !p) {
        free(env);
        free(p);
        log_error("--on-idle for %s: out of memory", w->name);
        return;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "TETHER_WORKSPACE=", 17) != 0)
            env[k++] = environ[i];
    env[k++] = var;
    env[k] = NULL;
    char *args[] = {"/bin/sh", "-c", (char *)r->cfg.on_idle, NULL};
    uv_process_options_t o = {.exit_cb = on_idle_exit, .file = "/bin/sh", .args = args, .env = env};
    p->data = (char *)(p + 1);
    memcpy(p->data, w->name, sizeof(w->name));
    int rc = uv_spawn(r->loop, p, &o);
    free(env);
    if (rc < 0) {
        log_error("--on-idle for %s: cannot run: %s", w->name, uv_strerror(rc));
        uv_close((uv_handle_t *)p, (uv_close_cb)free);
        return;
    }
    log_info("workspace %s idle for %llu s: ran --on-idle (pid %d)", w->name,
             (unsigned long long)(idle_ms(r, w) / 1000), p->pid);
}

static void check_idle(struct relay *r)
{
    if (!r->cfg.idle_timeout_ms || !r->cfg.on_idle)
        return;
    for (size_t i = 0; i < r->nworkspaces; i++) {
        struct relay_workspace *w = &r->workspaces[i];
        int64_t idle = idle_ms(r, w);
        if (idle < 0)
            continue;
        if ((uint64_t)idle < r->cfg.idle_timeout_ms) {
            w->idle_fired = false; /* activity ended the idle period */
        } else if (!w->idle_fired) {
            w->idle_fired = true;
            run_on_idle(r, w);
        }
    }
}

/*
 * The last client connection is gone: give the heap's free pages back. glibc returns only
 * the top of the heap by itself: after 1,000 forward streams closed the relay kept 19 MB of
 * anonymous memory it no longer used.
 */
static void trim_when_clients_gone(struct relay *r)
{
    bool has = r->nclients > 0;
    if (!has && r->had_clients)
        heap_trim();
    r->had_clients = has;
}

static void on_tick(uv_timer_t *t)
{
    struct relay *r = t->data;
    uint64_t now = uv_now(r->loop);
    check_idle(r);
    trim_when_clients_gone(r);
    for (struct relay_agent *a = r->agents; a; a = a->next) {
        if (a->close_after_flush) {
            if (now >= a->close_deadline)
                wsctx_kill(a->wsi); /* it never took our last bytes */
            continue;
        }
        if (a->drain_deadline && (mux_stream_count(a->mux) == 0 || now >= a->drain_deadline)) {
            agent_close_soon(a);
            continue;
        }
        if (mux_tick(a->mux, now) == MUX_E_TIMEOUT) {
            log_warn("workspace %s: no traffic from the agent for %u ms; dropping it", a->ws->name,
                     r->cfg.keepalive_timeout_ms);
            a->close_after_flush = true;
            if (a->current) {
                a->ws->agent = NULL; /* offline now, even before the socket is torn down */
                a->current = false;
            }
            /* A dead peer will not read a close frame: drop the socket now. */
            wsctx_kill(a->wsi);
        }
    }
}

/* ---- the lws callback ---- */

static int relay_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                          size_t len)
{
    struct relay_pss *pss = user;
    struct lws_vhost *vh = lws_get_vhost(wsi);
    struct relay *r = vh ? lws_get_vhost_user(vh) : NULL;
    if (!r)
        return lws_callback_http_dummy(wsi, reason, user, in, len);

    switch (reason) {
    case LWS_CALLBACK_HTTP: {
        int rc = serve_web(r, wsi, pss, in);
        if (rc == 2)
            return 0; /* the login form's body follows */
        if (rc == 1)
            rc = serve_http(r, wsi, in);
        if (rc < 0)
            return -1;
        return http_finish_unread(wsi);
    }
    case LWS_CALLBACK_HTTP_BODY:
        if (pss->kind == PSS_LOGIN) {
            struct web_login *l = pss->obj;
            if (uv_now(r->loop) > l->deadline) {
                log_info("web login: the form's body took over %u ms: connection dropped",
                         WEB_BODY_TIMEOUT_MS);
                return -1;
            }
            if (len > WEB_BODY_MAX - l->len)
                l->too_big = true;
            else {
                memcpy(l->body + l->len, in, len);
                l->len += len;
            }
            return 0;
        }
        return lws_callback_http_dummy(wsi, reason, user, in, len);
    case LWS_CALLBACK_HTTP_BODY_COMPLETION:
        if (pss->kind == PSS_LOGIN) {
            int rc = web_login_done(r, wsi, pss->obj);
            web_login_free(pss);
            if (rc < 0)
                return -1;
            return lws_http_transaction_completed(wsi) ? -1 : 0;
        }
        return lws_callback_http_dummy(wsi, reason, user, in, len);
    case LWS_CALLBACK_CLOSED_HTTP:
        /* lws allocates the per-session data only when a request's headers are complete: a
         * connection that times out before that (slowloris) comes here with pss NULL. */
        web_login_free(pss);
        return lws_callback_http_dummy(wsi, reason, user, in, len);
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        if (strcmp(in, "websocket") != 0)
            return -1;
        return confirm_upgrade(r, wsi);
    case LWS_CALLBACK_ESTABLISHED: {
        char uri[512];
        struct route rt;
        get_uri(wsi, uri, sizeof(uri));
        route_parse(uri, &rt);
        memset(pss, 0, sizeof(*pss));
        if (rt.kind == ROUTE_AGENT)
            return agent_established(r, wsi, pss);
        return client_established(r, wsi, pss);
    }
    case LWS_CALLBACK_RECEIVE:
        if (pss->kind == PSS_AGENT)
            agent_receive(pss->obj, in, len, lws_frame_is_binary(wsi), lws_is_final_fragment(wsi));
        else if (pss->kind == PSS_CLIENT)
            client_receive(pss->obj, in, len, lws_frame_is_binary(wsi), lws_is_first_fragment(wsi),
                           lws_is_final_fragment(wsi));
        return 0;
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        /* lws answers the close, but frames that followed it in the same read still come
         * as RECEIVE: they must go nowhere (RFC 6455 5.5.1: nothing is sent after a close). */
        if (pss->kind == PSS_AGENT)
            ((struct relay_agent *)pss->obj)->peer_closed = true;
        else if (pss->kind == PSS_CLIENT)
            ((struct relay_client *)pss->obj)->peer_closed = true;
        return 0;
    case LWS_CALLBACK_SERVER_WRITEABLE:
        if (pss->kind == PSS_AGENT)
            return agent_writable(r, pss->obj);
        if (pss->kind == PSS_CLIENT)
            return client_writable(r, pss->obj);
        return 0;
    case LWS_CALLBACK_CLOSED:
        if (!pss)
            return 0;
        flush_unlink(pss);
        if (pss->kind == PSS_AGENT)
            agent_closed(r, pss->obj);
        else if (pss->kind == PSS_CLIENT) {
            client_closed(pss->obj);
            r->nclients--;
        }
        pss->kind = PSS_NONE;
        pss->obj = NULL;
        return 0;
    default:
        return lws_callback_http_dummy(wsi, reason, user, in, len);
    }
}

static const struct lws_protocols protocols[] = {
    /* First entry: also serves plain HTTP and websockets that ask for no subprotocol. */
    {PROTO_SUBPROTOCOL, relay_callback, sizeof(struct relay_pss), RELAY_RX_BUFFER, 0, NULL, 0},
    {NULL, NULL, 0, 0, 0, NULL, 0},
};

const struct lws_protocols *relay_protocols(void)
{
    return protocols;
}

int relay_open(struct relay **out, uv_loop_t *loop, const struct relay_config *cfg, char *err,
               size_t errlen)
{
    int rc = RELAY_E_FAIL;
    struct relay *r = calloc(1, sizeof(*r));
    *out = NULL;
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return RELAY_E_FAIL;
    }
    r->loop = loop;
    r->cfg = *cfg;
    r->tokens = tokens_load(cfg->tokens_path, err, errlen);
    if (!r->tokens)
        goto fail;
    size_t n = tokens_workspace_count(r->tokens);
    if (n > RELAY_MAX_WORKSPACES) {
        snprintf(err, errlen, "%s names more than %u workspaces", cfg->tokens_path,
                 RELAY_MAX_WORKSPACES);
        goto fail;
    }
    if (cfg->manifest_path &&
        !(r->manifest = manifestfile_load(cfg->manifest_path, r->tokens, err, errlen))) {
        rc = RELAY_E_CONFIG;
        goto fail;
    }
    r->workspaces = calloc(n ? n : 1, sizeof(*r->workspaces));
    r->out = malloc(LWS_PRE + MUX_OUTPUT_MIN);
    if (!r->workspaces || !r->out) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    r->nworkspaces = n;
    for (size_t i = 0; i < n; i++) {
        struct relay_workspace *w = &r->workspaces[i];
        snprintf(w->name, sizeof(w->name), "%s", tokens_workspace_name(r->tokens, i));
        w->last_seen_ms = -1;
        wsstatus_init(&w->status, cfg->log_lines); /* allocates nothing yet */
    }
    *out = r;
    return 0;
fail:
    relay_free(r);
    return rc;
}

struct relay *relay_new(uv_loop_t *loop, const struct relay_config *cfg, char *err, size_t errlen)
{
    struct relay *r;
    return relay_open(&r, loop, cfg, err, errlen) == 0 ? r : NULL;
}

void relay_start(struct relay *r)
{
    uv_timer_init(r->loop, &r->tick);
    r->tick.data = r;
    uv_timer_start(&r->tick, on_tick, RELAY_TICK_MS, RELAY_TICK_MS);
    uv_idle_init(r->loop, &r->flush_idle);
    r->flush_idle.data = r;
    r->flush_running = true;
}

void relay_stop(struct relay *r)
{
    for (struct relay_agent *a = r->agents; a; a = a->next) {
        mux_goaway(a->mux, PROTO_CODE_SHUTDOWN, "relay shutting down");
        agent_close_soon(a);
    }
    uv_timer_stop(&r->tick);
    uv_close((uv_handle_t *)&r->tick, NULL);
    /* What waits for the flush goes out on WRITEABLE, as everything does from now on. */
    while (r->flush) {
        struct relay_pss *pss = r->flush;
        flush_unlink(pss);
        lws_callback_on_writable(pss->flush_wsi);
    }
    r->flush_running = false;
    uv_close((uv_handle_t *)&r->flush_idle, NULL);
}

void relay_free(struct relay *r)
{
    if (!r)
        return;
    tokens_free(r->tokens);
    manifestfile_free(r->manifest);
    for (size_t i = 0; i < r->nworkspaces; i++)
        wsstatus_free(&r->workspaces[i].status);
    free(r->workspaces);
    free(r->out);
    free(r);
}
