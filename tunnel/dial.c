#include "dial.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "log.h"
#include "wsc.h"

/* After the relay's GOAWAY, how long open streams may go on, and how often to check. */
#define DIAL_DRAIN_MS 10000u
#define DIAL_DRAIN_POLL_MS 250u
/* dial_stop: how long the last output (GOAWAY, the last logs) may take to go out before the
 * connection is dropped anyway, so a relay that stopped reading cannot hold a shutdown. */
#define DIAL_STOP_FLUSH_MS 5000u

enum dial_state { DIAL_IDLE, DIAL_CONNECTING, DIAL_CONNECTED, DIAL_WAITING, DIAL_STOPPING };

struct dial {
    uv_loop_t *loop;
    struct dial_config cfg;
    const struct mux_callbacks *streams;
    const struct dial_events *ev;
    void *ud;
    struct mux_callbacks mux_cb; /* trampolines: the mux's ud is the dial */

    enum dial_state state;
    struct wsc *conn;
    struct mux *mux;
    bool up;                /* peer HELLO received: `connected` was reported */
    bool close_after_flush; /* a GOAWAY is queued: close once the output is empty */
    uint64_t connected_at_ms;
    uint64_t drain_deadline; /* after the relay's GOAWAY */
    unsigned attempt;        /* failed attempts since the last stable connection */
    uv_timer_t retry_timer;
    uv_timer_t keepalive_timer;
    int open_handles;
    void (*done)(void *);
    void *done_arg;
    uint8_t *out; /* WSC_PRE + MUX_OUTPUT_MIN bytes, allocated once */
};

void dial_config_default(struct dial_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    mux_config_default(&cfg->mux, MUX_ROLE_AGENT);
    cfg->backoff_min_ms = DIAL_BACKOFF_MIN_MS;
    cfg->backoff_max_ms = DIAL_BACKOFF_MAX_MS;
    cfg->stable_ms = DIAL_STABLE_MS;
}

static void connect_now(struct dial *d);

/* ---- mux trampolines ---- */

static void t_opened(void *ud, uint32_t id, const struct proto_open *o)
{
    struct dial *d = ud;
    d->streams->stream_opened(d->ud, id, o);
}

static void t_open_result(void *ud, uint32_t id, void *sud, uint32_t code, const char *t, size_t n)
{
    struct dial *d = ud;
    if (d->streams->stream_open_result)
        d->streams->stream_open_result(d->ud, id, sud, code, t, n);
}

static void t_data(void *ud, uint32_t id, void *sud, const uint8_t *data, size_t len)
{
    struct dial *d = ud;
    d->streams->stream_data(d->ud, id, sud, data, len);
}

static void t_fin(void *ud, uint32_t id, void *sud)
{
    struct dial *d = ud;
    d->streams->stream_fin(d->ud, id, sud);
}

static void t_writable(void *ud, uint32_t id, void *sud)
{
    struct dial *d = ud;
    d->streams->stream_writable(d->ud, id, sud);
}

static void t_closed(void *ud, uint32_t id, void *sud, uint32_t code, const char *t, size_t n)
{
    struct dial *d = ud;
    d->streams->stream_closed(d->ud, id, sud, code, t, n);
}

static void t_control(void *ud, json_t *msg)
{
    struct dial *d = ud;
    if (d->streams->control)
        d->streams->control(d->ud, msg);
}

static void t_hello(void *ud, const struct proto_hello *peer)
{
    struct dial *d = ud;
    (void)peer;
    d->up = true;
    d->connected_at_ms = uv_now(d->loop);
    log_info("connected to the relay at %s:%d", d->cfg.url.host, d->cfg.url.port);
    if (d->ev->connected)
        d->ev->connected(d->ud, d->mux);
}

static void close_after_flush(struct dial *d)
{
    d->close_after_flush = true;
    if (d->conn)
        wsc_want_write(d->conn);
}

/* While draining after the relay's GOAWAY: close once no stream is left, or at the deadline. */
static void on_drain(uv_timer_t *t)
{
    struct dial *d = t->data;
    if (!d->mux || d->close_after_flush)
        return;
    if (mux_stream_count(d->mux) == 0 || uv_now(d->loop) >= d->drain_deadline)
        close_after_flush(d);
    else
        uv_timer_start(&d->retry_timer, on_drain, DIAL_DRAIN_POLL_MS, 0);
}

static void t_goaway(void *ud, uint32_t code, const char *text, size_t n)
{
    struct dial *d = ud;
    log_warn("relay sent GOAWAY: %s%s%.*s", proto_code_name(code), n ? ": " : "", (int)n, text);
    /* Streams already open may finish (PROTOCOL.md 8); the retry timer is idle while up. */
    d->drain_deadline = uv_now(d->loop) + DIAL_DRAIN_MS;
    uv_timer_start(&d->retry_timer, on_drain, 0, 0);
}

/*
 * wsc_want_write writes once the loop iteration's callbacks are done, not after a trip
 * through the poller for POLLOUT: a keystroke's echo reaches the relay one poll sooner, and
 * what every stream produced in the iteration goes out in one write.
 */
static void t_want_write(void *ud)
{
    struct dial *d = ud;
    if (d->conn)
        wsc_want_write(d->conn);
}

/* ---- timers ---- */

static uint32_t backoff_delay(struct dial *d)
{
    /* Exponential with full jitter above the minimum: min + rand[0, cap - min]. */
    uint64_t cap = d->cfg.backoff_min_ms;
    for (unsigned i = 0; i < d->attempt && cap < d->cfg.backoff_max_ms; i++)
        cap *= 2;
    if (cap > d->cfg.backoff_max_ms)
        cap = d->cfg.backoff_max_ms;
    uint32_t r = 0;
    if (getrandom(&r, sizeof(r), GRND_NONBLOCK) != sizeof(r))
        r = (uint32_t)uv_hrtime();
    uint64_t span = cap - d->cfg.backoff_min_ms;
    return (uint32_t)(d->cfg.backoff_min_ms + (span ? r % (span + 1) : 0));
}

static void on_retry(uv_timer_t *t)
{
    struct dial *d = t->data;
    if (d->state == DIAL_WAITING)
        connect_now(d);
}

static void schedule_retry(struct dial *d, const char *why)
{
    uint32_t delay = backoff_delay(d);
    d->attempt++;
    d->state = DIAL_WAITING;
    log_warn("relay connection: %s; retrying in %u ms", why, delay);
    uv_timer_start(&d->retry_timer, on_retry, delay, 0);
}

static void on_keepalive(uv_timer_t *t);

/* One timer, due when the mux next needs the clock: no periodic wake-ups beyond that. */
static void arm_keepalive(struct dial *d)
{
    if (d->mux)
        uv_timer_start(&d->keepalive_timer, on_keepalive, mux_next_tick_ms(d->mux, uv_now(d->loop)),
                       0);
}

static void on_keepalive(uv_timer_t *t)
{
    struct dial *d = t->data;
    if (!d->mux || !d->conn)
        return;
    if (mux_tick(d->mux, uv_now(d->loop)) == MUX_E_TIMEOUT) {
        log_warn("no traffic from the relay for %u ms: dropping the connection",
                 d->cfg.mux.keepalive_timeout_ms);
        /* A silent peer will not answer a close handshake either: drop it now. */
        wsc_abort(d->conn, "keepalive timeout");
        return;
    }
    arm_keepalive(d);
}

/* ---- the websocket ---- */

static void ws_established(void *ud, struct wsc *c)
{
    struct dial *d = ud;
    if (d->state == DIAL_STOPPING) { /* stopped while connecting: don't come up now */
        wsc_close(c, LWS_CLOSE_STATUS_GOINGAWAY, "agent shutting down");
        return;
    }
    d->mux = mux_new(&d->cfg.mux, &d->mux_cb, d, uv_now(d->loop));
    if (!d->mux) {
        wsc_close(d->conn, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION, "out of memory");
        return;
    }
    d->state = DIAL_CONNECTED;
    d->up = false;
    d->close_after_flush = false;
    arm_keepalive(d);
    wsc_want_write(d->conn);
}

static void ws_receive(void *ud, struct wsc *c, const uint8_t *data, size_t len, bool binary,
                       bool final)
{
    struct dial *d = ud;
    if (!d->mux || d->close_after_flush)
        return;
    int rc = binary ? mux_feed(d->mux, data, len, uv_now(d->loop)) : MUX_E_PROTOCOL;
    if (rc == 0 && final)
        rc = mux_message_end(d->mux);
    if (rc < 0) {
        if (!binary)
            mux_goaway(d->mux, PROTO_CODE_PROTOCOL, "text message on the tunnel");
        log_warn("relay broke the protocol: closing the connection");
        d->close_after_flush = true;
        wsc_want_write(c);
        return;
    }
    wsc_confirm_alive(c, uv_now(d->loop));
}

static void ws_writable(void *ud, struct wsc *c)
{
    struct dial *d = ud;
    if (!d->mux)
        return;
    size_t n = mux_output(d->mux, d->out + WSC_PRE, MUX_OUTPUT_MIN);
    if (n > 0) {
        if (wsc_write_keep(c, d->out, n, true) < 0)
            return; /* `closed` follows */
    }
    if (mux_wants_output(d->mux))
        wsc_want_write(c);
    else if (d->close_after_flush)
        wsc_close(c, LWS_CLOSE_STATUS_NORMAL, "goaway");
}

static void release_if_done(struct dial *d);
static void close_retry_timer(struct dial *d);

void dial_trim(struct dial *d)
{
    if (d->conn && wsc_keeps_buffer(d->conn))
        return;
    /* Only whole pages inside the buffer: the allocator's headers lie just outside it. */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = ((uintptr_t)d->out + page - 1) & ~(page - 1);
    uintptr_t end = ((uintptr_t)d->out + WSC_PRE + MUX_OUTPUT_MIN) & ~(page - 1);
    if (end > start)
        madvise((void *)start, end - start, MADV_DONTNEED); /* reads as zeros after */
}

static void ws_closed(void *ud, struct wsc *c, int status, const char *reason)
{
    struct dial *d = ud;
    (void)c;
    d->conn = NULL;
    uv_timer_stop(&d->keepalive_timer);
    bool was_up = d->up;
    if (d->mux) {
        mux_fail_all(d->mux, PROTO_CODE_CANCEL, "tunnel closed");
        mux_free(d->mux);
        d->mux = NULL;
    }
    d->up = false;
    char why[300];
    if (status == 401)
        snprintf(why, sizeof(why), "the relay refused the token (HTTP 401)");
    else if (status > 0 && status < 1000)
        snprintf(why, sizeof(why), "the relay answered HTTP %d", status);
    else
        snprintf(why, sizeof(why), "%s", reason);
    if (d->state == DIAL_STOPPING) {
        log_info("disconnected from the relay");
        close_retry_timer(d); /* it bounded the flush, which is over */
        release_if_done(d);
        return;
    }
    if (was_up && d->ev->disconnected)
        d->ev->disconnected(d->ud, why);
    if (was_up && uv_now(d->loop) - d->connected_at_ms >= d->cfg.stable_ms)
        d->attempt = 0;
    schedule_retry(d, why);
}

static const struct wsc_events ws_events = {
    .established = ws_established,
    .receive = ws_receive,
    .writable = ws_writable,
    .closed = ws_closed,
};

static void connect_now(struct dial *d)
{
    struct wsc_params p = {
        .context = d->cfg.ws->ctx,
        .vhost = d->cfg.ws->client_vhost,
        .loop = d->loop,
        .url = &d->cfg.url,
        .path = "/api/v1/agent",
        .subprotocol = PROTO_SUBPROTOCOL,
        .token = d->cfg.token,
        .insecure = d->cfg.insecure,
    };
    char err[256];
    d->state = DIAL_CONNECTING;
    d->conn = wsc_connect(&p, &ws_events, d, err, sizeof(err));
    if (!d->conn)
        schedule_retry(d, err);
}

struct dial *dial_new(uv_loop_t *loop, const struct dial_config *cfg,
                      const struct mux_callbacks *streams, const struct dial_events *ev, void *ud)
{
    struct dial *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->out = malloc(WSC_PRE + MUX_OUTPUT_MIN);
    if (!d->out) {
        free(d);
        return NULL;
    }
    d->loop = loop;
    d->cfg = *cfg;
    d->streams = streams;
    d->ev = ev;
    d->ud = ud;
    d->mux_cb = (struct mux_callbacks){
        .stream_opened = t_opened,
        .stream_open_result = t_open_result,
        .stream_data = t_data,
        .stream_fin = t_fin,
        .stream_writable = t_writable,
        .stream_closed = t_closed,
        .control = t_control,
        .hello = t_hello,
        .goaway = t_goaway,
        .want_write = t_want_write,
    };
    uv_timer_init(loop, &d->retry_timer);
    uv_timer_init(loop, &d->keepalive_timer);
    d->retry_timer.data = d;
    d->keepalive_timer.data = d;
    d->open_handles = 2;
    return d;
}

void dial_start(struct dial *d)
{
    connect_now(d);
}

int dial_send_control(struct dial *d, const json_t *msg)
{
    if (!d->mux)
        return MUX_E_CLOSED;
    return mux_send_control(d->mux, msg);
}

struct mux *dial_mux(struct dial *d)
{
    return d->up ? d->mux : NULL;
}

static void on_handle_closed(uv_handle_t *h)
{
    struct dial *d = h->data;
    d->open_handles--;
    release_if_done(d);
}

static void release_if_done(struct dial *d)
{
    if (d->conn || d->open_handles > 0 || d->state != DIAL_STOPPING)
        return;
    void (*done)(void *) = d->done;
    void *arg = d->done_arg;
    free(d->out);
    free(d);
    if (done)
        done(arg);
}

/* The output did not go out in DIAL_STOP_FLUSH_MS: drop the connection without waiting. */
static void close_retry_timer(struct dial *d)
{
    if (!uv_is_closing((uv_handle_t *)&d->retry_timer))
        uv_close((uv_handle_t *)&d->retry_timer, on_handle_closed);
}

static void on_stop_flush_timeout(uv_timer_t *t)
{
    struct dial *d = t->data;
    if (d->conn) {
        log_warn("the relay did not take the last output in %u ms: closing anyway",
                 DIAL_STOP_FLUSH_MS);
        wsc_abort(d->conn, "shutdown flush timed out"); /* ws_closed follows */
    }
    close_retry_timer(d);
}

void dial_stop(struct dial *d, void (*done)(void *arg), void *arg)
{
    d->state = DIAL_STOPPING;
    d->done = done;
    d->done_arg = arg;
    uv_timer_stop(&d->retry_timer);
    if (d->conn) {
        if (d->mux && !mux_is_closing(d->mux)) {
            mux_goaway(d->mux, PROTO_CODE_SHUTDOWN, "agent shutting down");
            d->close_after_flush = true;
            wsc_want_write(d->conn);
        } else {
            wsc_close(d->conn, LWS_CLOSE_STATUS_GOINGAWAY, "agent shutting down");
        }
        /* The retry timer, idle from now on, bounds the flush (closed with the connection). */
        uv_timer_start(&d->retry_timer, on_stop_flush_timeout, DIAL_STOP_FLUSH_MS, 0);
    } else {
        close_retry_timer(d);
    }
    uv_close((uv_handle_t *)&d->keepalive_timer, on_handle_closed);
}
