#include "agent.h"

#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <jansson.h>

#include "portfwd.h"
#include "ptystream.h"
#include "stream.h"
#include "tunnel/log.h"

struct agent {
    uv_loop_t *loop;
    struct dial *dial;
    struct sshd *sshd;
    struct rpty_registry ptys; /* only with sshd: it shares the reaper */
    struct portfwd_shared pf;
    void (*done)(void *);
    void *done_arg;
    void (*on_shutdown)(void *);
    void *shutdown_arg;
};

static void open_pty(struct agent *a, struct mux *m, uint32_t id, const struct proto_open *o)
{
    char **envp = sshd_pty_env(a->sshd, "xterm-256color");
    if (!envp) {
        mux_stream_reject(m, id, PROTO_CODE_INTERNAL, "out of memory");
        return;
    }
    struct ptystream_env env = {
        .shell = sshd_shell(a->sshd),
        .envp = envp,
        .cwd = sshd_session_dir(a->sshd),
        .oom_score_adj = sshd_child_oom_adj(a->sshd),
        .nice = SSHD_CHILD_NICE_DELTA,
    };
    ptystream_open(&a->ptys, &env, m, id, o);
    sshd_pty_env_free(envp);
}

static void on_stream_opened(void *ud, uint32_t id, const struct proto_open *o)
{
    struct agent *a = ud;
    struct mux *m = dial_mux(a->dial);
    switch (o->kind) {
    case PROTO_KIND_TCP:
        portfwd_open(&a->pf, m, id, o);
        break;
    case PROTO_KIND_SSH:
        if (a->sshd)
            sshd_serve_stream(a->sshd, &a->pf, m, id);
        else
            mux_stream_reject(m, id, PROTO_CODE_UNSUPPORTED, "this agent serves no SSH");
        break;
    case PROTO_KIND_PTY:
        if (a->sshd)
            open_pty(a, m, id, o);
        else
            mux_stream_reject(m, id, PROTO_CODE_UNSUPPORTED, "this agent serves no PTYs");
        break;
    default:
        mux_stream_reject(m, id, PROTO_CODE_UNSUPPORTED, "stream kind not served");
        break;
    }
}

static void on_stream_data(void *ud, uint32_t id, void *s, const uint8_t *data, size_t len)
{
    (void)ud;
    (void)id;
    struct agent_stream *st = s;
    st->ops->data(st, data, len);
}

static void on_stream_fin(void *ud, uint32_t id, void *s)
{
    (void)ud;
    (void)id;
    struct agent_stream *st = s;
    st->ops->fin(st);
}

static void on_stream_writable(void *ud, uint32_t id, void *s)
{
    (void)ud;
    (void)id;
    struct agent_stream *st = s;
    st->ops->writable(st);
}

static void on_stream_closed(void *ud, uint32_t id, void *s, uint32_t code, const char *text,
                             size_t len)
{
    (void)ud;
    (void)id;
    (void)text;
    (void)len;
    struct agent_stream *st = s;
    if (st) /* NULL for a stream that was never set up */
        st->ops->closed(st, code);
}

static void on_control(void *ud, json_t *msg)
{
    struct agent *a = ud;
    const char *type = json_string_value(json_object_get(msg, "type"));
    if (strcmp(type, "manifest") == 0) {
        log_info("serving workspace %s", json_string_value(json_object_get(msg, "workspace")));
        if (a->sshd)
            sshd_set_manifest(a->sshd, msg);
    } else if (strcmp(type, "shutdown") == 0) {
        const char *why = json_string_value(json_object_get(msg, "reason"));
        log_info("the relay asks for shutdown%s%s", why ? ": " : "", why ? why : "");
        if (a->on_shutdown)
            a->on_shutdown(a->shutdown_arg);
    }
}

static void on_connected(void *ud, struct mux *m)
{
    struct agent *a = ud;
    struct utsname u;
    char host[256] = "unknown";
    (void)m;
    gethostname(host, sizeof(host) - 1);
    if (uname(&u) < 0)
        memset(&u, 0, sizeof(u));
    json_t *hello =
        json_pack("{s:s, s:s, s:s, s:s, s:s, s:[s]}", "type", "hello", "version", TETHER_VERSION,
                  "os", "linux", "arch", u.machine[0] ? u.machine : "unknown", "hostname", host,
                  "capabilities", "tcp");
    if (hello && a->sshd) {
        json_array_append_new(json_object_get(hello, "capabilities"), json_string("ssh"));
        json_array_append_new(json_object_get(hello, "capabilities"), json_string("pty"));
    }
    if (hello)
        dial_send_control(a->dial, hello);
    json_decref(hello);
}

static void on_disconnected(void *ud, const char *why)
{
    (void)ud;
    log_warn("disconnected from the relay: %s", why);
}

static const struct mux_callbacks agent_streams = {
    .stream_opened = on_stream_opened,
    .stream_data = on_stream_data,
    .stream_fin = on_stream_fin,
    .stream_writable = on_stream_writable,
    .stream_closed = on_stream_closed,
    .control = on_control,
};

static const struct dial_events agent_dial_events = {
    .connected = on_connected,
    .disconnected = on_disconnected,
};

struct agent *agent_new(uv_loop_t *loop, const struct dial_config *cfg, struct sshd *sshd,
                        const struct rpty_config *pty_cfg, void (*on_shutdown)(void *arg),
                        void *arg)
{
    struct agent *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->sshd = sshd;
    if (sshd) {
        struct rpty_config def;
        rpty_config_default(&def);
        rpty_registry_init(&a->ptys, loop, sshd_reaper(sshd), pty_cfg ? pty_cfg : &def);
    }
    a->on_shutdown = on_shutdown;
    a->shutdown_arg = arg;
    a->loop = loop;
    a->pf.loop = loop;
    a->dial = dial_new(loop, cfg, &agent_streams, &agent_dial_events, a);
    if (!a->dial) {
        free(a);
        return NULL;
    }
    return a;
}

void agent_start(struct agent *a)
{
    log_info("tether agent %s dialing the relay", TETHER_VERSION);
    dial_start(a->dial);
}

static void on_sshd_freed(void *arg)
{
    struct agent *a = arg;
    void (*done)(void *) = a->done;
    void *done_arg = a->done_arg;
    free(a);
    if (done)
        done(done_arg);
}

static void on_dial_stopped(void *arg)
{
    struct agent *a = arg;
    if (a->sshd) {
        rpty_registry_close(&a->ptys); /* every stream is gone: no attachment is left */
        sshd_free(a->sshd, on_sshd_freed, a);
    } else {
        on_sshd_freed(a);
    }
}

void agent_stop(struct agent *a, void (*done)(void *arg), void *arg)
{
    a->done = done;
    a->done_arg = arg;
    dial_stop(a->dial, on_dial_stopped, a);
}
