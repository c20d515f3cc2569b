#include "wsbridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tcpreset.h"
#include "proto/proto.h"
#include "tunnel/chunkq.h"
#include "tunnel/log.h"

struct wsbridge {
    uv_stream_t *in;
    uv_stream_t *out;
    int handles_open; /* local handles not closed yet: 1 if in == out, else 2 */
    const struct wsbridge_events *ev;
    void *ud;
    struct wsc *ws;
    bool ws_open;
    bool established;
    bool reading;
    bool in_eof;       /* the local side has nothing more to send */
    bool fin_sent;     /* ... and we told the relay */
    bool fin_received; /* the relay has nothing more */
    bool out_shut;     /* the writable stream's shutdown was asked for */
    bool rx_paused;
    bool rx_in_message; /* a message from the relay has started and not ended */
    bool local_first;
    int local_error;
    struct chunkq to_ws; /* read straight from the local stream, sent from where it lies */
    size_t to_out;       /* bytes in uv_write requests */
    int status;
    char reason[256];
    uint8_t fin_msg[WSC_PRE]; /* the empty end-of-stream message is built here */
};

struct bridge_write {
    uv_write_t req;
    struct wsbridge *b;
    size_t len;
    uint8_t data[];
};

static struct wsbridge_end end_of(const struct wsbridge *b)
{
    struct wsbridge_end e = {
        .status = b->status,
        .reason = b->reason[0] ? b->reason : "connection closed",
        .established = b->established,
        .local_first = b->local_first,
        .local_error = b->local_error,
    };
    return e;
}

static void report_ended(const struct wsbridge *b)
{
    struct wsbridge_end e = end_of(b);
    if (b->ev->ended)
        b->ev->ended(b->ud, &e);
}

static void finish(struct wsbridge *b)
{
    struct wsbridge_end e = end_of(b);
    b->ev->done(b->ud, &e);
    free(b);
}

/*
 * The bridge is freed once its local handles and its websocket are all gone; whichever
 * ends last finishes it (here or in ws_closed).
 */
static void on_handle_closed(uv_handle_t *h)
{
    struct wsbridge *b = h->data;
    if (--b->handles_open > 0)
        return;
    chunkq_free(&b->to_ws);
    if (b->ws) {
        b->local_first = true;
        wsc_close(b->ws, LWS_CLOSE_STATUS_NORMAL, "local connection closed");
    } else {
        finish(b);
    }
}

static void close_handle(uv_stream_t *s, bool reset)
{
    if (uv_is_closing((uv_handle_t *)s))
        return;
    if (reset && s->type == UV_TCP && uv_tcp_close_reset((uv_tcp_t *)s, on_handle_closed) == 0)
        return;
    uv_close((uv_handle_t *)s, on_handle_closed);
}

/*
 * Closes the local side. reset: the stream ended abnormally, so a TCP peer gets a
 * connection reset rather than an end of file that would make a cut transfer look whole.
 */
static void local_close(struct wsbridge *b, bool reset)
{
    close_handle(b->in, reset);
    if (b->out != b->in)
        close_handle(b->out, reset);
}

static void local_fail(struct wsbridge *b, int err)
{
    if (!b->local_error)
        b->local_error = err;
    local_close(b, true);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct wsbridge *b = h->data;
    size_t room = 0;
    uint8_t *tail = chunkq_tail(&b->to_ws, WSBRIDGE_READ_MIN, &room);
    (void)suggested;
    /* No memory yields UV_ENOBUFS in on_read, which closes the connection. */
    *buf = uv_buf_init((char *)tail, tail ? (unsigned)room : 0);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct wsbridge *b = s->data;
    (void)buf;
    if (n > 0) {
        chunkq_commit(&b->to_ws, (size_t)n);
        if (b->to_ws.len >= WSBRIDGE_TO_WS_MAX) {
            uv_read_stop(s);
            b->reading = false;
        }
        if (b->ws_open)
            wsc_want_write(b->ws);
        return;
    }
    if (n == 0)
        return;
    uv_read_stop(s);
    b->reading = false;
    if (n == UV_EOF && s->type == UV_TCP && tcp_was_reset((uv_tcp_t *)s))
        n = UV_ECONNRESET;
    if (n == UV_EOF) {
        b->in_eof = true;
        if (b->ws_open)
            wsc_want_write(b->ws);
        return;
    }
    local_fail(b, (int)n);
}

static void start_reading(struct wsbridge *b)
{
    if (b->reading || b->in_eof || uv_is_closing((uv_handle_t *)b->in) ||
        b->to_ws.len >= WSBRIDGE_TO_WS_MAX)
        return;
    int rc = uv_read_start(b->in, on_alloc, on_read);
    if (rc == 0)
        b->reading = true;
    else
        local_fail(b, rc);
}

static void ws_established(void *ud, struct wsc *ws)
{
    struct wsbridge *b = ud;
    b->ws_open = true;
    b->established = true;
    start_reading(b);
    wsc_want_write(ws);
}

/* A writable stream of its own (stdout) is closed after its shutdown: the reader's EOF. */
static void on_shutdown(uv_shutdown_t *req, int status)
{
    struct wsbridge *b = req->data;
    /* A pipe cannot shut down (ENOTSOCK): closing it is its end of file. */
    log_debug("local output shut down: %s", status < 0 ? uv_strerror(status) : "ok");
    free(req);
    if (b->out != b->in)
        close_handle(b->out, false);
}

static void maybe_shutdown_out(struct wsbridge *b)
{
    if (!b->fin_received || b->to_out > 0 || b->out_shut || uv_is_closing((uv_handle_t *)b->out))
        return;
    b->out_shut = true;
    uv_shutdown_t *req = malloc(sizeof(*req));
    int rc = UV_ENOMEM;
    if (req) {
        req->data = b;
        rc = uv_shutdown(req, b->out, on_shutdown);
    }
    if (rc == 0)
        return;
    free(req);
    if (b->out != b->in)
        close_handle(b->out, false); /* its close is the end of file all the same */
    else
        local_fail(b, rc);
}

static void on_write(uv_write_t *req, int status)
{
    struct bridge_write *w = (struct bridge_write *)req;
    struct wsbridge *b = w->b;
    b->to_out -= w->len;
    free(w);
    if (status == UV_ECANCELED) /* the handle is closing */
        return;
    if (status < 0) {
        local_fail(b, status);
        return;
    }
    if (b->rx_paused && b->to_out < WSBRIDGE_TO_LOCAL_MAX / 2 && b->ws) {
        b->rx_paused = false;
        wsc_pause_rx(b->ws, false);
    }
    maybe_shutdown_out(b);
    if (!b->ws && b->to_out == 0)
        local_close(b, false); /* the relay ended normally and our last bytes are out */
}

static void write_out(struct wsbridge *b, struct wsc *ws, const uint8_t *data, size_t len)
{
    size_t done = 0;
    if (b->to_out == 0) {
        uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
        int n = uv_try_write(b->out, &buf, 1);
        if (n > 0)
            done = (size_t)n;
        else if (n < 0 && n != UV_EAGAIN) {
            local_fail(b, n);
            return;
        }
    }
    if (done == len)
        return;
    struct bridge_write *w = malloc(sizeof(*w) + len - done);
    if (!w) {
        local_fail(b, UV_ENOMEM);
        return;
    }
    w->b = b;
    w->len = len - done;
    memcpy(w->data, data + done, w->len);
    uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)w->len);
    int rc = uv_write(&w->req, b->out, &buf, 1, on_write);
    if (rc < 0) {
        free(w);
        local_fail(b, rc);
        return;
    }
    b->to_out += w->len;
    if (b->to_out >= WSBRIDGE_TO_LOCAL_MAX && !b->rx_paused) {
        b->rx_paused = true;
        wsc_pause_rx(ws, true);
    }
}

static void ws_receive(void *ud, struct wsc *ws, const uint8_t *data, size_t len, bool binary,
                       bool final)
{
    struct wsbridge *b = ud;
    bool empty_message = len == 0 && final && !b->rx_in_message;
    b->rx_in_message = !final;
    if (uv_is_closing((uv_handle_t *)b->out))
        return;
    if (!binary) {
        wsc_close(ws, LWS_CLOSE_STATUS_UNACCEPTABLE_OPCODE, "text message");
        return;
    }
    if (empty_message) { /* the relay's end of stream */
        log_debug("the relay's side ended (%zu bytes still to write)", b->to_out);
        b->fin_received = true;
        maybe_shutdown_out(b);
        return;
    }
    if (len > 0 && !b->fin_received)
        write_out(b, ws, data, len);
}

static void ws_writable(void *ud, struct wsc *ws)
{
    struct wsbridge *b = ud;
    size_t n;
    uint8_t *front = chunkq_front(&b->to_ws, &n);
    if (front) {
        /* Framed and masked where the bytes lie: the block keeps WSC_PRE bytes in front. */
        if (wsc_write(ws, front - WSC_PRE, n, true) < 0)
            return;
        chunkq_consume(&b->to_ws, n);
        start_reading(b);
        if (b->to_ws.len > 0 || b->in_eof)
            wsc_want_write(ws);
        return;
    }
    if (b->in_eof && !b->fin_sent) {
        b->fin_sent = true;
        wsc_write(ws, b->fin_msg, 0, true);
    }
}

static void ws_closed(void *ud, struct wsc *ws, int status, const char *reason)
{
    struct wsbridge *b = ud;
    (void)ws;
    b->ws = NULL;
    b->ws_open = false;
    if (!b->local_first) {
        b->status = status;
        snprintf(b->reason, sizeof(b->reason), "%s", reason);
    }
    if (b->handles_open == 0) { /* the local side went first; nothing left to tell anyone */
        finish(b);
        return;
    }
    report_ended(b);
    bool normal = status == LWS_CLOSE_STATUS_NORMAL || status == LWS_CLOSE_STATUS_NO_STATUS;
    /* A normal end keeps the writable stream until our last bytes reached it. */
    if (normal && b->to_out > 0) {
        b->fin_received = true;
        return;
    }
    local_close(b, !normal);
}

static const struct wsc_events bridge_ws_events = {
    .established = ws_established,
    .receive = ws_receive,
    .writable = ws_writable,
    .closed = ws_closed,
};

int wsbridge_start(const struct wsbridge_params *p, const struct wsbridge_events *ev, void *ud)
{
    struct wsbridge *b = calloc(1, sizeof(*b));
    if (!b)
        return UV_ENOMEM;
    b->in = p->in;
    b->out = p->out;
    b->handles_open = p->in == p->out ? 1 : 2;
    b->ev = ev;
    b->ud = ud;
    p->in->data = b;
    p->out->data = b;
    chunkq_init(&b->to_ws, WSC_PRE);
    char err[sizeof(b->reason)];
    b->ws = wsc_connect(p->ws, &bridge_ws_events, b, err, sizeof(err));
    if (!b->ws) { /* reported through `done`, like every other failure */
        snprintf(b->reason, sizeof(b->reason), "%s", err);
        report_ended(b);
        local_close(b, true);
    }
    return 0;
}

bool wsbridge_end_ok(const struct wsbridge_end *e)
{
    return !e->local_error && (e->status == LWS_CLOSE_STATUS_NORMAL ||
                               (e->established && e->status == LWS_CLOSE_STATUS_NO_STATUS));
}

void wsbridge_end_text(const struct wsbridge_end *e, const char *workspace, const char *what,
                       char *buf, size_t len)
{
    if (e->local_first && e->local_error)
        snprintf(buf, len, "%s: the local connection failed: %s", what,
                 uv_strerror(e->local_error));
    else if (e->status == 503)
        snprintf(buf, len, "workspace %s is offline", workspace);
    else if (e->status == 401)
        snprintf(buf, len, "the relay refused the token (HTTP 401)");
    else if (e->status == 404)
        snprintf(buf, len, "workspace %s not found, or the token may not reach it (HTTP 404)",
                 workspace);
    else if (e->status >= 4000 && e->status < 5000)
        snprintf(buf, len, "%s: %s", what, e->reason);
    else if (e->status == 0 && !e->established)
        snprintf(buf, len, "cannot reach the relay: %s", e->reason);
    else
        snprintf(buf, len, "%s: %s (status %d)", what, e->reason, e->status);
}
