#include "portfwd.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stream.h"
#include "tcpreset.h"
#include "tunnel/log.h"

struct portfwd {
    struct agent_stream base;
    struct portfwd_shared *sh;
    struct mux *mux; /* NULL once the stream is gone */
    uint32_t id;
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;   /* a forward: the connection to the target */
        uv_pipe_t pipe; /* an attached descriptor (the agent's end of an SSH socketpair) */
    } h;
    bool is_pipe;
    uv_connect_t connect_req;
    uv_shutdown_t shutdown_req;
    bool connected;
    bool reading;
    bool eof_from_target;
    bool fin_from_peer;
    bool shutdown_started;
    bool closing;
    bool counted;          /* in sh->forwards */
    size_t writes_pending; /* bytes handed to uv_write and not yet completed */
    bool in_place;         /* on_alloc reserved space in the stream's queue, not read_buf */
    int reserve_error;     /* why on_alloc had no space for a read in place (MUX_E_*), or 0 */
};

struct portfwd_write {
    uv_write_t req;
    struct portfwd *p;
    size_t len;
    uint8_t data[];
};

static const struct stream_ops portfwd_ops;

static void on_closed_handle(uv_handle_t *h)
{
    struct portfwd *p = h->data;
    if (p->counted)
        p->sh->forwards--;
    free(p);
}

/*
 * Closes the socket and frees the object once libuv lets go of it. reset: the stream ended
 * abnormally, so the target sees a connection reset, not an end of file that would make a
 * cut transfer look complete.
 */
static void portfwd_close(struct portfwd *p, bool reset)
{
    if (p->closing)
        return;
    p->closing = true;
    if (p->mux) {
        mux_stream_reset(p->mux, p->id, PROTO_CODE_CANCEL, "target connection closed");
        p->mux = NULL;
    }
    if (!reset || p->is_pipe || uv_tcp_close_reset(&p->h.tcp, on_closed_handle) < 0)
        uv_close(&p->h.handle, on_closed_handle);
}

/* Once the peer is done and our writes are out: pass the half-close to the target. */
static void on_shutdown(uv_shutdown_t *req, int status)
{
    struct portfwd *p = req->data;
    (void)status;
    if (!p->mux && !p->closing) /* the stream already ended: nothing more can come */
        portfwd_close(p, false);
}

static void maybe_shutdown(struct portfwd *p)
{
    if (!p->fin_from_peer || p->writes_pending > 0 || p->shutdown_started || p->closing)
        return;
    p->shutdown_started = true;
    p->shutdown_req.data = p;
    if (uv_shutdown(&p->shutdown_req, &p->h.stream, on_shutdown) < 0)
        portfwd_close(p, true);
}

/*
 * A stream in full flow (its send queue has grown to a read's size) reads straight into
 * the queue, one copy less per byte; libuv reads right after this returns, and on_read
 * commits what it read before anything else touches the mux. Others read into the shared
 * buffer, and the queue takes a copy of exactly what came: reserving first would size an
 * idle stream's queue for reads it never gets (1,000 streams echoing 8 KiB: +3 MiB).
 */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct portfwd *p = h->data;
    (void)suggested;
    p->in_place = p->mux && mux_stream_queue_storage(p->mux, p->id) >= PORTFWD_READ_MAX;
    p->reserve_error = 0;
    if (p->in_place) {
        uint8_t *space = NULL;
        int n = mux_stream_reserve(p->mux, p->id, PORTFWD_READ_MAX, &space);
        p->reserve_error = n < 0 ? n : 0;
        /* No space yields UV_ENOBUFS in on_read, as below. */
        *buf = uv_buf_init((char *)space, n > 0 ? (unsigned)n : 0);
        return;
    }
    size_t room = p->mux ? mux_stream_room(p->mux, p->id) : 0;
    if (room > PORTFWD_READ_MAX)
        room = PORTFWD_READ_MAX;
    /* room 0 yields UV_ENOBUFS in on_read, which stops reading until credit returns. */
    *buf = uv_buf_init((char *)p->sh->read_buf, (unsigned)room);
}

static void start_reading(struct portfwd *p);

/* The mux did not take the target's bytes (rc, a MUX_E_*): the stream cannot go on
 * without losing them. */
static void close_unqueued(struct portfwd *p, int rc)
{
    if (rc == MUX_E_NOMEM)
        log_warn("stream %u: no memory to queue the target's bytes; closing it", p->id);
    else
        log_debug("stream %u: the tunnel took none of the target's bytes (mux error %d); "
                  "closing it",
                  p->id, rc);
    portfwd_close(p, true);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct portfwd *p = s->data;
    if (nread > 0) {
        /* on_alloc sized the buffer to the stream's room, so the mux takes it all. */
        int rc = p->in_place
                     ? mux_stream_commit(p->mux, p->id, (size_t)nread)
                     : mux_stream_send(p->mux, p->id, (const uint8_t *)buf->base, (size_t)nread);
        if (rc != (int)nread) {
            close_unqueued(p, rc);
            return;
        }
        if (!p->is_pipe)
            activity_note(p->sh->activity, ACTIVITY_FORWARD, 0, (size_t)nread, 1);
        if (mux_stream_room(p->mux, p->id) == 0) {
            uv_read_stop(s);
            p->reading = false;
        }
        return;
    }
    if (nread == 0)
        return;
    uv_read_stop(s);
    p->reading = false;
    if (nread == UV_ENOBUFS && p->reserve_error != MUX_E_NOMEM)
        return; /* no credit (stream_writable restarts reading), or the stream is ending */
    if (nread == UV_ENOBUFS) {
        close_unqueued(p, MUX_E_NOMEM);
        return;
    }
    if (nread == UV_EOF && (p->is_pipe || !tcp_was_reset(&p->h.tcp))) {
        p->eof_from_target = true;
        if (p->mux)
            mux_stream_shutdown(p->mux, p->id);
        return;
    }
    log_debug("stream %u: target read failed: %s", p->id, uv_strerror((int)nread));
    portfwd_close(p, true);
}

static void start_reading(struct portfwd *p)
{
    if (p->reading || p->eof_from_target || p->closing || !p->mux || !p->connected)
        return;
    if (mux_stream_room(p->mux, p->id) == 0)
        return;
    if (uv_read_start(&p->h.stream, on_alloc, on_read) == 0)
        p->reading = true;
}

static uint32_t code_for(int uverr)
{
    switch (uverr) {
    case UV_ECONNREFUSED:
        return PROTO_CODE_REFUSED;
    case UV_ETIMEDOUT:
        return PROTO_CODE_TIMEOUT;
    case UV_EHOSTUNREACH:
    case UV_ENETUNREACH:
    case UV_EADDRNOTAVAIL:
    case UV_EINVAL:
        return PROTO_CODE_UNREACHABLE;
    default:
        return PROTO_CODE_INTERNAL;
    }
}

static void on_connect(uv_connect_t *req, int status)
{
    struct portfwd *p = req->data;
    if (p->closing)
        return;
    if (!p->mux) { /* the tunnel went away while dialing */
        portfwd_close(p, true);
        return;
    }
    if (status < 0) {
        const char *text = status == UV_ECONNREFUSED ? "connection refused" : uv_strerror(status);
        mux_stream_reject(p->mux, p->id, code_for(status), text);
        p->mux = NULL;
        portfwd_close(p, true);
        return;
    }
    p->connected = true;
    p->counted = true;
    p->sh->forwards++;
    uv_tcp_nodelay(&p->h.tcp, 1);
    if (mux_stream_accept(p->mux, p->id, p) < 0) {
        p->mux = NULL;
        portfwd_close(p, true);
        return;
    }
    start_reading(p);
}

static void on_write(uv_write_t *req, int status)
{
    struct portfwd_write *w = (struct portfwd_write *)req;
    struct portfwd *p = w->p;
    p->writes_pending -= w->len;
    if (status == 0 && p->mux)
        mux_stream_consumed(p->mux, p->id, w->len);
    free(w);
    if (status < 0) {
        portfwd_close(p, true);
        return;
    }
    maybe_shutdown(p);
}

static void pf_data(void *s, const uint8_t *data, size_t len)
{
    struct portfwd *p = s;
    if (p->closing)
        return;
    if (!p->is_pipe)
        activity_note(p->sh->activity, ACTIVITY_FORWARD, len, 0, 1);
    size_t done = 0;
    /* Try the socket first: most writes complete at once and need no copy. */
    if (p->writes_pending == 0) {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
        int n = uv_try_write(&p->h.stream, &b, 1);
        if (n > 0)
            done = (size_t)n;
        else if (n < 0 && n != UV_EAGAIN) {
            portfwd_close(p, true);
            return;
        }
    }
    if (done > 0)
        mux_stream_consumed(p->mux, p->id, done);
    if (done == len)
        return;
    size_t rest = len - done;
    struct portfwd_write *w = malloc(sizeof(*w) + rest);
    if (!w) {
        portfwd_close(p, true);
        return;
    }
    memcpy(w->data, data + done, rest);
    w->p = p;
    w->len = rest;
    uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)rest);
    if (uv_write(&w->req, &p->h.stream, &b, 1, on_write) < 0) {
        free(w);
        portfwd_close(p, true);
        return;
    }
    p->writes_pending += rest;
}

static void pf_fin(void *s)
{
    struct portfwd *p = s;
    p->fin_from_peer = true;
    maybe_shutdown(p);
}

static void pf_writable(void *s)
{
    start_reading(s);
}

static void pf_closed(void *s, uint32_t code)
{
    struct portfwd *p = s;
    p->mux = NULL;
    if (code != 0 || !p->connected) {
        portfwd_close(p, true);
        return;
    }
    /* Both ends finished: close once our last writes reached the target. */
    p->fin_from_peer = true;
    if (p->writes_pending == 0 && p->shutdown_started)
        portfwd_close(p, false);
    else
        maybe_shutdown(p);
}

static const struct stream_ops portfwd_ops = {
    .data = pf_data,
    .fin = pf_fin,
    .writable = pf_writable,
    .closed = pf_closed,
};

/* Targets are numeric addresses (no DNS on the loop); "localhost" means 127.0.0.1. */
static int target_addr(const struct proto_open *o, struct sockaddr_storage *sa)
{
    const char *host = strcmp(o->host, "localhost") == 0 ? "127.0.0.1" : o->host;
    if (uv_ip4_addr(host, o->port, (struct sockaddr_in *)sa) == 0)
        return 0;
    if (uv_ip6_addr(host, o->port, (struct sockaddr_in6 *)sa) == 0)
        return 0;
    return -1;
}

void portfwd_open(struct portfwd_shared *sh, struct mux *m, uint32_t id, const struct proto_open *o)
{
    struct sockaddr_storage sa;
    if (target_addr(o, &sa) < 0) {
        mux_stream_reject(m, id, PROTO_CODE_UNREACHABLE, "target host must be a numeric address");
        return;
    }
    /* The address checked is the one dialed: names are never resolved here, so no later
     * answer can differ from what the policy saw. */
    if (!fwdpolicy_allows(sh->policy, (const struct sockaddr *)&sa)) {
        char why[FWDPOLICY_REFUSAL_MAX];
        fwdpolicy_refusal(why, sizeof(why), o->host, o->port);
        log_info("stream %u: tcp forward refused: %s", id, why);
        mux_stream_reject(m, id, PROTO_CODE_FORBIDDEN, why);
        return;
    }
    struct portfwd *p = calloc(1, sizeof(*p));
    if (!p) {
        mux_stream_reject(m, id, PROTO_CODE_INTERNAL, "out of memory");
        return;
    }
    p->base.ops = &portfwd_ops;
    p->sh = sh;
    p->mux = m;
    p->id = id;
    int rc = uv_tcp_init(sh->loop, &p->h.tcp);
    if (rc < 0) {
        free(p);
        mux_stream_reject(m, id, PROTO_CODE_INTERNAL, uv_strerror(rc));
        return;
    }
    p->h.tcp.data = p;
    p->connect_req.data = p;
    mux_stream_set_user(m, id, p);
    rc = uv_tcp_connect(&p->connect_req, &p->h.tcp, (struct sockaddr *)&sa, on_connect);
    if (rc < 0) {
        /* EMFILE and friends arrive here: refuse this stream clearly, keep the others. */
        const char *why = stream_out_of_fds(rc) ? STREAM_OUT_OF_FDS : uv_strerror(rc);
        log_warn("stream %u: tcp forward to %s:%u refused: %s", id, o->host, o->port, why);
        mux_stream_reject(m, id, code_for(rc), why);
        p->mux = NULL;
        portfwd_close(p, true);
    }
}

int portfwd_attach_fd(struct portfwd_shared *sh, struct mux *m, uint32_t id, int fd)
{
    struct portfwd *p = calloc(1, sizeof(*p));
    int rc = p ? uv_pipe_init(sh->loop, &p->h.pipe, 0) : UV_ENOMEM;
    if (rc < 0) {
        free(p);
        close(fd);
        return rc;
    }
    p->base.ops = &portfwd_ops;
    p->sh = sh;
    p->id = id;
    p->is_pipe = true;
    p->h.pipe.data = p;
    rc = uv_pipe_open(&p->h.pipe, fd);
    if (rc < 0)
        close(fd); /* the handle owns fd only once uv_pipe_open succeeded */
    else if (mux_stream_accept(m, id, p) < 0)
        rc = UV_ECANCELED;
    if (rc < 0) {
        p->closing = true;
        uv_close(&p->h.handle, on_closed_handle);
        return rc;
    }
    p->mux = m;
    p->connected = true;
    start_reading(p);
    return 0;
}
