#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "cli.h"
#include "commands.h"
#include "fwdpolicy.h"
#include "tunnel/log.h"

static const char agent_usage[] =
    "usage: tether agent --url URL [OPTIONS]\n"
    "\n"
    "Runs the workspace agent: dials the relay at URL (ws:// or wss://) and serves the\n"
    "streams it opens. Reconnects by itself, with backoff from 100ms to 30s.\n"
    "\n"
    "  --url URL                  the relay (or set TETHER_URL)\n"
    "  --token-file FILE          the agent token (or TETHER_TOKEN_FILE, or TETHER_TOKEN);\n"
    "                             the file must not be readable by group or others\n"
    "  --ca-file FILE             trust these CAs for wss:// instead of the system's\n"
    "  --insecure                 do not check the relay's certificate (development only)\n"
    "  --state-dir DIR            where the SSH host key is kept (default\n"
    "                             $XDG_STATE_HOME/tether, else ~/.local/state/tether)\n"
    "  --sftp-server PATH         run this SFTP server for the sftp subsystem instead of\n"
    "                             the built-in one\n"
    "  --ssh-listen ADDR:PORT     also serve SSH on this local address; clients must\n"
    "                             authenticate with a key from --authorized-keys or the\n"
    "                             manifest (never a password); off by default\n"
    "  --authorized-keys FILE     public keys (OpenSSH format) for --ssh-listen\n"
    "  --ssh-login-grace DURATION close an SSH connection not authenticated after this\n"
    "                             long (default 30s; 1s..10m); at most 64 local ones\n"
    "                             may be unauthenticated at once\n"
    "  --pty-ttl DURATION         end a reconnecting PTY nobody is attached to after this\n"
    "                             long (default 5m)\n"
    "  --pty-replay BYTES         output kept per PTY for reattaching clients (default\n"
    "                             262144; 1024..67108864)\n"
    "  --max-ptys N               reconnecting PTYs at once (default 32)\n"
    "  --directory DIR            the workspace directory: sessions and scripts start there\n"
    "                             (unless the manifest names one) and devcontainer.json is\n"
    "                             read from DIR/.devcontainer/ (default: the home directory)\n"
    "  --startup-script CMD       run CMD (with /bin/sh -c) when the workspace starts; the\n"
    "                             lifecycle is ready when it and the manifest's start scripts\n"
    "                             exit 0, start_error if one fails\n"
    "  --startup-timeout DURATION kill a start script after this long: start_timeout\n"
    "                             (default 5m)\n"
    "  --startup-blocks-login     new SSH sessions and terminals wait for --startup-script\n"
    "  --shutdown-script CMD      run CMD on SIGTERM or the relay's shutdown, before the\n"
    "                             sessions are hung up\n"
    "  --shutdown-timeout DURATION  kill it after this long (default 1m)\n"
    "  --ports-interval DURATION  how often listening ports are read from /proc while the\n"
    "                             workspace is in use (default 2s; 100ms..1h); once idle,\n"
    "                             only with the stats (every 30s by default)\n"
    "  --ports-idle-after DURATION  idle: this long after the last stream closed or start\n"
    "                             script ended (default 1m; 1s..24h)\n"
    "  --ssh-accept-env LIST      environment names SSH clients may set, comma-separated,\n"
    "                             '*' wildcards allowed (default LANG,LC_*,TERM,\n"
    "                             TETHER_SESSION_TYPE)\n"
    "  --forward-allow CIDR:PORTS forwards (relay tcp streams, ssh -L and -D) may also\n"
    "                             reach these addresses and ports, e.g. 10.0.0.0/8:5432,\n"
    "                             [fd00::]/8:80,443,8000-9000; repeatable (up to 64);\n"
    "                             loopback is always allowed, nothing else by default\n"
    "  --keepalive-idle DURATION  ping the relay after this much silence (default 15s)\n"
    "  --keepalive-timeout DURATION  reconnect after this much silence (default 45s)\n"
    "  --log-level LEVEL          error, warn, info (default) or debug\n"
    "  -h, --help                 this text\n";

struct agent_run {
    struct cli_runtime rt;
    struct agent *agent;
    bool stopping;
};

static void on_agent_stopped(void *arg)
{
    struct agent_run *run = arg;
    cli_runtime_stop(&run->rt);
}

static void shut_down(struct agent_run *run)
{
    if (run->stopping)
        return;
    run->stopping = true;
    /* The signal handles stay open until the end (cli_runtime_stop): closed, a second
     * SIGTERM would kill the agent in the middle of its shutdown scripts. */
    agent_stop(run->agent, on_agent_stopped, run);
}

static void on_agent_signal(struct cli_runtime *rt, int signum)
{
    struct agent_run *run = rt->ud;
    if (run->stopping) {
        log_info("signal %d: already shutting down", signum);
        return;
    }
    log_info("signal %d: shutting down", signum);
    shut_down(run);
}

static void on_relay_shutdown(void *arg)
{
    shut_down(arg);
}

/* --startup-*, --shutdown-*, --ports-*; returns 0, -1 (said why), or 1 (not ours). */
static int lifecycle_option(int c, const char *arg, struct lifecycle_config *lc,
                            struct agent_options *ao)
{
    uint64_t ms;
    switch (c) {
    case 'a':
        lc->startup_script = arg;
        return 0;
    case 'z':
        lc->shutdown_script = arg;
        return 0;
    case 'B':
        lc->startup_blocks_login = true;
        return 0;
    case 'A':
    case 'Z':
        if (cli_duration_ms(arg, &ms) < 0 || ms < 1000 || ms > 24 * 3600 * 1000ull) {
            cli_error("bad --%s-timeout '%s' (e.g. 90s, 10m; from 1s to 24h)",
                      c == 'A' ? "startup" : "shutdown", arg);
            return -1;
        }
        *(c == 'A' ? &lc->startup_timeout_ms : &lc->shutdown_timeout_ms) = ms;
        return 0;
    case 'p':
        if (cli_duration_ms(arg, &ms) < 0 || ms < 100 || ms > 3600 * 1000ull) {
            cli_error("bad --ports-interval '%s' (e.g. 500ms, 2s; from 100ms to 1h)", arg);
            return -1;
        }
        ao->ports_interval_ms = ms;
        return 0;
    case 'q':
        if (cli_duration_ms(arg, &ms) < 0 || ms < 1000 || ms > 24 * 3600 * 1000ull) {
            cli_error("bad --ports-idle-after '%s' (e.g. 30s, 5m; from 1s to 24h)", arg);
            return -1;
        }
        ao->ports_idle_after_ms = ms;
        return 0;
    }
    return 1;
}

#define AGENT_MAX_ACCEPT_ENV 32

struct env_allow {
    char text[1024];
    char *names[AGENT_MAX_ACCEPT_ENV + 1];
};

/* "LANG,LC_*,FOO" into a NULL-terminated list; names are [A-Za-z0-9_*]+. */
static int parse_env_allow(const char *arg, struct env_allow *out)
{
    if (snprintf(out->text, sizeof(out->text), "%s", arg) >= (int)sizeof(out->text))
        return -1;
    int n = 0;
    for (char *save = NULL, *tok = strtok_r(out->text, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (n >= AGENT_MAX_ACCEPT_ENV || tok[strspn(tok, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                         "abcdefghijklmnopqrstuvwxyz"
                                                         "0123456789_*")] != '\0')
            return -1;
        out->names[n++] = tok;
    }
    out->names[n] = NULL;
    return 0;
}

/* --pty-ttl, --pty-replay, --max-ptys. */
static int pty_option(int c, const char *arg, struct rpty_config *cfg)
{
    char *end;
    if (c == 'P') {
        if (cli_duration_ms(arg, &cfg->ttl_ms) < 0 || cfg->ttl_ms < 1000 ||
            cfg->ttl_ms > 7 * 24 * 3600 * 1000ull) {
            cli_error("bad --pty-ttl '%s' (e.g. 30s, 5m, 2h; from 1s to 7 days)", arg);
            return -1;
        }
        return 0;
    }
    unsigned long long v = strtoull(arg, &end, 10);
    if (c == 'R') {
        if (end == arg || *end || v < RING_MIN_CAP || v > RING_MAX_CAP) {
            cli_error("bad --pty-replay '%s' (bytes, %u..%u)", arg, RING_MIN_CAP, RING_MAX_CAP);
            return -1;
        }
        cfg->ring_size = (size_t)v;
        return 0;
    }
    if (end == arg || *end || v < 1 || v > 4096) {
        cli_error("bad --max-ptys '%s' (1..4096)", arg);
        return -1;
    }
    cfg->max_sessions = (unsigned)v;
    return 0;
}

int cmd_agent(int argc, char **argv)
{
    static const struct option opts[] = {{"state-dir", required_argument, NULL, 'S'},
                                         {"sftp-server", required_argument, NULL, 'F'},
                                         {"ssh-listen", required_argument, NULL, 'l'},
                                         {"authorized-keys", required_argument, NULL, 'K'},
                                         {"ssh-login-grace", required_argument, NULL, 'g'},
                                         {"ssh-accept-env", required_argument, NULL, 'E'},
                                         {"pty-ttl", required_argument, NULL, 'P'},
                                         {"pty-replay", required_argument, NULL, 'R'},
                                         {"max-ptys", required_argument, NULL, 'M'},
                                         {"directory", required_argument, NULL, 'd'},
                                         {"startup-script", required_argument, NULL, 'a'},
                                         {"startup-timeout", required_argument, NULL, 'A'},
                                         {"startup-blocks-login", no_argument, NULL, 'B'},
                                         {"shutdown-script", required_argument, NULL, 'z'},
                                         {"shutdown-timeout", required_argument, NULL, 'Z'},
                                         {"ports-interval", required_argument, NULL, 'p'},
                                         {"ports-idle-after", required_argument, NULL, 'q'},
                                         {"forward-allow", required_argument, NULL, 'W'},
                                         CLI_OPTS_CLIENT,
                                         CLI_OPTS_KEEPALIVE,
                                         CLI_OPTS_END};
    struct fwdpolicy fwd_policy;
    fwdpolicy_init(&fwd_policy);
    struct sshd_config sc = {.forward_policy = &fwd_policy};
    struct env_allow env_allow;
    struct rpty_config pty_cfg;
    rpty_config_default(&pty_cfg);
    struct lifecycle_config lc_cfg;
    lifecycle_config_default(&lc_cfg);
    struct agent_options ao = {
        .pty = &pty_cfg, .lifecycle = &lc_cfg, .forward_policy = &fwd_policy};
    char state_dir[4096], listen_host[256];
    struct cli_client cc;
    memset(&cc, 0, sizeof(cc));
    struct dial_config dc;
    dial_config_default(&dc);
    const struct cli_shared sh = {
        .command = "agent",
        .usage = agent_usage,
        .client = &cc,
        .keepalive_idle_ms = &dc.mux.keepalive_idle_ms,
        .keepalive_timeout_ms = &dc.mux.keepalive_timeout_ms,
    };
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        if (c == 'S') {
            sc.state_dir = optarg;
            continue;
        }
        if (c == 'd') {
            if (optarg[0] != '/') {
                cli_error("--directory needs an absolute path");
                return EXIT_USAGE;
            }
            sc.workdir = optarg;
            continue;
        }
        int lrc = lifecycle_option(c, optarg, &lc_cfg, &ao);
        if (lrc <= 0) {
            if (lrc < 0)
                return EXIT_USAGE;
            continue;
        }
        if (c == 'l') {
            if (cli_hostport(optarg, listen_host, sizeof(listen_host), &sc.listen_port) < 0 ||
                sc.listen_port < 0) {
                cli_error("bad --ssh-listen '%s': expected ADDR:PORT", optarg);
                return EXIT_USAGE;
            }
            sc.listen_host = listen_host;
            continue;
        }
        if (c == 'P' || c == 'R' || c == 'M') {
            if (pty_option(c, optarg, &pty_cfg) < 0)
                return EXIT_USAGE;
            continue;
        }
        if (c == 'E') {
            if (parse_env_allow(optarg, &env_allow) < 0) {
                cli_error("bad --ssh-accept-env '%s': at most %d names of letters, digits, '_' "
                          "and '*'",
                          optarg, AGENT_MAX_ACCEPT_ENV);
                return EXIT_USAGE;
            }
            sc.env_allow = (const char *const *)env_allow.names;
            continue;
        }
        if (c == 'W') {
            char why[256];
            if (fwdpolicy_add(&fwd_policy, optarg, why, sizeof(why)) < 0) {
                cli_error("bad --forward-allow '%s': %s", optarg, why);
                return EXIT_USAGE;
            }
            continue;
        }
        if (c == 'K') {
            sc.authorized_keys = optarg;
            continue;
        }
        if (c == 'g') {
            if (cli_duration_ms(optarg, &sc.login_grace_ms) < 0 || sc.login_grace_ms < 1000 ||
                sc.login_grace_ms > 600000) {
                cli_error("bad --ssh-login-grace '%s' (e.g. 30s, 2m; from 1s to 10m)", optarg);
                return EXIT_USAGE;
            }
            continue;
        }
        if (c == 'F') {
            if (optarg[0] != '/') {
                cli_error("--sftp-server needs an absolute path");
                return EXIT_USAGE;
            }
            sc.sftp_server = optarg;
            continue;
        }
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (optind != argc) {
        cli_error("unexpected argument '%s'", argv[optind]);
        return EXIT_USAGE;
    }
    if (dc.mux.keepalive_idle_ms >= dc.mux.keepalive_timeout_ms) {
        cli_error("--keepalive-idle must be shorter than --keepalive-timeout");
        return EXIT_USAGE;
    }
    if (!sc.state_dir) {
        if (cli_default_state_dir(state_dir, sizeof(state_dir)) < 0) {
            cli_error("no home directory for the state directory: give --state-dir");
            return EXIT_USAGE;
        }
        sc.state_dir = state_dir;
    }
    int rc = cli_client_resolve(&cc);
    if (rc != EXIT_OK) {
        cli_client_free(&cc);
        return rc;
    }
    struct agent_run run;
    memset(&run, 0, sizeof(run));
    struct wsctx_config wc = {
        .ca_file = cc.ca_file, .tls = cc.url.tls, .max_connections = WSCTX_FEW_CONNECTIONS};
    run.rt.on_signal = on_agent_signal;
    run.rt.ud = &run;
    if (cli_runtime_init(&run.rt, &wc) < 0) {
        cli_client_free(&cc);
        return EXIT_FAIL;
    }
    dc.ws = &run.rt.ws;
    dc.url = cc.url;
    dc.token = cc.token;
    dc.insecure = cc.insecure;
    char err[512];
    struct sshd *sshd = sshd_new(&run.rt.loop, &sc, err, sizeof(err));
    if (!sshd) {
        cli_error("%s", err);
        cli_runtime_stop(&run.rt);
        uv_run(&run.rt.loop, UV_RUN_DEFAULT);
        cli_runtime_finish(&run.rt);
        cli_client_free(&cc);
        return EXIT_FAIL;
    }
    /* Background processes of sessions and scripts come back to the agent when their
     * parents end, so the shutdown can hang them up too (the agent never uses uv_spawn). */
    int arc = proc_reaper_adopt_orphans(sshd_reaper(sshd));
    if (arc < 0)
        log_warn("cannot adopt orphaned processes (%s): what scripts leave running in the "
                 "background outlives the agent",
                 strerror(-arc));
    run.agent = agent_new(&run.rt.loop, &dc, sshd, &ao, on_relay_shutdown, &run);
    if (!run.agent) {
        sshd_free(sshd, NULL, NULL);
        cli_error("out of memory");
        cli_runtime_stop(&run.rt);
        cli_runtime_finish(&run.rt);
        cli_client_free(&cc);
        return EXIT_FAIL;
    }
    agent_start(run.agent);
    uv_run(&run.rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&run.rt);
    cli_client_free(&cc);
    return EXIT_OK;
}
