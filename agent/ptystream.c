#include "ptystream.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "stream.h"
#include "tunnel/bytebuf.h"
#include "tunnel/log.h"

/* Output is compressed fast: keystroke echoes must not wait for a better ratio. The small
 * window keeps a stream's deflate state near 32 KiB instead of 256 KiB. */
#define PTYSTREAM_ZLEVEL 1
#define PTYSTREAM_ZWBITS 12
#define PTYSTREAM_ZMEMLEVEL 5

struct ptystream {
    struct agent_stream base;
    struct mux *mux; /* NULL once the stream is gone */
    uint32_t id;
    struct rpty_attachment *att; /* NULL once detached or the process ended */
    size_t backlog_max;
    bool zlib;
    z_stream inf, def;
    bool inf_ok, def_ok;
    struct bytebuf in;  /* received, not yet turned into records; credit follows its drain */
    struct bytebuf rec; /* plain record bytes being parsed */
    size_t taken;       /* of the DATA record at rec's front, the bytes the PTY took */
    struct bytebuf out; /* encoded output waiting for credit */
    struct activity *activity;
    bool exited; /* EXIT is queued: FIN follows the last byte */
    bool fin_sent;
    struct ptystream_wait *wait; /* the start waits for the gate; NULL once started */
};

/* What a start that waits for the gate needs later: copies, since the caller's go away. */
struct ptystream_wait {
    struct gate_waiter waiter;
    struct ptystream *p;
    struct rpty_registry *reg;
    struct proto_open open;
    struct ptystream_env env; /* shell, envp and cwd point into the copies below */
    char *shell, *cwd;
    char **envp;
};

static const struct stream_ops ptystream_ops;

static void wait_free(struct ptystream_wait *w)
{
    if (!w)
        return;
    gate_cancel(&w->waiter);
    proc_env_free(w->envp);
    free(w->shell);
    free(w->cwd);
    free(w);
}

static void ps_free(struct ptystream *p)
{
    wait_free(p->wait);
    if (p->inf_ok)
        inflateEnd(&p->inf);
    if (p->def_ok)
        deflateEnd(&p->def);
    bytebuf_free(&p->in);
    bytebuf_free(&p->rec);
    bytebuf_free(&p->out);
    free(p);
}

/* Ends the stream with RST (the PTY lives on unless it already ended). */
static void ps_reset(struct ptystream *p, uint32_t code, const char *why)
{
    if (p->att) {
        rpty_detach(p->att);
        p->att = NULL;
    }
    if (p->mux) {
        mux_stream_reset(p->mux, p->id, code, why);
        p->mux = NULL;
    }
    ps_free(p);
}

/* ---- output: records, deflated, under credit ---- */

/* Appends bytes to the output, through deflate with zlib; flush ends a batch with a sync
 * flush so the peer can decode everything so far. */
static int out_deflate(struct ptystream *p, const uint8_t *data, size_t len, int flush)
{
    if (!p->zlib)
        return bytebuf_append(&p->out, data, len);
    uint8_t buf[16384];
    p->def.next_in = (Bytef *)data;
    p->def.avail_in = (uInt)len;
    do {
        p->def.next_out = buf;
        p->def.avail_out = sizeof(buf);
        if (deflate(&p->def, flush) == Z_STREAM_ERROR ||
            bytebuf_append(&p->out, buf, sizeof(buf) - p->def.avail_out) < 0)
            return -1;
    } while (p->def.avail_out == 0);
    return 0;
}

static int out_append(struct ptystream *p, const uint8_t *data, size_t len)
{
    return out_deflate(p, data, len, Z_NO_FLUSH);
}

static int out_flush(struct ptystream *p)
{
    return out_deflate(p, NULL, 0, Z_SYNC_FLUSH);
}

static int out_record(struct ptystream *p, uint8_t type, const uint8_t *body, size_t len)
{
    uint8_t hdr[PROTO_PTYREC_HEADER];
    proto_ptyrec_header(type, (uint16_t)len, hdr);
    return out_append(p, hdr, sizeof(hdr)) < 0 || out_append(p, body, len) < 0 ? -1 : 0;
}

/* Sends what credit allows; FIN once the process ended and everything is out. */
static void out_send(struct ptystream *p)
{
    if (!p->mux)
        return;
    while (p->out.len > 0) {
        size_t room = mux_stream_room(p->mux, p->id);
        size_t n = p->out.len < room ? p->out.len : room;
        if (n == 0)
            break;
        int sent = mux_stream_send(p->mux, p->id, bytebuf_peek(&p->out), n);
        if (sent <= 0)
            break;
        bytebuf_consume(&p->out, (size_t)sent);
    }
    if (p->exited && p->out.len == 0 && !p->fin_sent) {
        p->fin_sent = true;
        mux_stream_shutdown(p->mux, p->id);
    }
}

static void on_output(void *ud, const uint8_t *data, size_t len)
{
    struct ptystream *p = ud;
    int rc = 0;
    activity_note(p->activity, ACTIVITY_PTY, 0, len, 0);
    while (len > 0 && rc == 0) {
        size_t n = len < PROTO_PTYREC_MAX_BODY ? len : PROTO_PTYREC_MAX_BODY;
        rc = out_record(p, PROTO_PTYREC_DATA, data, n);
        data += n;
        len -= n;
    }
    if (rc == 0)
        rc = out_flush(p);
    if (rc < 0 || p->out.len > p->backlog_max) {
        /* Too far behind (or out of memory): drop this attachment; it can come back. */
        log_info("pty stream %u: %s", p->id,
                 rc < 0 ? "out of memory" : "client too slow, detached (it may reattach)");
        if (p->mux) /* the stream ends; mux_stream_reset forgets it, so free now */
            ps_reset(p, PROTO_CODE_FLOW, "client too slow");
        return;
    }
    out_send(p);
}

/* The waiting notice, as terminal output (not kept in any replay: no PTY exists yet). */
static int on_output_notice(struct ptystream *p, const char *notice)
{
    if (out_record(p, PROTO_PTYREC_DATA, (const uint8_t *)notice, strlen(notice)) < 0 ||
        out_flush(p) < 0)
        return -1;
    return 0;
}

static void on_exited(void *ud, int how, int value)
{
    struct ptystream *p = ud;
    uint8_t body[2] = {(uint8_t)how, (uint8_t)value};
    p->att = NULL; /* rpty frees it after this call */
    p->exited = true;
    if (out_record(p, PROTO_PTYREC_EXIT, body, sizeof(body)) < 0 || out_flush(p) < 0)
        log_warn("pty stream %u: out of memory for the exit status", p->id);
    out_send(p);
}

/* ---- input: records from the peer ---- */

static void process_input(struct ptystream *p);

static void on_input_ready(void *ud)
{
    process_input(ud);
}

static const struct rpty_client_ops ps_client_ops = {
    .output = on_output,
    .exited = on_exited,
    .input_ready = on_input_ready,
};

/* Handles the records in rec; returns 0, 1 when the PTY is full (wait), or -1 (malformed). */
static int handle_records(struct ptystream *p)
{
    while (p->rec.len > 0) {
        struct proto_ptyrec r;
        int n = proto_ptyrec_decode(bytebuf_peek(&p->rec), p->rec.len, &r);
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (p->wait)
            return 1; /* nothing runs yet: input waits, in order, under our credit */
        if (r.type == PROTO_PTYREC_DATA && p->att) {
            size_t n = rpty_input(p->att, r.body + p->taken, r.len - p->taken);
            activity_note(p->activity, ACTIVITY_PTY, n, 0, 1);
            p->taken += n;
            if (p->taken < r.len)
                return 1; /* input_ready resumes here */
        } else if (r.type == PROTO_PTYREC_RESIZE && p->att) {
            rpty_resize(p->att, r.rows, r.cols);
        }
        p->taken = 0;
        bytebuf_consume(&p->rec, (size_t)n);
    }
    return 0;
}

/* Moves one step of received bytes into rec (inflating). Returns the received bytes used. */
static size_t fill_records(struct ptystream *p, int *err)
{
    if (!p->zlib) {
        size_t n = p->in.len < PTYSTREAM_INFLATE_STEP ? p->in.len : PTYSTREAM_INFLATE_STEP;
        if (bytebuf_append(&p->rec, bytebuf_peek(&p->in), n) < 0)
            *err = -1;
        return *err ? 0 : n;
    }
    uint8_t buf[PTYSTREAM_INFLATE_STEP];
    p->inf.next_in = (Bytef *)bytebuf_peek(&p->in);
    p->inf.avail_in = (uInt)p->in.len;
    p->inf.next_out = buf;
    p->inf.avail_out = sizeof(buf);
    int rc = inflate(&p->inf, Z_SYNC_FLUSH);
    if (rc != Z_OK && rc != Z_BUF_ERROR && rc != Z_STREAM_END) {
        *err = -1;
        return 0;
    }
    size_t used = p->in.len - p->inf.avail_in;
    if (bytebuf_append(&p->rec, buf, sizeof(buf) - p->inf.avail_out) < 0)
        *err = -1;
    return used;
}

static void process_input(struct ptystream *p)
{
    for (;;) {
        int rc = handle_records(p);
        if (rc < 0) {
            ps_reset(p, PROTO_CODE_PROTOCOL, "malformed pty record");
            return;
        }
        if (rc > 0 || p->in.len == 0)
            return;
        /* A record never needs more than its header and 65535 bytes: more is a lie. */
        if (p->rec.len > PROTO_PTYREC_HEADER + PROTO_PTYREC_MAX_BODY) {
            ps_reset(p, PROTO_CODE_PROTOCOL, "malformed pty record");
            return;
        }
        int err = 0;
        size_t before = p->rec.len;
        size_t used = fill_records(p, &err);
        if (err) {
            ps_reset(p, PROTO_CODE_PROTOCOL, "bad zlib stream");
            return;
        }
        bytebuf_consume(&p->in, used);
        if (used > 0 && p->mux)
            mux_stream_consumed(p->mux, p->id, used);
        if (used == 0 && p->rec.len == before)
            return; /* zlib wants more input */
    }
}

static void ps_data(void *s, const uint8_t *data, size_t len)
{
    struct ptystream *p = s;
    /* Credit bounds this: the peer cannot send more than the window ahead. */
    if (bytebuf_append(&p->in, data, len) < 0) {
        ps_reset(p, PROTO_CODE_INTERNAL, "out of memory");
        return;
    }
    process_input(p);
}

static void ps_fin(void *s)
{
    (void)s; /* the client sends no more input; output goes on until it detaches */
}

static void ps_writable(void *s)
{
    out_send(s);
}

static void ps_closed(void *s, uint32_t code)
{
    struct ptystream *p = s;
    (void)code;
    p->mux = NULL;
    if (p->att) { /* the client left (or the tunnel dropped): the PTY lives on */
        rpty_detach(p->att);
        p->att = NULL;
    }
    ps_free(p);
}

static const struct stream_ops ptystream_ops = {
    .data = ps_data,
    .fin = ps_fin,
    .writable = ps_writable,
    .closed = ps_closed,
};

/* Attaches p to its PTY (starting it); returns 0 or a negative errno from rpty_attach. */
static int ps_attach(struct ptystream *p, struct rpty_registry *reg,
                     const struct ptystream_env *env, const struct proto_open *o)
{
    char login[256];
    snprintf(login, sizeof(login), "-%s", proc_basename(env->shell));
    char *login_argv[] = {login, NULL};
    char *cmd_argv[] = {(char *)proc_basename(env->shell), "-c", (char *)o->command, NULL};
    struct proc_spec spec = {
        .path = env->shell,
        .argv = o->command[0] ? cmd_argv : login_argv,
        .envp = env->envp,
        .cwd = env->cwd,
        .nice = env->nice,
        .oom_score_adj = env->oom_score_adj,
    };
    /* The replay may arrive before the stream is accepted: it waits in out for OPEN_OK. */
    int rc = rpty_attach(reg, o->pty_id, o->rows, o->cols, &spec, &ps_client_ops, p, &p->att);
    if (rc == 0)
        gate_session_started(env->gate);
    return rc;
}

static void attach_failed(int rc, unsigned max_sessions, char *why, size_t len)
{
    if (rc == -EAGAIN) {
        snprintf(why, len, "too many PTYs (at most %u)", max_sessions);
        return;
    }
    snprintf(why, len, "cannot start the PTY: %s",
             stream_out_of_fds(rc) ? STREAM_OUT_OF_FDS : strerror(-rc));
    log_warn("pty refused: %s", why);
}

static void on_gate_open(struct gate_waiter *gw)
{
    struct ptystream_wait *w = (struct ptystream_wait *)gw;
    struct ptystream *p = w->p;
    p->wait = NULL;
    /* As at the open: the replay waits in out (a slow client cannot be dropped, and p freed,
     * from inside the attach). */
    struct mux *m = p->mux;
    p->mux = NULL;
    int rc = ps_attach(p, w->reg, &w->env, &w->open);
    p->mux = m;
    unsigned max = w->reg->cfg.max_sessions;
    wait_free(w);
    if (rc < 0) {
        char why[128];
        attach_failed(rc, max, why, sizeof(why));
        ps_reset(p, rc == -EAGAIN ? PROTO_CODE_STREAM_LIMIT : PROTO_CODE_INTERNAL, why);
        return;
    }
    if (p->out.len > p->backlog_max) {
        ps_reset(p, PROTO_CODE_FLOW, "client too slow");
        return;
    }
    out_send(p);
    process_input(p); /* what was typed meanwhile */
}

/* Keeps what the start needs until the gate opens; 0 or -1 (out of memory). */
static int ps_defer(struct ptystream *p, struct rpty_registry *reg, const struct ptystream_env *env,
                    const struct proto_open *o)
{
    struct ptystream_wait *w = calloc(1, sizeof(*w));
    if (!w)
        return -1;
    w->p = p;
    w->reg = reg;
    w->open = *o;
    w->env = *env;
    w->shell = strdup(env->shell);
    w->cwd = env->cwd ? strdup(env->cwd) : NULL;
    w->envp = proc_env_copy(env->envp);
    if (!w->shell || (env->cwd && !w->cwd) || !w->envp) {
        wait_free(w);
        return -1;
    }
    w->env.shell = w->shell;
    w->env.cwd = w->cwd;
    w->env.envp = w->envp;
    p->wait = w;
    gate_wait(env->gate, &w->waiter, on_gate_open);
    return on_output_notice(p, env->gate->notice);
}

void ptystream_open(struct rpty_registry *reg, const struct ptystream_env *env, struct mux *m,
                    uint32_t id, const struct proto_open *o)
{
    struct ptystream *p = calloc(1, sizeof(*p));
    if (!p) {
        mux_stream_reject(m, id, PROTO_CODE_INTERNAL, "out of memory");
        return;
    }
    p->base.ops = &ptystream_ops;
    p->id = id;
    p->activity = env->activity;
    p->backlog_max = reg->cfg.ring_size + PTYSTREAM_BACKLOG_SLACK;
    p->zlib = (o->pty_options & PROTO_PTY_OPT_ZLIB) != 0;
    if (p->zlib) {
        p->inf_ok = inflateInit(&p->inf) == Z_OK;
        p->def_ok = deflateInit2(&p->def, PTYSTREAM_ZLEVEL, Z_DEFLATED, PTYSTREAM_ZWBITS,
                                 PTYSTREAM_ZMEMLEVEL, Z_DEFAULT_STRATEGY) == Z_OK;
        if (!p->inf_ok || !p->def_ok) {
            ps_free(p);
            mux_stream_reject(m, id, PROTO_CODE_INTERNAL, "out of memory");
            return;
        }
    }
    int rc;
    if (gate_closed(env->gate) && !rpty_exists(reg, o->pty_id))
        rc = ps_defer(p, reg, env, o) < 0 ? -ENOMEM : 0;
    else
        rc = ps_attach(p, reg, env, o);
    if (rc < 0) {
        char why[128];
        attach_failed(rc, reg->cfg.max_sessions, why, sizeof(why));
        ps_free(p);
        mux_stream_reject(m, id, rc == -EAGAIN ? PROTO_CODE_STREAM_LIMIT : PROTO_CODE_INTERNAL,
                          why);
        return;
    }
    if (mux_stream_accept(m, id, p) < 0) {
        if (p->att)
            rpty_detach(p->att);
        ps_free(p);
        return;
    }
    p->mux = m;
    out_send(p);
}
