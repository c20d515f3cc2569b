#include "wsc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>

#include "log.h"
#include "wsctx.h"
#include "wsframe.h"

/* Bearer tokens longer than this are refused before they reach a header. */
#define WSC_MAX_TOKEN 1024
/* The relay's handshake response must fit in this, or the connection is refused. */
#define WSC_MAX_RESPONSE 8192
/* Seconds from TCP connect to the relay's 101 before the connection is dropped. */
#define WSC_HANDSHAKE_TIMEOUT_S 10
/* `writable` events at most in one flush, before POLLOUT takes over. */
#define WSC_FLUSH_ROUNDS 16
/* Random bytes drawn at once for masking keys: one getrandom per 64 frames. */
#define WSC_MASK_POOL 256
static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

enum wsc_state {
    WSC_CONNECTING,   /* TCP/TLS not up yet */
    WSC_SEND_REQUEST, /* connected: the upgrade request goes out on the next WRITEABLE */
    WSC_AWAIT_RESPONSE,
    WSC_OPEN,
    WSC_CLOSING, /* our close frame is sent or due */
};

struct wsc {
    struct lws *wsi;
    const struct wsc_events *ev;
    void *ud;
    bool http_get;
    bool lws_framing; /* wss://: lws's own websocket client frames the connection */
    enum wsc_state state;
    bool in_connect;   /* inside lws_client_connect_via_info: errors are returned, not events */
    bool failed_early; /* an error arrived during lws_client_connect_via_info */
    bool close_sent;
    int close_code;
    char close_reason[124]; /* websocket close reasons are at most 123 bytes */
    int status;             /* peer's close code or HTTP status */
    uint64_t validity_ms;   /* wsctx_confirm_valid's last confirmation */
    char reason[256];
    char *request;   /* the upgrade request, until it is sent */
    char *auth;      /* "Bearer TOKEN" for an HTTP GET; wiped when freed */
    char accept[32]; /* the Sec-WebSocket-Accept we expect */
    char subprotocol[32];
    char *response; /* the handshake response so far */
    size_t response_len;
    struct wsframe_parser parser;
    uint8_t pong[LWS_PRE + WSFRAME_MAX_HEADER + WSFRAME_MAX_CONTROL];
    size_t pong_len; /* a ping's payload waiting to be answered, +1; 0 = none */
    uint8_t mask_pool[WSC_MASK_POOL];
    size_t mask_pos;
    /* wsc_write_keep's unsent tail, in the caller's buffer: it goes out before anything else. */
    const uint8_t *tail;
    size_t tail_len;
    /*
     * wsc_want_write's `writable` for an open ws:// connection with room comes from an idle
     * handle: after this iteration's callbacks and before the loop polls again (an idle
     * handle runs before the poll and keeps it from blocking; a check handle started from
     * a timer would wait for the next poll). Not after a trip through the poller for
     * POLLOUT: that is three epoll_ctl calls and an epoll_wait per message, on every
     * keystroke. Its close frees the wsc, so it is initialised first and closed last.
     */
    uv_idle_t flush;
    bool in_flush;    /* inside on_flush's `writable` */
    bool flush_again; /* ... which asked for another */
};

static void free_on_close(uv_handle_t *h)
{
    free(h->data);
}

/* Frees c once its idle handle is closed (at the loop's next turn). */
static void release(struct wsc *c)
{
    uv_close((uv_handle_t *)&c->flush, free_on_close);
}

static int random_bytes(void *p, size_t n)
{
    return getrandom(p, n, 0) == (ssize_t)n ? 0 : -1;
}

static void next_mask(struct wsc *c, uint8_t mask[4])
{
    if (c->mask_pos == 0 || c->mask_pos + 4 > WSC_MASK_POOL) {
        if (random_bytes(c->mask_pool, WSC_MASK_POOL) < 0) {
            /* getrandom does not fail on Linux once the pool is initialised; be safe. */
            uint64_t t = (uint64_t)uv_hrtime();
            memcpy(c->mask_pool, &t, sizeof(t));
        }
        c->mask_pos = 0;
    }
    memcpy(mask, c->mask_pool + c->mask_pos, 4);
    c->mask_pos += 4;
}

/* Builds the upgrade request and the accept value it must be answered with. */
static int build_request(struct wsc *c, const struct wsc_params *p, const char *path,
                         const char *host_header)
{
    uint8_t key_raw[16], digest[20];
    char key[32], both[96], line[WSC_MAX_TOKEN + 64] = "";
    if (random_bytes(key_raw, sizeof(key_raw)) < 0)
        return -1;
    lws_b64_encode_string((const char *)key_raw, sizeof(key_raw), key, sizeof(key));
    snprintf(both, sizeof(both), "%s%s", key, ws_guid);
    lws_SHA1((const unsigned char *)both, strlen(both), digest);
    lws_b64_encode_string((const char *)digest, sizeof(digest), c->accept, sizeof(c->accept));
    if (p->token)
        snprintf(line, sizeof(line), "Authorization: Bearer %s\r\n", p->token);
    char proto[64] = "";
    if (p->subprotocol) {
        snprintf(c->subprotocol, sizeof(c->subprotocol), "%s", p->subprotocol);
        snprintf(proto, sizeof(proto), "Sec-WebSocket-Protocol: %s\r\n", p->subprotocol);
    }
    size_t cap = strlen(path) + strlen(host_header) + strlen(line) + 512;
    c->request = malloc(LWS_PRE + cap);
    if (!c->request)
        return -1;
    snprintf(c->request + LWS_PRE, cap,
             "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s"
             "User-Agent: tether/" TETHER_VERSION "\r\n\r\n",
             path, host_header, key, proto, line);
    memset(line, 0, sizeof(line)); /* the token does not linger on the stack */
    return 0;
}

static void finish(struct wsc *c, struct lws *wsi);

/* Frees what a connection holds besides itself; secrets are wiped first. */
static void free_buffers(struct wsc *c)
{
    if (c->request) {
        memset(c->request, 0, LWS_PRE + strlen(c->request + LWS_PRE));
        free(c->request);
        c->request = NULL;
    }
    if (c->auth) {
        memset(c->auth, 0, strlen(c->auth));
        free(c->auth);
        c->auth = NULL;
    }
    free(c->response);
    c->response = NULL;
}

struct wsc *wsc_connect(const struct wsc_params *p, const struct wsc_events *ev, void *ud,
                        char *err, size_t errlen)
{
    char path[WSC_MAX_PATH], host_header[300];
    if (p->token && strlen(p->token) > WSC_MAX_TOKEN) {
        snprintf(err, errlen, "token is longer than %d bytes", WSC_MAX_TOKEN);
        return NULL;
    }
    if (url_path(p->url, p->path, path, sizeof(path)) < 0) {
        snprintf(err, errlen, "URL path too long");
        return NULL;
    }
    /* An IPv6 literal needs brackets in the Host header. */
    snprintf(host_header, sizeof(host_header), strchr(p->url->host, ':') ? "[%s]" : "%s",
             p->url->host);
    struct wsc *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    uv_idle_init(p->loop, &c->flush);
    c->flush.data = c;
    c->ev = ev;
    c->ud = ud;
    c->http_get = p->http_get;
    /*
     * lws 4.1's raw client cannot do TLS (it starts the handshake before the TCP connect
     * completes: lws issue 2916, fixed only after 4.3). Over wss:// lws's own websocket
     * client frames the connection instead; it is slower (PITFALLS.md) but correct.
     */
    c->lws_framing = p->url->tls && !p->http_get;
    bool lws_headers = p->http_get || c->lws_framing;
    c->state = WSC_CONNECTING;
    wsframe_parser_init(&c->parser, 0);
    if (lws_headers && p->token && asprintf(&c->auth, "Bearer %s", p->token) < 0)
        c->auth = NULL;
    if ((lws_headers && p->token && !c->auth) ||
        (!lws_headers && build_request(c, p, path, host_header) < 0)) {
        snprintf(err, errlen, "out of memory");
        free_buffers(c);
        release(c);
        return NULL;
    }

    struct lws_client_connect_info ci;
    memset(&ci, 0, sizeof(ci));
    ci.context = p->context;
    ci.vhost = p->vhost;
    ci.address = p->url->host;
    ci.port = p->url->port;
    ci.path = path;
    ci.host = p->url->host; /* TLS checks the name in .host */
    ci.origin = host_header;
    /* ws://: a raw connection that lws connects and we frame. */
    ci.method = p->http_get ? "GET" : c->lws_framing ? NULL : "RAW";
    ci.protocol = c->lws_framing ? p->subprotocol : NULL;
    ci.local_protocol_name = "tether-client";
    ci.userdata = c;
    ci.pwsi = &c->wsi;
    if (p->url->tls) {
        ci.ssl_connection = LCCSCF_USE_SSL;
        if (p->insecure)
            ci.ssl_connection |= LCCSCF_ALLOW_SELFSIGNED | LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK |
                                 LCCSCF_ALLOW_EXPIRED | LCCSCF_ALLOW_INSECURE;
    }
    c->in_connect = true;
    struct lws *wsi = lws_client_connect_via_info(&ci);
    c->in_connect = false;
    if (!wsi || c->failed_early) {
        snprintf(err, errlen, "%s", c->reason[0] ? c->reason : "cannot start connecting");
        free_buffers(c);
        release(c);
        return NULL;
    }
    return c;
}

/* Frames buf's payload in place (header in front, payload masked); returns the frame's start
 * and sets *n to its length. */
static uint8_t *frame_in_place(struct wsc *c, uint8_t *buf, size_t len, bool binary, size_t *n)
{
    uint8_t mask[4];
    next_mask(c, mask);
    uint8_t hdr[WSFRAME_MAX_HEADER];
    size_t hl = wsframe_header(hdr, binary ? WSFRAME_BINARY : WSFRAME_TEXT, true, len, mask);
    uint8_t *start = buf + WSC_PRE - hl;
    memcpy(start, hdr, hl);
    wsframe_mask(buf + WSC_PRE, len, mask, 0);
    *n = hl + len;
    return start;
}

int wsc_write(struct wsc *c, uint8_t *buf, size_t len, bool binary)
{
    if (c->state != WSC_OPEN)
        return -1;
    if (c->lws_framing) {
        int n = lws_write(c->wsi, buf + WSC_PRE, len, binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT);
        return (n < 0 || (size_t)n < len) ? -1 : 0;
    }
    size_t n;
    uint8_t *start = frame_in_place(c, buf, len, binary, &n);
    /* lws keeps (copies) whatever the socket does not take now and sends it first. */
    int k = lws_write(c->wsi, start, n, LWS_WRITE_RAW);
    return (k < 0 || (size_t)k < n) ? -1 : 0;
}

/*
 * Sends what the socket takes of p now, straight to it; the rest becomes the tail. lws must
 * hold nothing unsent itself (it sends its own leftovers before the next WRITEABLE, and the
 * tail waits for that). A socket error goes through lws_write, which reports it its way.
 */
static int send_keep(struct wsc *c, const uint8_t *p, size_t n)
{
    ssize_t k = 0;
    if (!lws_partial_buffered(c->wsi)) {
        k = send(lws_get_socket_fd(c->wsi), p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return lws_write(c->wsi, (uint8_t *)p, n, LWS_WRITE_RAW) < 0 ? -1 : 0;
        if (k < 0)
            k = 0;
    }
    c->tail = p + k;
    c->tail_len = n - (size_t)k;
    if (c->tail_len)
        lws_callback_on_writable(c->wsi);
    return 0;
}

int wsc_write_keep(struct wsc *c, uint8_t *buf, size_t len, bool binary)
{
    if (c->state != WSC_OPEN)
        return -1;
    if (c->lws_framing)
        return wsc_write(c, buf, len, binary);
    size_t n;
    uint8_t *start = frame_in_place(c, buf, len, binary, &n);
    return send_keep(c, start, n);
}

bool wsc_keeps_buffer(const struct wsc *c)
{
    return c->tail_len > 0;
}

bool wsc_write_now(const struct wsc *c)
{
    return c->wsi && c->state == WSC_OPEN && !c->lws_framing && !c->tail_len && !c->pong_len &&
           !lws_partial_buffered(c->wsi);
}

/*
 * `writable` for as long as the owner asks for it again (one message per event) and the
 * socket has room, up to WSC_FLUSH_ROUNDS times; then lws's POLLOUT takes over.
 */
static void on_flush(uv_idle_t *h)
{
    struct wsc *c = h->data;
    uv_idle_stop(h);
    for (int round = 0; c->wsi; round++) {
        if (round == WSC_FLUSH_ROUNDS || !wsc_write_now(c) || lws_send_pipe_choked(c->wsi)) {
            lws_callback_on_writable(c->wsi);
            return;
        }
        c->in_flush = true;
        c->flush_again = false;
        c->ev->writable(c->ud, c); /* may end the connection: c->wsi is NULL then */
        c->in_flush = false;
        if (!c->flush_again)
            return;
    }
}

void wsc_want_write(struct wsc *c)
{
    if (!c->wsi)
        return;
    if (c->in_flush)
        c->flush_again = true;
    else if (wsc_write_now(c))
        uv_idle_start(&c->flush, on_flush);
    else
        lws_callback_on_writable(c->wsi);
}

void wsc_pause_rx(struct wsc *c, bool pause)
{
    if (c->wsi && c->state == WSC_OPEN)
        lws_rx_flow_control(c->wsi, pause ? 0 : 1);
}

void wsc_close(struct wsc *c, int code, const char *reason)
{
    if (c->state == WSC_CLOSING)
        return;
    c->close_code = code;
    snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason ? reason : "");
    snprintf(c->reason, sizeof(c->reason), "%s", c->close_reason[0] ? c->close_reason : "closed");
    c->status = code;
    if (c->state == WSC_OPEN) {
        c->state = WSC_CLOSING;
        lws_callback_on_writable(c->wsi); /* the close frame goes out from WRITEABLE */
    } else {
        c->state = WSC_CLOSING;
        wsctx_kill(c->wsi);
    }
}

void wsc_abort(struct wsc *c, const char *reason)
{
    snprintf(c->reason, sizeof(c->reason), "%s", reason);
    c->status = 0;
    struct lws *wsi = c->wsi;
    /* lws would wait for the dead peer's FIN before reporting the close: don't wait. */
    wsctx_kill(wsi);
    finish(c, wsi);
}

void wsc_confirm_alive(struct wsc *c, uint64_t now_ms)
{
    if (c->wsi)
        wsctx_confirm_valid(c->wsi, now_ms, &c->validity_ms);
}

/* Reports the end exactly once, detaches from the wsi, and frees. */
static void finish(struct wsc *c, struct lws *wsi)
{
    if (!c->reason[0])
        snprintf(c->reason, sizeof(c->reason), "connection closed");
    lws_set_wsi_user(wsi, NULL);
    c->wsi = NULL;
    c->tail_len = 0;
    free_buffers(c);
    if (c->in_connect) {
        c->failed_early = true; /* wsc_connect reports it and frees */
        return;
    }
    uv_idle_stop(&c->flush);
    c->ev->closed(c->ud, c, c->status, c->reason);
    release(c);
}

/* Sends a masked control frame (close or pong) with a payload of at most 125 bytes. */
static int send_control(struct wsc *c, uint8_t opcode, const uint8_t *payload, size_t len)
{
    uint8_t frame[LWS_PRE + WSFRAME_MAX_HEADER + WSFRAME_MAX_CONTROL], mask[4];
    next_mask(c, mask);
    size_t hl = wsframe_header(frame + LWS_PRE, opcode, true, len, mask);
    memcpy(frame + LWS_PRE + hl, payload, len);
    wsframe_mask(frame + LWS_PRE + hl, len, mask, 0);
    return lws_write(c->wsi, frame + LWS_PRE, hl + len, LWS_WRITE_RAW) < 0 ? -1 : 0;
}

static int send_close(struct wsc *c)
{
    uint8_t payload[2 + 123];
    size_t n = strlen(c->close_reason);
    payload[0] = (uint8_t)(c->close_code >> 8);
    payload[1] = (uint8_t)c->close_code;
    memcpy(payload + 2, c->close_reason, n);
    c->close_sent = true;
    int rc = send_control(c, WSFRAME_CLOSE, payload, n + 2);
    /* Wait briefly for the relay's close frame, then drop the connection either way. */
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_CLOSE_ACK, WSCTX_CLOSE_WAIT_S);
    return rc;
}

static int on_frame_data(void *ud, const uint8_t *p, size_t len, bool binary, bool final)
{
    struct wsc *c = ud;
    if (c->state == WSC_OPEN)
        c->ev->receive(c->ud, c, p, len, binary, final);
    return 0;
}

static int on_frame_control(void *ud, uint8_t opcode, const uint8_t *p, size_t len)
{
    struct wsc *c = ud;
    if (opcode == WSFRAME_PING && c->state == WSC_OPEN) {
        memcpy(c->pong, p, len); /* only the latest ping needs an answer */
        c->pong_len = len + 1;
        lws_callback_on_writable(c->wsi);
    } else if (opcode == WSFRAME_CLOSE) {
        if (!c->close_sent) {
            c->status = len >= 2 ? (p[0] << 8) | p[1] : 1005;
            size_t n = len > 2 ? len - 2 : 0;
            snprintf(c->reason, sizeof(c->reason), "%.*s", (int)n, (const char *)p + 2);
            if (!c->reason[0])
                snprintf(c->reason, sizeof(c->reason), "closed by the relay (code %d)", c->status);
            /* Echo the close, as RFC 6455 asks, then hang up. */
            c->close_code = c->status == 1005 ? 1000 : c->status;
            c->close_reason[0] = '\0';
            c->state = WSC_CLOSING;
            send_close(c);
        }
        return 1; /* nothing after a close frame counts */
    }
    return 0;
}

static const struct wsframe_events frame_events = {
    .data = on_frame_data,
    .control = on_frame_control,
};

static void frames_rx(struct wsc *c, const uint8_t *in, size_t len)
{
    int rc = wsframe_parse(&c->parser, in, len, &frame_events, c);
    if (rc < 0 && rc != WSFRAME_E_CALLBACK && c->state == WSC_OPEN) {
        log_warn("relay broke websocket framing: %s", wsframe_strerror(rc));
        wsc_close(c, 1002, "protocol error");
    }
}

/* Finds a header's value in a handshake response (names are case-insensitive). */
static bool header_value(const char *resp, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    for (const char *l = strstr(resp, "\r\n"); l && l[2] != '\r'; l = strstr(l + 2, "\r\n")) {
        const char *h = l + 2;
        if (strncasecmp(h, name, nl) == 0 && h[nl] == ':') {
            const char *v = h + nl + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            size_t vl = strcspn(v, "\r\n");
            while (vl > 0 && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
                vl--;
            snprintf(out, outlen, "%.*s", (int)vl, v);
            return true;
        }
    }
    return false;
}

/* Checks the relay's answer to the upgrade. Returns 0, or -1 with status/reason set. */
static int check_response(struct wsc *c)
{
    char v[128];
    int status = 0;
    if (sscanf(c->response, "HTTP/1.%*d %d", &status) != 1) {
        snprintf(c->reason, sizeof(c->reason), "the relay did not answer in HTTP");
        return -1;
    }
    if (status != 101) {
        c->status = status;
        snprintf(c->reason, sizeof(c->reason), "relay answered HTTP %d", status);
        return -1;
    }
    const char *bad = NULL;
    if (!header_value(c->response, "upgrade", v, sizeof(v)) || strcasecmp(v, "websocket") != 0)
        bad = "no Upgrade: websocket";
    else if (!header_value(c->response, "connection", v, sizeof(v)) || !strcasestr(v, "upgrade"))
        bad = "no Connection: upgrade";
    else if (!header_value(c->response, "sec-websocket-accept", v, sizeof(v)) ||
             strcmp(v, c->accept) != 0)
        bad = "wrong Sec-WebSocket-Accept";
    else if (c->subprotocol[0] &&
             (!header_value(c->response, "sec-websocket-protocol", v, sizeof(v)) ||
              strcmp(v, c->subprotocol) != 0))
        bad = "the relay did not agree to the subprotocol";
    if (bad) {
        snprintf(c->reason, sizeof(c->reason), "bad websocket handshake: %s", bad);
        return -1;
    }
    return 0;
}

/* Handshake bytes arrive; any bytes after the response are the first frames. */
static int handshake_rx(struct wsc *c, const uint8_t *in, size_t len)
{
    if (!c->response && !(c->response = malloc(WSC_MAX_RESPONSE + 1)))
        return -1;
    size_t take = len;
    if (c->response_len + take > WSC_MAX_RESPONSE)
        take = WSC_MAX_RESPONSE - c->response_len;
    memcpy(c->response + c->response_len, in, take);
    size_t old = c->response_len;
    c->response_len += take;
    c->response[c->response_len] = '\0';
    char *end = strstr(c->response, "\r\n\r\n");
    if (!end) {
        if (c->response_len == WSC_MAX_RESPONSE) {
            snprintf(c->reason, sizeof(c->reason), "the relay's handshake response is too long");
            return -1;
        }
        return 0;
    }
    size_t header_len = (size_t)(end - c->response) + 4;
    end[2] = '\0'; /* keep the last header's CRLF for header_value */
    if (check_response(c) < 0)
        return -1;
    free(c->response);
    c->response = NULL;
    c->state = WSC_OPEN;
    lws_set_timeout(c->wsi, NO_PENDING_TIMEOUT, 0);
    c->ev->established(c->ud, c);
    size_t used = header_len - old; /* bytes of this chunk that were handshake */
    if (c->state == WSC_OPEN && used < len)
        frames_rx(c, in + used, len - used);
    return 0;
}

static int raw_rx(struct wsc *c, const uint8_t *in, size_t len)
{
    if (c->state == WSC_AWAIT_RESPONSE)
        return handshake_rx(c, in, len);
    if (c->state == WSC_OPEN)
        frames_rx(c, in, len);
    return 0; /* after our close frame, only the relay's close matters: lws's timer ends it */
}

static int raw_writable(struct wsc *c, struct lws *wsi)
{
    /* A frame's unsent tail goes before anything else: the caller's buffer is still intact
     * (it may change only after `writable`), and a close frame must not cut a frame short. */
    if (c->tail_len && (c->state == WSC_OPEN || c->state == WSC_CLOSING)) {
        if (send_keep(c, c->tail, c->tail_len) < 0)
            return -1;
        if (c->tail_len)
            return 0;
    }
    switch (c->state) {
    case WSC_SEND_REQUEST: {
        size_t n = strlen(c->request + LWS_PRE);
        int rc = lws_write(wsi, (uint8_t *)c->request + LWS_PRE, n, LWS_WRITE_RAW);
        free_buffers(c); /* the request holds the token */
        if (rc < (int)n)
            return -1;
        c->state = WSC_AWAIT_RESPONSE;
        return 0;
    }
    case WSC_OPEN:
        if (c->pong_len) {
            size_t n = c->pong_len - 1;
            c->pong_len = 0;
            send_control(c, WSFRAME_PONG, c->pong, n);
            lws_callback_on_writable(wsi);
            return 0;
        }
        c->ev->writable(c->ud, c);
        return 0;
    case WSC_CLOSING:
        if (!c->close_sent)
            send_close(c);
        return 0;
    default:
        return 0;
    }
}

/* Turns lws's connect errors into a line a user can act on. */
static void note_connect_error(struct wsc *c, struct lws *wsi, const char *in)
{
    int status = c->lws_framing ? (int)lws_http_client_http_response(wsi) : 0;
    if (c->reason[0])
        return;
    if (status > 0) {
        c->status = status;
        snprintf(c->reason, sizeof(c->reason), "relay answered HTTP %d", status);
    } else if (in && (strstr(in, "SSL") || strstr(in, "ssl") || strstr(in, "tls"))) {
        snprintf(c->reason, sizeof(c->reason),
                 "TLS handshake with the relay failed: its certificate is not trusted or does "
                 "not match the URL's host (use --ca-file for a private CA)");
    } else {
        snprintf(c->reason, sizeof(c->reason), "%s", in && *in ? in : "connection failed");
    }
}

int wsc_lws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                     size_t len)
{
    struct wsc *c = user;
    if (!c)
        return 0;
    switch (reason) {
    /* ---- websockets, framed by us over a raw connection ---- */
    case LWS_CALLBACK_RAW_CONNECTED:
        if (c->state == WSC_CLOSING)
            return -1; /* closed while the connect was pending */
        c->state = WSC_SEND_REQUEST;
        /* A relay (or proxy) that takes the connection but never answers the upgrade. */
        lws_set_timeout(wsi, PENDING_TIMEOUT_AWAITING_SERVER_RESPONSE, WSC_HANDSHAKE_TIMEOUT_S);
        lws_callback_on_writable(wsi);
        return 0;
    case LWS_CALLBACK_RAW_RX:
        if (raw_rx(c, in, len) < 0) {
            if (!c->reason[0])
                snprintf(c->reason, sizeof(c->reason), "out of memory");
            return -1;
        }
        return 0;
    case LWS_CALLBACK_RAW_WRITEABLE:
        return raw_writable(c, wsi);
    case LWS_CALLBACK_RAW_CLOSE:
        finish(c, wsi);
        return 0;

    /* ---- wss://, framed by lws's websocket client ---- */
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        if (c->state == WSC_CLOSING)
            return -1; /* closed while the handshake was under way */
        c->state = WSC_OPEN;
        c->ev->established(c->ud, c);
        return 0;
    case LWS_CALLBACK_CLIENT_RECEIVE:
        if (c->state == WSC_OPEN)
            c->ev->receive(c->ud, c, in, len, lws_frame_is_binary(wsi),
                           lws_is_final_fragment(wsi) != 0);
        return 0;
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        if (c->state == WSC_CLOSING) {
            if (!c->close_sent) {
                c->close_sent = true;
                wsctx_close_ws(wsi, c->close_code, c->close_reason);
            }
            return 0;
        }
        if (c->state == WSC_OPEN)
            c->ev->writable(c->ud, c);
        return 0;
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE: {
        const uint8_t *p = in;
        c->status = len >= 2 ? (p[0] << 8) | p[1] : 1005;
        snprintf(c->reason, sizeof(c->reason), "%.*s", (int)(len > 2 ? len - 2 : 0),
                 (const char *)p + 2);
        if (!c->reason[0])
            snprintf(c->reason, sizeof(c->reason), "closed by the relay (code %d)", c->status);
        return 0;
    }
    case LWS_CALLBACK_CLIENT_CLOSED:
        finish(c, wsi);
        return 0;

    /* ---- plain HTTP GET, through lws's client ---- */
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
        if (!c->auth)
            return 0;
        unsigned char **p = in, *end = *p + len;
        return lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_AUTHORIZATION,
                                            (const unsigned char *)c->auth, (int)strlen(c->auth), p,
                                            end)
                   ? -1
                   : 0;
    }
    case LWS_CALLBACK_ESTABLISHED_CLIENT_HTTP:
        if (!c->http_get)
            return 0; /* the 101 of a wss:// upgrade */
        c->state = WSC_OPEN;
        c->status = (int)lws_http_client_http_response(wsi);
        c->ev->established(c->ud, c);
        return 0;
    case LWS_CALLBACK_RECEIVE_CLIENT_HTTP: {
        char buf[LWS_PRE + 16384];
        char *px = buf + LWS_PRE;
        int lenx = sizeof(buf) - LWS_PRE;
        return lws_http_client_read(wsi, &px, &lenx) < 0 ? -1 : 0;
    }
    case LWS_CALLBACK_RECEIVE_CLIENT_HTTP_READ:
        c->ev->receive(c->ud, c, in, len, false, false);
        return 0;
    case LWS_CALLBACK_COMPLETED_CLIENT_HTTP:
        snprintf(c->reason, sizeof(c->reason), "HTTP %d", c->status);
        return -1; /* done: closing reports `closed` with the status */

    /* ---- both ---- */
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        note_connect_error(c, wsi, in);
        finish(c, wsi);
        return 0;
    case LWS_CALLBACK_CLOSED_CLIENT_HTTP:
    case LWS_CALLBACK_WSI_DESTROY:
        finish(c, wsi);
        return 0;
    default:
        return 0;
    }
}
