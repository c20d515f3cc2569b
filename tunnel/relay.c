#include "relay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "bytebuf.h"
#include "chunkq.h"
#include "log.h"
#include "mux.h"
#include "tokens.h"

/* How often the relay ticks every agent's keepalive. */
#define RELAY_TICK_MS 500u
#define RELAY_MAX_WORKSPACES 100000u
/* lws hands websocket payload to the relay in pieces of at most this many bytes. */
#define RELAY_RX_BUFFER (64u * 1024)
/* After GOAWAY, how long open streams may go on before the tunnel closes anyway. */
#define RELAY_DRAIN_MS 10000u
/* How long a closing tunnel may take to flush before its socket is dropped. */
#define RELAY_CLOSE_WAIT_MS 5000u
/* Close codes for client websockets: 4000 + an OPEN_FAIL/RST code (PROTOCOL.md). */
#define RELAY_CLOSE_CODE_BASE 4000

struct relay_agent;

struct relay_workspace {
    char name[TOKENS_MAX_NAME + 1];
    struct relay_agent *agent; /* the connected agent, or NULL */
    char agent_version[64];
    char hostname[256];
    char os[32];
    char arch[32];
    int64_t last_seen_ms; /* unix ms of the last frame from an agent, or -1 */
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
    int close_code;
    char close_reason[124];
    struct chunkq to_client;    /* from the agent, waiting for the client's socket */
    struct bytebuf from_client; /* beyond the stream's credit: reading is paused meanwhile */
    struct relay_client *next;  /* in agent->clients */
};

struct relay_agent {
    struct relay *relay;
    struct lws *wsi;
    struct mux *mux;
    struct relay_workspace *ws;
    bool current;            /* ws->agent == this */
    bool close_after_flush;  /* close once the output is out */
    uint64_t drain_deadline; /* GOAWAY either way: streams may finish until then (0 = no) */
    uint64_t close_deadline; /* close_after_flush was set: kill the socket after this */
    struct relay_client *clients;
    struct relay_agent *next; /* in relay->agents */
};

enum pss_kind { PSS_NONE, PSS_AGENT, PSS_CLIENT };
struct relay_pss {
    enum pss_kind kind;
    void *obj;
};

struct relay {
    uv_loop_t *loop;
    struct relay_config cfg;
    struct tokens *tokens;
    struct relay_workspace *workspaces;
    size_t nworkspaces;
    struct relay_agent *agents;
    uv_timer_t tick;
    uint8_t *out; /* LWS_PRE + MUX_OUTPUT_MIN: shared, since lws keeps what it cannot send */
};

void relay_config_default(struct relay_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->keepalive_idle_ms = MUX_KEEPALIVE_IDLE_MS;
    cfg->keepalive_timeout_ms = MUX_KEEPALIVE_TIMEOUT_MS;
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

static json_t *workspace_json(const struct relay_workspace *w)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(w->name));
    json_object_set_new(o, "connected", json_boolean(w->agent != NULL));
    json_object_set_new(o, "agent_version",
                        w->agent_version[0] ? json_string(w->agent_version) : json_null());
    json_object_set_new(o, "last_seen",
                        w->last_seen_ms >= 0 ? json_integer(w->last_seen_ms) : json_null());
    json_object_set_new(o, "hostname", w->hostname[0] ? json_string(w->hostname) : json_null());
    json_object_set_new(o, "os", w->os[0] ? json_string(w->os) : json_null());
    json_object_set_new(o, "arch", w->arch[0] ? json_string(w->arch) : json_null());
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
    if (strncasecmp(hdr, "Bearer ", 7) != 0)
        return;
    snprintf(buf, len, "%s", hdr + 7);
}

/* Writes a whole response now; lws keeps what the socket does not take at once. */
static int http_reply(struct lws *wsi, unsigned status, const char *body)
{
    size_t blen = strlen(body);
    uint8_t head[LWS_PRE + 512];
    uint8_t *start = head + LWS_PRE, *p = start, *end = head + sizeof(head) - 1;
    if (lws_add_http_common_headers(wsi, status, "application/json", blen, &p, end) ||
        lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    if (blen) {
        uint8_t *buf = malloc(LWS_PRE + blen);
        if (!buf)
            return -1;
        memcpy(buf + LWS_PRE, body, blen);
        int n = lws_write(wsi, buf + LWS_PRE, blen, LWS_WRITE_HTTP_FINAL);
        free(buf);
        if (n < 0)
            return -1;
    }
    return 0;
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
    } reasons[] = {{401, "Unauthorized"}, {404, "Not Found"}, {503, "Service Unavailable"}};
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

/* ROUTE_TCP and ROUTE_SSH are client byte pipes: one websocket = one tunnel stream. */
enum route_kind { ROUTE_NONE, ROUTE_LIST, ROUTE_ONE, ROUTE_AGENT, ROUTE_TCP, ROUTE_SSH };
struct route {
    enum route_kind kind;
    char name[TOKENS_MAX_NAME + 1];
    int port;
};

static void parse_route(const char *uri, struct route *rt)
{
    memset(rt, 0, sizeof(*rt));
    static const char ws_prefix[] = "/api/v1/workspaces";
    if (strcmp(uri, "/api/v1/agent") == 0) {
        rt->kind = ROUTE_AGENT;
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
    if (!tokens_name_valid(rt->name))
        return;
    const char *rest = name + nl;
    if (*rest == '\0') {
        rt->kind = ROUTE_ONE;
        return;
    }
    if (strcmp(rest, "/ssh") == 0) {
        rt->kind = ROUTE_SSH;
        return;
    }
    if (strncmp(rest, "/tcp/", 5) == 0) {
        char *end;
        long port = strtol(rest + 5, &end, 10);
        if (end != rest + 5 && *end == '\0' && port >= 1 && port <= 65535) {
            rt->kind = ROUTE_TCP;
            rt->port = (int)port;
        }
    }
}

static void get_uri(struct lws *wsi, char *buf, size_t len)
{
    buf[0] = '\0';
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) < (int)len)
        lws_hdr_copy(wsi, buf, (int)len, WSI_TOKEN_GET_URI);
}

static int serve_http(struct relay *r, struct lws *wsi, const char *uri)
{
    char token[1100];
    struct route rt;
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0)
        return http_error(wsi, 405, "method not allowed");
    parse_route(uri, &rt);
    if (rt.kind != ROUTE_LIST && rt.kind != ROUTE_ONE)
        return http_error(wsi, 404, "not found");
    bearer_token(wsi, token, sizeof(token));
    if (!tokens_user_valid(r->tokens, token))
        return http_error(wsi, 401, "unauthorized");
    json_t *body;
    if (rt.kind == ROUTE_LIST) {
        body = json_array();
        for (size_t i = 0; i < r->nworkspaces; i++)
            if (tokens_user_allows(r->tokens, token, r->workspaces[i].name))
                json_array_append_new(body, workspace_json(&r->workspaces[i]));
    } else {
        struct relay_workspace *w = workspace_find(r, rt.name);
        if (!w || !tokens_user_allows(r->tokens, token, rt.name))
            return http_error(wsi, 404, "no such workspace");
        body = workspace_json(w);
    }
    char *s = json_dumps(body, JSON_COMPACT);
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
 * Decides an upgrade before the websocket exists, so refusals are plain HTTP statuses:
 * 401 for a missing or unknown token, 404 for a workspace the token may not see (whether it
 * exists or not), 503 for one whose agent is not connected.
 */
static int confirm_upgrade(struct relay *r, struct lws *wsi)
{
    char uri[512], token[1100];
    struct route rt;
    get_uri(wsi, uri, sizeof(uri));
    parse_route(uri, &rt);
    bearer_token(wsi, token, sizeof(token));
    if (rt.kind == ROUTE_AGENT) {
        if (!tokens_agent_workspace(r->tokens, token))
            return refuse_upgrade(wsi, 401, "unauthorized");
        return 0;
    }
    if (rt.kind != ROUTE_TCP && rt.kind != ROUTE_SSH)
        return refuse_upgrade(wsi, 404, "not found");
    if (!tokens_user_valid(r->tokens, token))
        return refuse_upgrade(wsi, 401, "unauthorized");
    struct relay_workspace *w = workspace_find(r, rt.name);
    if (!w || !tokens_user_allows(r->tokens, token, rt.name))
        return refuse_upgrade(wsi, 404, "no such workspace");
    if (!w->agent) {
        char msg[128];
        snprintf(msg, sizeof(msg), "workspace %s is offline", w->name);
        return refuse_upgrade(wsi, 503, msg);
    }
    return 0;
}

/* ---- client bridges ---- */

static void client_close(struct relay_client *c, int code, const char *reason)
{
    if (c->closing)
        return;
    c->closing = true;
    c->close_code = code;
    snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
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

static int client_established(struct relay *r, struct lws *wsi, struct relay_pss *pss)
{
    char uri[512];
    struct route rt;
    get_uri(wsi, uri, sizeof(uri));
    parse_route(uri, &rt);
    struct relay_workspace *w = workspace_find(r, rt.name);
    if ((rt.kind != ROUTE_TCP && rt.kind != ROUTE_SSH) || !w || !w->agent)
        return -1; /* confirm_upgrade checked; the agent may have left since */
    struct relay_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -1;
    c->wsi = wsi;
    chunkq_init(&c->to_client, LWS_PRE);
    pss->kind = PSS_CLIENT;
    pss->obj = c;
    struct proto_open o = {.kind = PROTO_KIND_SSH};
    if (rt.kind == ROUTE_TCP) {
        o.kind = PROTO_KIND_TCP;
        o.port = (uint16_t)rt.port;
        snprintf(o.host, sizeof(o.host), "127.0.0.1");
    }
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
        log_debug("client stream %u to %s ssh", c->stream, w->name);
    return 0;
}

static void client_receive(struct relay_client *c, const uint8_t *in, size_t len, bool binary,
                           bool first, bool final)
{
    if (c->closing)
        return;
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
    struct relay_client *c = sud;
    (void)ud;
    (void)id;
    if (c->closing)
        return;
    if (chunkq_append(&c->to_client, data, len) < 0) {
        client_close(c, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION, "out of memory");
        return;
    }
    lws_callback_on_writable(c->wsi);
}

static void a_stream_fin(void *ud, uint32_t id, void *sud)
{
    struct relay_client *c = sud;
    (void)ud;
    (void)id;
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
    if (strcmp(type, "hello") != 0 || !a->current)
        return;
    struct relay_workspace *w = a->ws;
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
    json_t *manifest = json_pack("{s:s, s:s}", "type", "manifest", "workspace", w->name);
    mux_send_control(a->mux, manifest);
    json_decref(manifest);
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
    lws_callback_on_writable(a->wsi);
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
    if (a->close_after_flush)
        return;
    if (a->current)
        a->ws->last_seen_ms = unix_ms();
    lws_validity_confirmed(a->wsi);
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

static void on_tick(uv_timer_t *t)
{
    struct relay *r = t->data;
    uint64_t now = uv_now(r->loop);
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
    case LWS_CALLBACK_HTTP:
        if (serve_http(r, wsi, in) < 0)
            return -1;
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        if (strcmp(in, "websocket") != 0)
            return -1;
        return confirm_upgrade(r, wsi);
    case LWS_CALLBACK_ESTABLISHED: {
        char uri[512];
        struct route rt;
        get_uri(wsi, uri, sizeof(uri));
        parse_route(uri, &rt);
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
    case LWS_CALLBACK_SERVER_WRITEABLE:
        if (pss->kind == PSS_AGENT)
            return agent_writable(r, pss->obj);
        if (pss->kind == PSS_CLIENT)
            return client_writable(r, pss->obj);
        return 0;
    case LWS_CALLBACK_CLOSED:
        if (pss->kind == PSS_AGENT)
            agent_closed(r, pss->obj);
        else if (pss->kind == PSS_CLIENT)
            client_closed(pss->obj);
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

struct relay *relay_new(uv_loop_t *loop, const struct relay_config *cfg, char *err, size_t errlen)
{
    struct relay *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->loop = loop;
    r->cfg = *cfg;
    r->tokens = tokens_load(cfg->tokens_path, err, errlen);
    if (!r->tokens)
        goto fail;
    r->nworkspaces = tokens_workspace_count(r->tokens);
    if (r->nworkspaces > RELAY_MAX_WORKSPACES) {
        snprintf(err, errlen, "%s names more than %u workspaces", cfg->tokens_path,
                 RELAY_MAX_WORKSPACES);
        goto fail;
    }
    r->workspaces = calloc(r->nworkspaces ? r->nworkspaces : 1, sizeof(*r->workspaces));
    r->out = malloc(LWS_PRE + MUX_OUTPUT_MIN);
    if (!r->workspaces || !r->out) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < r->nworkspaces; i++) {
        snprintf(r->workspaces[i].name, sizeof(r->workspaces[i].name), "%s",
                 tokens_workspace_name(r->tokens, i));
        r->workspaces[i].last_seen_ms = -1;
    }
    return r;
fail:
    tokens_free(r->tokens);
    free(r->workspaces);
    free(r->out);
    free(r);
    return NULL;
}

void relay_start(struct relay *r)
{
    uv_timer_init(r->loop, &r->tick);
    r->tick.data = r;
    uv_timer_start(&r->tick, on_tick, RELAY_TICK_MS, RELAY_TICK_MS);
}

void relay_stop(struct relay *r)
{
    for (struct relay_agent *a = r->agents; a; a = a->next) {
        mux_goaway(a->mux, PROTO_CODE_SHUTDOWN, "relay shutting down");
        agent_close_soon(a);
    }
    uv_timer_stop(&r->tick);
    uv_close((uv_handle_t *)&r->tick, NULL);
}

void relay_free(struct relay *r)
{
    if (!r)
        return;
    tokens_free(r->tokens);
    free(r->workspaces);
    free(r->out);
    free(r);
}
