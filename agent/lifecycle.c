#include "lifecycle.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "devcontainer.h"
#include "script.h"
#include "tunnel/log.h"

extern char **environ;

/* Scripts of one agent run: --startup-script, the manifest's start scripts, and
 * devcontainer.json's postStartCommand and postAttachCommand; shutdown frees them all
 * before the stop scripts (the flag's and the manifest's) start. */
#define LC_MAX_SCRIPTS (1 + PROTO_MAX_SCRIPTS + 2 * DEVCONTAINER_MAX_COMMANDS)

enum lc_kind { LC_RUN_START, LC_RUN_ATTACH, LC_RUN_STOP };

/* The scripts of one kind: how many still run, and how those that ended went. */
struct lc_tally {
    unsigned running;
    bool failed;    /* one exited non-zero or could not run */
    bool timed_out; /* one was killed at its timeout */
};

struct lc_script {
    struct lifecycle *lc;
    struct script *s;
    char source[128];
    enum lc_kind kind;
    bool blocks_login;
    bool ended;
};

struct lifecycle {
    uv_timer_t later; /* first member: the handle's memory is the object's */
    uv_loop_t *loop;
    const struct lifecycle_config *cfg;
    struct sshd *sshd;
    struct agentlog *log;
    struct ports_scanner *ports;
    void (*report)(void *ud, json_t *msg);
    void *ud;
    enum proto_lifecycle state;
    int64_t changed_at; /* unix ms */
    struct gate gate;
    json_t *manifest; /* the last one: its stop scripts run at shutdown */
    struct devcontainer *dc;
    struct lc_script *scripts[LC_MAX_SCRIPTS];
    size_t nscripts;
    struct lc_tally tally[3]; /* by lc_kind */
    unsigned blocking;        /* start scripts that hold logins, still running */
    bool shutting;
    void (*shut_done)(void *arg);
    void *shut_arg;
};

void lifecycle_config_default(struct lifecycle_config *cfg)
{
    *cfg = (struct lifecycle_config){
        .startup_timeout_ms = LIFECYCLE_STARTUP_TIMEOUT_MS,
        .shutdown_timeout_ms = LIFECYCLE_SHUTDOWN_TIMEOUT_MS,
    };
}

static json_t *state_message(const struct lifecycle *lc)
{
    return json_pack("{s:s, s:s, s:I}", "type", "lifecycle", "state",
                     proto_lifecycle_name(lc->state), "changed_at", (json_int_t)lc->changed_at);
}

/* States only move forward (PROTOCOL.md 12.7): a later one may skip, never go back. */
static void set_state(struct lifecycle *lc, enum proto_lifecycle s)
{
    if (proto_lifecycle_rank(s) <= proto_lifecycle_rank(lc->state))
        return;
    lc->state = s;
    lc->changed_at = clock_unix_ms();
    log_info("lifecycle: %s", proto_lifecycle_name(s));
    json_t *msg = state_message(lc);
    if (msg)
        lc->report(lc->ud, msg);
    json_decref(msg);
}

/* ---- scripts ---- */

static void on_script_line(void *ud, const char *source, const char *text, size_t len)
{
    struct lc_script *x = ud;
    agentlog_line(x->lc->log, source, text, len);
}

static void check_start(struct lifecycle *lc);
static void check_stop(struct lifecycle *lc);

static void on_script_exit(void *ud, const struct script_result *r)
{
    struct lc_script *x = ud;
    struct lifecycle *lc = x->lc;
    x->ended = true;
    lc->tally[x->kind].running--;
    if (x->blocks_login)
        lc->blocking--;
    double secs = (double)r->elapsed_ms / 1000.0;
    switch (r->end) {
    case SCRIPT_EXITED:
        if (r->status == 0) {
            log_info("%s: done in %.1fs", x->source, secs);
        } else {
            log_warn("%s: exit status %d after %.1fs", x->source, r->status, secs);
            lc->tally[x->kind].failed = true;
        }
        break;
    case SCRIPT_SIGNALED:
        log_warn("%s: killed by signal %d after %.1fs", x->source, r->status, secs);
        lc->tally[x->kind].failed = true;
        break;
    case SCRIPT_TIMED_OUT:
        log_warn("%s: timed out after %.1fs: its processes were killed", x->source, secs);
        lc->tally[x->kind].timed_out = true;
        break;
    case SCRIPT_SPAWN_FAILED:
        log_warn("%s: cannot run: %s", x->source, strerror(-r->status));
        lc->tally[x->kind].failed = true;
        break;
    }
    if (x->kind == LC_RUN_STOP)
        check_stop(lc);
    else if (x->kind == LC_RUN_START)
        check_start(lc);
}

/* Starts one script; its end is counted in tally[kind]. */
static void run(struct lifecycle *lc, const char *source, char *const *argv, uint64_t timeout_ms,
                enum lc_kind kind, bool blocks_login)
{
    static const struct script_callbacks cbs = {.on_line = on_script_line,
                                                .on_exit = on_script_exit};
    if (lc->nscripts >= LC_MAX_SCRIPTS) {
        log_warn("%s: not run: more than %u scripts", source, LC_MAX_SCRIPTS);
        lc->tally[kind].failed = true;
        return;
    }
    struct lc_script *x = calloc(1, sizeof(*x));
    char **envp = sshd_session_env(lc->sshd, "dumb", "script");
    if (!x || !envp) {
        free(x);
        sshd_session_env_free(envp);
        log_error("%s: not run: out of memory", source);
        lc->tally[kind].failed = true;
        return;
    }
    x->lc = lc;
    x->kind = kind;
    x->blocks_login = blocks_login;
    snprintf(x->source, sizeof(x->source), "%s", source);
    struct script_spec spec = {
        .source = x->source,
        .argv = argv,
        .envp = envp,
        .cwd = sshd_session_dir(lc->sshd),
        .timeout_ms = timeout_ms,
    };
    x->s = script_start(lc->loop, sshd_reaper(lc->sshd), &spec, &cbs, x);
    sshd_session_env_free(envp);
    if (!x->s) {
        free(x);
        log_error("%s: not run: out of memory", source);
        lc->tally[kind].failed = true;
        return;
    }
    lc->scripts[lc->nscripts++] = x;
    lc->tally[kind].running++;
    if (blocks_login)
        lc->blocking++;
    log_info("%s: started%s", x->source, blocks_login ? " (logins wait for it)" : "");
}

static void run_shell(struct lifecycle *lc, const char *source, const char *text,
                      uint64_t timeout_ms, enum lc_kind kind, bool blocks_login)
{
    char *argv[4];
    script_shell_argv(text, argv);
    run(lc, source, argv, timeout_ms, kind, blocks_login);
}

/* The manifest's scripts of one kind ("start" or "stop"; PROTOCOL.md 12.3). */
static void run_manifest_scripts(struct lifecycle *lc, const char *run_on, enum lc_kind kind)
{
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(lc->manifest, "scripts"), i, s)
    {
        if (strcmp(json_string_value(json_object_get(s, "run_on")), run_on) != 0)
            continue;
        char source[128];
        snprintf(source, sizeof(source), "script:%s",
                 json_string_value(json_object_get(s, "name")));
        json_t *t = json_object_get(s, "timeout");
        json_int_t secs =
            t ? json_integer_value(t)
              : (kind == LC_RUN_STOP ? PROTO_DEFAULT_STOP_TIMEOUT : PROTO_DEFAULT_START_TIMEOUT);
        bool blocks = kind == LC_RUN_START && json_is_true(json_object_get(s, "blocks_login"));
        run_shell(lc, source, json_string_value(json_object_get(s, "script")),
                  (uint64_t)secs * 1000, kind, blocks);
    }
}

static void run_devcontainer(struct lifecycle *lc, const char *hook, const struct dc_command *c,
                             size_t n, enum lc_kind kind)
{
    for (size_t i = 0; i < n; i++) {
        char source[128];
        snprintf(source, sizeof(source), "devcontainer:%s%s%s", hook, c[i].name[0] ? ":" : "",
                 c[i].name);
        run(lc, source, c[i].argv, lc->cfg->startup_timeout_ms, kind, false);
    }
}

static void check_start(struct lifecycle *lc)
{
    if (lc->blocking == 0 && lc->gate.closed) {
        log_info("logins may go on: the login-blocking scripts ended");
        gate_open(&lc->gate);
    }
    if (lc->tally[LC_RUN_START].running > 0 || lc->state != PROTO_LC_STARTING)
        return;
    set_state(lc, lc->tally[LC_RUN_START].timed_out ? PROTO_LC_START_TIMEOUT
                  : lc->tally[LC_RUN_START].failed  ? PROTO_LC_START_ERROR
                                                    : PROTO_LC_READY);
}

static void on_first_session(void *ud)
{
    struct lifecycle *lc = ud;
    if (lc->dc && !lc->shutting)
        run_devcontainer(lc, "postAttachCommand", lc->dc->post_attach, lc->dc->n_post_attach,
                         LC_RUN_ATTACH);
}

/* devcontainer.json in the workspace directory: remoteEnv, forwardPorts. */
static void load_devcontainer(struct lifecycle *lc)
{
    char err[512];
    const char *dir = sshd_session_dir(lc->sshd);
    if (devcontainer_load(dir, environ, &lc->dc, err, sizeof(err)) < 0) {
        log_warn("devcontainer.json ignored: %s", err);
        lc->dc = NULL;
        return;
    }
    if (!lc->dc)
        return;
    log_info("devcontainer.json found in %s", dir);
    sshd_set_extra_env(lc->sshd, lc->dc->env); /* NULL-terminated, freed with dc */
    if (lc->dc->n_ports && lc->ports) {
        json_t *list = json_array();
        for (size_t i = 0; list && i < lc->dc->n_ports; i++) {
            json_t *p = json_pack("{s:i}", "port", lc->dc->ports[i].port);
            if (p && lc->dc->ports[i].host[0])
                json_object_set_new(p, "host", json_string(lc->dc->ports[i].host));
            json_array_append_new(list, p);
        }
        ports_scanner_set_forward(lc->ports, list);
    }
}

void lifecycle_manifest(struct lifecycle *lc, const json_t *manifest)
{
    json_decref(lc->manifest);
    lc->manifest = json_deep_copy(manifest);
    if (lc->state != PROTO_LC_CREATED || lc->shutting)
        return;
    load_devcontainer(lc);
    set_state(lc, PROTO_LC_STARTING);
    const struct lifecycle_config *cfg = lc->cfg;
    if (cfg->startup_script)
        run_shell(lc, "startup", cfg->startup_script, cfg->startup_timeout_ms, LC_RUN_START,
                  cfg->startup_blocks_login);
    run_manifest_scripts(lc, "start", LC_RUN_START);
    if (lc->dc)
        run_devcontainer(lc, "postStartCommand", lc->dc->post_start, lc->dc->n_post_start,
                         LC_RUN_START);
    if (lc->blocking > 0)
        lc->gate.closed = true;
    check_start(lc);
}

/* ---- shutdown ---- */

static void on_later(uv_timer_t *t)
{
    check_stop((struct lifecycle *)t);
}

static void check_stop(struct lifecycle *lc)
{
    if (!lc->shutting || lc->tally[LC_RUN_STOP].running > 0 || !lc->shut_done)
        return;
    if (lc->tally[LC_RUN_STOP].timed_out)
        set_state(lc, PROTO_LC_SHUTDOWN_TIMEOUT);
    else if (lc->tally[LC_RUN_STOP].failed)
        set_state(lc, PROTO_LC_SHUTDOWN_ERROR);
    void (*done)(void *) = lc->shut_done;
    lc->shut_done = NULL;
    done(lc->shut_arg);
}

void lifecycle_shut_down(struct lifecycle *lc, void (*done)(void *arg), void *arg)
{
    if (lc->shutting)
        return;
    lc->shutting = true;
    lc->shut_done = done;
    lc->shut_arg = arg;
    set_state(lc, PROTO_LC_SHUTTING_DOWN);
    for (size_t i = 0; i < lc->nscripts; i++) {
        struct lc_script *x = lc->scripts[i];
        if (!x->ended)
            log_info("%s: stopped by the shutdown", x->source);
        script_free(x->s); /* what still runs of it is killed */
        free(x);
    }
    lc->nscripts = 0;
    lc->tally[LC_RUN_START].running = lc->tally[LC_RUN_ATTACH].running = lc->blocking = 0;
    /* No new session starts in a workspace that is going away: they wait, told so, until
     * the hangup ends them. */
    lc->gate.closed = true;
    lc->gate.notice = "tether: the workspace is shutting down\r\n";
    if (lc->cfg->shutdown_script)
        run_shell(lc, "shutdown", lc->cfg->shutdown_script, lc->cfg->shutdown_timeout_ms,
                  LC_RUN_STOP, false);
    run_manifest_scripts(lc, "stop", LC_RUN_STOP);
    uv_timer_start(&lc->later, on_later, 0, 0); /* done never runs inside this call */
}

void lifecycle_off(struct lifecycle *lc)
{
    set_state(lc, PROTO_LC_OFF);
}

/* ---- the rest ---- */

struct lifecycle *lifecycle_new(uv_loop_t *loop, const struct lifecycle_config *cfg,
                                struct sshd *sshd, struct agentlog *log,
                                struct ports_scanner *ports, void (*report)(void *ud, json_t *msg),
                                void *ud)
{
    struct lifecycle *lc = calloc(1, sizeof(*lc));
    if (!lc)
        return NULL;
    uv_timer_init(loop, &lc->later);
    lc->loop = loop;
    lc->cfg = cfg;
    lc->sshd = sshd;
    lc->log = log;
    lc->ports = ports;
    lc->report = report;
    lc->ud = ud;
    lc->changed_at = clock_unix_ms();
    gate_init(&lc->gate);
    lc->gate.first_session = on_first_session;
    lc->gate.ud = lc;
    return lc;
}

struct gate *lifecycle_gate(struct lifecycle *lc)
{
    return &lc->gate;
}

void lifecycle_connected(struct lifecycle *lc)
{
    json_t *msg = state_message(lc);
    if (msg)
        lc->report(lc->ud, msg);
    json_decref(msg);
}

enum proto_lifecycle lifecycle_state(const struct lifecycle *lc)
{
    return lc->state;
}

static void on_closed(uv_handle_t *h)
{
    free(h); /* the timer is the first member */
}

void lifecycle_free(struct lifecycle *lc)
{
    if (!lc)
        return;
    for (size_t i = 0; i < lc->nscripts; i++) {
        script_free(lc->scripts[i]->s);
        free(lc->scripts[i]);
    }
    gate_abandon(&lc->gate);
    sshd_set_extra_env(lc->sshd, NULL);
    devcontainer_free(lc->dc);
    json_decref(lc->manifest);
    uv_close((uv_handle_t *)&lc->later, on_closed);
}
