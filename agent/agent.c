#include "agent.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <jansson.h>

#include "activity.h"
#include "agentlog.h"
#include "metadata.h"
#include "portfwd.h"
#include "ports.h"
#include "ptystream.h"
#include "stream.h"
#include "tunnel/heap.h"
#include "tunnel/log.h"

#define AGENT_STATS_MS 30000u /* stats interval until a manifest says otherwise */

struct agent {
    uv_loop_t *loop;
    struct dial *dial;
    struct sshd *sshd;
    struct rpty_registry ptys; /* only with sshd: it shares the reaper */
    struct activity activity;
    struct ports_scanner *ports;
    uv_timer_t stats_timer;
    uint64_t stats_interval_ms;
    bool connected;
    struct agentlog *log;
    struct lifecycle *lc;    /* with sshd only */
    struct metadata *md;     /* with sshd only */
    uv_timer_t hangup_timer; /* agent_stop: sessions had SIGHUP; SIGKILL for the rest */
    uint64_t hangup_deadline;
    bool hangup_killed;
    unsigned handles; /* uv handles still open: freed when the last one closed */
    bool stopping;
    bool log_to_relay; /* install the log sink in agent_start */
    struct portfwd_shared pf;
    void (*done)(void *);
    void *done_arg;
    void (*on_shutdown)(void *);
    void *shutdown_arg;
};

static void open_pty(struct agent *a, struct mux *m, uint32_t id, const struct proto_open *o)
{
    char **envp = sshd_session_env(a->sshd, "xterm-256color", "pty");
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
        .activity = &a->activity,
        .gate = a->lc ? lifecycle_gate(a->lc) : NULL,
    };
    ptystream_open(&a->ptys, &env, m, id, o);
    sshd_session_env_free(envp);
}

static void on_stream_opened(void *ud, uint32_t id, const struct proto_open *o)
{
    struct agent *a = ud;
    struct mux *m = dial_mux(a->dial);
    ports_scanner_wake(a->ports);
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

static void set_stats_interval(struct agent *a, uint64_t ms);

static void on_control(void *ud, json_t *msg)
{
    struct agent *a = ud;
    const char *type = json_string_value(json_object_get(msg, "type"));
    if (strcmp(type, "manifest") == 0) {
        log_info("serving workspace %s", json_string_value(json_object_get(msg, "workspace")));
        if (a->sshd)
            sshd_set_manifest(a->sshd, msg);
        json_t *iv = json_object_get(msg, "stats_interval");
        set_stats_interval(a, iv ? (uint64_t)json_integer_value(iv) * 1000 : AGENT_STATS_MS);
        if (a->lc && !a->stopping)
            lifecycle_manifest(a->lc, msg);
        if (a->md && !a->stopping) {
            char **envp = sshd_session_env(a->sshd, "dumb", "script");
            metadata_set_items(a->md, json_object_get(msg, "metadata"), envp,
                               sshd_session_dir(a->sshd));
            sshd_session_env_free(envp);
        }
    } else if (strcmp(type, "shutdown") == 0) {
        const char *why = json_string_value(json_object_get(msg, "reason"));
        log_info("the relay asks for shutdown%s%s", why ? ": " : "", why ? why : "");
        if (a->on_shutdown)
            a->on_shutdown(a->shutdown_arg);
    }
}

/* Stats on stream 0 (PROTOCOL.md 12.5): sessions by type, bytes by kind, idleness. */
static void send_stats(struct agent *a)
{
    if (!a->connected)
        return;
    json_t *sessions = json_object(), *rx = json_object(), *tx = json_object();
    if (a->sshd) {
        static const struct {
            const char *name;
            enum sshd_session_type type;
        } types[] = {{"ssh", SSHD_TYPE_SSH},
                     {"vscode", SSHD_TYPE_VSCODE},
                     {"jetbrains", SSHD_TYPE_JETBRAINS},
                     {"sftp", SSHD_TYPE_SFTP}};
        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
            json_object_set_new(sessions, types[i].name,
                                json_integer(sshd_session_count(a->sshd, types[i].type)));
        json_object_set_new(sessions, "pty", json_integer(a->ptys.count));
    }
    json_object_set_new(sessions, "forward", json_integer(a->pf.forwards));
    for (int k = 0; k < ACTIVITY_KINDS; k++) {
        json_object_set_new(rx, activity_kind_name(k), json_integer((json_int_t)a->activity.rx[k]));
        json_object_set_new(tx, activity_kind_name(k), json_integer((json_int_t)a->activity.tx[k]));
    }
    json_t *msg = json_pack("{s:s, s:I, s:o, s:o, s:o}", "type", "stats", "idle_ms",
                            (json_int_t)activity_idle_ms(&a->activity), "sessions", sessions,
                            "rx_bytes", rx, "tx_bytes", tx);
    if (msg && a->activity.last_mono_ms)
        json_object_set_new(msg, "last_activity", json_integer(a->activity.last_unix_ms));
    if (msg)
        dial_send_control(a->dial, msg);
    json_decref(msg);
}

/* Ports, lifecycle, logs and metadata reports: sent while connected (each kind says again
 * what matters after a reconnect). */
static void send_report(void *ud, json_t *msg)
{
    struct agent *a = ud;
    if (a->connected)
        dial_send_control(a->dial, msg);
}

/*
 * Log batches wait in agentlog while this many control bytes are already queued for the
 * relay: the rest of the mux's control queue (MUX_MAX_CONTROL_QUEUE) stays free for the
 * small reports, which are never refused for room.
 */
#define AGENT_LOGS_QUEUE_MAX (1u << 20)

static int send_logs(void *ud, json_t *msg)
{
    struct agent *a = ud;
    struct mux *m = a->connected ? dial_mux(a->dial) : NULL;
    if (!m || mux_control_queued(m) > AGENT_LOGS_QUEUE_MAX)
        return -1;
    return dial_send_control(a->dial, msg) < 0 ? -1 : 0;
}

/* The sink of tunnel/log while the agent runs: its own lines go to the relay too. */
static void log_to_relay(void *ud, enum log_level level, const char *msg, size_t len)
{
    struct agent *a = ud;
    (void)level;
    if (a->log)
        agentlog_line(a->log, "agent", msg, len);
}

/* Streams are open (SSH, terminals, forwards) or start scripts run. */
static bool in_use(void *ud)
{
    struct agent *a = ud;
    struct mux *m = a->dial ? dial_mux(a->dial) : NULL; /* NULL once stopped */
    return (m && mux_stream_count(m) > 0) || (a->lc && lifecycle_state(a->lc) == PROTO_LC_STARTING);
}

static void on_stats_timer(uv_timer_t *t)
{
    struct agent *a = t->data;
    send_stats(a);
    ports_scanner_idle_scan(a->ports); /* awake anyway: an idle workspace's ports scan */
    /*
     * With nothing open, give the heap's free pages back. glibc returns only the top of the
     * heap by itself: after 1,000 streams closed the agent kept 11 MB of anonymous memory
     * it no longer used, chunks freed between ones still live. So do the tunnel's output
     * buffer's pages: 272 KiB stayed touched after 64 MiB of SSH each way.
     */
    if (!in_use(a)) {
        heap_trim();
        dial_trim(a->dial);
    }
}

/* The manifest's stats_interval (seconds; 0: no stats), else the default. */
static void set_stats_interval(struct agent *a, uint64_t ms)
{
    a->stats_interval_ms = ms;
    uv_timer_stop(&a->stats_timer);
    if (ms)
        uv_timer_start(&a->stats_timer, on_stats_timer, ms, ms);
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
    a->connected = true;
    send_stats(a); /* once right away, then every interval */
    if (a->lc)
        lifecycle_connected(a->lc);
    if (a->ports)
        ports_scanner_reset(a->ports); /* the relay forgot: tell it again */
    if (a->md)
        metadata_resend(a->md);
    agentlog_connected(a->log, true);
}

static void on_disconnected(void *ud, const char *why)
{
    struct agent *a = ud;
    a->connected = false;
    agentlog_connected(a->log, false);
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

/* The last open handle closed: the agent's memory goes, then its owner hears of it. */
static void on_handle_closed(uv_handle_t *h)
{
    struct agent *a = h->data;
    if (--a->handles > 0)
        return;
    void (*done)(void *) = a->done;
    void *done_arg = a->done_arg;
    free(a);
    if (done)
        done(done_arg);
}

/* Frees what is left once the tunnel and the sessions are gone. */
static void release(struct agent *a)
{
    if (tether_log_sink.ud == a)
        tether_log_sink = (struct log_sink){0};
    ports_scanner_free(a->ports);
    agentlog_free(a->log);
    a->log = NULL;
    uv_close((uv_handle_t *)&a->stats_timer, on_handle_closed);
    uv_close((uv_handle_t *)&a->hangup_timer, on_handle_closed);
}

struct agent *agent_new(uv_loop_t *loop, const struct dial_config *cfg, struct sshd *sshd,
                        const struct agent_options *opts, void (*on_shutdown)(void *arg), void *arg)
{
    static const struct agent_options no_options = {0};
    if (!opts)
        opts = &no_options;
    struct agent *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->sshd = sshd;
    a->log_to_relay = !opts->keep_log_local;
    a->on_shutdown = on_shutdown;
    a->shutdown_arg = arg;
    a->loop = loop;
    a->pf.loop = loop;
    activity_init(&a->activity, loop);
    a->pf.activity = &a->activity;
    a->pf.policy = opts->forward_policy;
    uv_timer_init(loop, &a->stats_timer);
    uv_timer_init(loop, &a->hangup_timer);
    a->stats_timer.data = a->hangup_timer.data = a;
    a->handles = 2;
    set_stats_interval(a, AGENT_STATS_MS);
    a->log = agentlog_new(loop, send_logs, a);
    a->ports = ports_scanner_new(
        loop, opts->ports_interval_ms ? opts->ports_interval_ms : PORTS_SCAN_MS_DEFAULT,
        opts->ports_idle_after_ms ? opts->ports_idle_after_ms : PORTS_IDLE_AFTER_MS, send_report,
        in_use, a);
    a->dial = dial_new(loop, cfg, &agent_streams, &agent_dial_events, a);
    if (!a->dial || !a->log || !a->ports) {
        if (a->dial)
            dial_stop(a->dial, NULL, NULL);
        release(a); /* handles close before the memory goes */
        return NULL;
    }
    if (sshd) {
        struct rpty_config def;
        rpty_config_default(&def);
        rpty_registry_init(&a->ptys, loop, sshd_reaper(sshd), opts->pty ? opts->pty : &def);
        sshd_set_activity(sshd, &a->activity);
        static const struct lifecycle_config no_scripts = {
            .startup_timeout_ms = LIFECYCLE_STARTUP_TIMEOUT_MS,
            .shutdown_timeout_ms = LIFECYCLE_SHUTDOWN_TIMEOUT_MS,
        };
        a->lc = lifecycle_new(loop, opts->lifecycle ? opts->lifecycle : &no_scripts, sshd, a->log,
                              a->ports, send_report, a);
        a->md = metadata_new(loop, sshd_reaper(sshd), send_report, a);
        if (a->lc)
            sshd_set_gate(sshd, lifecycle_gate(a->lc));
        /* Without them the workspace still serves sessions, only without scripts. */
        if (!a->lc || !a->md)
            log_error("out of memory for the lifecycle or metadata: running without them");
    }
    return a;
}

void agent_start(struct agent *a)
{
    if (a->log_to_relay)
        tether_log_sink = (struct log_sink){.fn = log_to_relay, .ud = a};
    log_info("tether agent %s dialing the relay", TETHER_VERSION);
    dial_start(a->dial);
}

static void on_sshd_freed(void *arg)
{
    release(arg);
}

static void on_dial_stopped(void *arg)
{
    struct agent *a = arg;
    /* The dial is freed; the timers that run until release (stats, ports, log batches)
     * send only while connected, so they no longer reach it. */
    a->dial = NULL;
    a->connected = false;
    if (a->sshd) {
        lifecycle_free(a->lc); /* before sshd: its scripts use sshd's reaper */
        a->lc = NULL;
        sshd_set_gate(a->sshd, NULL);
        rpty_registry_close(&a->ptys); /* every stream is gone: no attachment is left */
        sshd_free(a->sshd, on_sshd_freed, a);
    } else {
        release(a);
    }
}

/* The sessions are gone (or were killed): off, the last logs, and goodbye to the relay. */
static void sessions_gone(struct agent *a)
{
    uv_timer_stop(&a->hangup_timer);
    if (a->lc)
        lifecycle_off(a->lc);
    agentlog_flush(a->log);
    dial_stop(a->dial, on_dial_stopped, a);
}

/* Session processes, and what they or the scripts left running that the agent adopted
 * (proc_reaper_adopt_orphans), are still there. */
static bool children_left(struct agent *a)
{
    return proc_reaper_busy(sshd_reaper(a->sshd)) || proc_signal_children(0) > 0;
}

/* Every 100 ms after the hangup: on once no child is left; SIGKILL at the deadline, and
 * a second more for the reaper to collect them. */
static void on_hangup_tick(uv_timer_t *t)
{
    struct agent *a = t->data;
    struct proc_reaper *r = sshd_reaper(a->sshd);
    uint64_t now = uv_now(a->loop);
    if (!children_left(a) || (a->hangup_killed && now >= a->hangup_deadline)) {
        sessions_gone(a);
        return;
    }
    if (!a->hangup_killed && now >= a->hangup_deadline) {
        log_warn("session processes still running %u ms after SIGHUP: sending SIGKILL",
                 SSHD_HANGUP_GRACE_MS);
        proc_reaper_kill_all(r, SIGKILL);
        proc_signal_children(SIGKILL);
        a->hangup_killed = true;
        a->hangup_deadline = now + 1000;
    }
}

static void on_scripts_done(void *arg)
{
    struct agent *a = arg;
    if (!a->sshd || !children_left(a)) {
        sessions_gone(a);
        return;
    }
    log_info("hanging up the sessions");
    proc_reaper_kill_all(sshd_reaper(a->sshd), SIGHUP);
    proc_signal_children(SIGHUP); /* what scripts and sessions left behind, if adopted */
    a->hangup_deadline = uv_now(a->loop) + SSHD_HANGUP_GRACE_MS;
    uv_timer_start(&a->hangup_timer, on_hangup_tick, 100, 100);
}

void agent_stop(struct agent *a, void (*done)(void *arg), void *arg)
{
    a->done = done;
    a->done_arg = arg;
    if (a->stopping)
        return;
    a->stopping = true;
    metadata_free(a->md);
    a->md = NULL;
    if (a->lc)
        lifecycle_shut_down(a->lc, on_scripts_done, a);
    else
        on_scripts_done(a);
}
