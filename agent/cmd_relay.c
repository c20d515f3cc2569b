#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "commands.h"
#include "tunnel/log.h"
#include "tunnel/logring.h"
#include "tunnel/relay.h"

static const char relay_usage[] =
    "usage: tether relay --listen ADDR:PORT --tokens FILE [OPTIONS]\n"
    "\n"
    "Runs the relay: agents dial in at /api/v1/agent; users reach workspaces through\n"
    "/api/v1/workspaces/NAME/tcp/PORT and read /api/v1/workspaces.\n"
    "\n"
    "  --listen ADDR:PORT         address to listen on (numeric; port 0 picks one)\n"
    "  --tokens FILE              JSON {\"agents\": {TOKEN: WORKSPACE}, \"users\": {TOKEN: "
    "[WORKSPACE|\"*\"]}};\n"
    "                             must not be readable by group or others\n"
    "  --tls-cert FILE            serve wss:// and https:// with this PEM certificate chain\n"
    "  --tls-key FILE             ... and this PEM private key\n"
    "  --idle-timeout DURATION    a workspace with no activity this long is idle (e.g. 30m)\n"
    "  --on-idle COMMAND          run COMMAND (with sh -c, TETHER_WORKSPACE=NAME in its\n"
    "                             environment) once each time a workspace becomes idle\n"
    "  --stats-interval SECONDS   how often agents report activity (default 30; 0 = never)\n"
    "  --manifest FILE            JSON {WORKSPACE|\"*\": {MEMBER: VALUE}}: what agents get in\n"
    "                             their manifest (owner, directory, motd, env,\n"
    "                             authorized_keys, scripts, metadata); a workspace's own\n"
    "                             entry wins over \"*\" member by member\n"
    "  --log-lines N              log lines kept per workspace (default 2000, 1..1000000)\n"
    "  --keepalive-idle DURATION  ping an agent after this much silence (default 15s)\n"
    "  --keepalive-timeout DURATION  drop an agent after this much silence (default 45s)\n"
    "  --log-level LEVEL          error, warn, info (default) or debug\n"
    "  -h, --help                 this text\n";

struct relay_run {
    struct cli_runtime rt;
    struct relay *relay;
    uv_timer_t grace;
};

static void on_grace(uv_timer_t *t)
{
    struct relay_run *run = t->data;
    uv_close((uv_handle_t *)t, NULL);
    cli_runtime_stop(&run->rt);
}

static void on_relay_signal(struct cli_runtime *rt, int signum)
{
    struct relay_run *run = rt->ud;
    log_info("signal %d: shutting down", signum);
    relay_stop(run->relay);
    /* Give GOAWAY frames a moment to leave before the sockets close. */
    uv_timer_init(&rt->loop, &run->grace);
    run->grace.data = run;
    uv_timer_start(&run->grace, on_grace, 200, 0);
    uv_close((uv_handle_t *)&rt->sigint, NULL);
    uv_close((uv_handle_t *)&rt->sigterm, NULL);
}

int cmd_relay(int argc, char **argv)
{
    static const struct option opts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"tokens", required_argument, NULL, 'k'},
        {"tls-cert", required_argument, NULL, 'c'},
        {"tls-key", required_argument, NULL, 'K'},
        {"idle-timeout", required_argument, NULL, 'd'},
        {"on-idle", required_argument, NULL, 'o'},
        {"stats-interval", required_argument, NULL, 's'},
        {"manifest", required_argument, NULL, 'm'},
        {"log-lines", required_argument, NULL, 'n'},
        CLI_OPTS_KEEPALIVE,
        CLI_OPTS_END,
    };
    const char *listen = NULL, *cert = NULL, *key = NULL;
    struct relay_config cfg;
    relay_config_default(&cfg);
    const struct cli_shared sh = {
        .command = "relay",
        .usage = relay_usage,
        .keepalive_idle_ms = &cfg.keepalive_idle_ms,
        .keepalive_timeout_ms = &cfg.keepalive_timeout_ms,
    };
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        switch (c) {
        case 'l':
            listen = optarg;
            continue;
        case 'k':
            cfg.tokens_path = optarg;
            continue;
        case 'c':
            cert = optarg;
            continue;
        case 'K':
            key = optarg;
            continue;
        case 'd':
            if (cli_duration_ms(optarg, &cfg.idle_timeout_ms) < 0 || cfg.idle_timeout_ms < 1000) {
                cli_error("bad --idle-timeout '%s' (e.g. 90s, 30m; at least 1s)", optarg);
                return EXIT_USAGE;
            }
            continue;
        case 'o':
            cfg.on_idle = optarg;
            continue;
        case 's': {
            char *end;
            unsigned long v = strtoul(optarg, &end, 10);
            if (end == optarg || *end || v > 86400) {
                cli_error("bad --stats-interval '%s' (seconds, 0..86400)", optarg);
                return EXIT_USAGE;
            }
            cfg.stats_interval_s = (unsigned)v;
            continue;
        }
        case 'm':
            cfg.manifest_path = optarg;
            continue;
        case 'n': {
            char *end;
            unsigned long v = strtoul(optarg, &end, 10);
            if (end == optarg || *end || optarg[0] == '-' || v < 1 || v > LOGRING_MAX_LINES) {
                cli_error("bad --log-lines '%s' (lines, 1..%u)", optarg, LOGRING_MAX_LINES);
                return EXIT_USAGE;
            }
            cfg.log_lines = (size_t)v;
            continue;
        }
        }
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (optind != argc || !listen || !cfg.tokens_path) {
        if (optind != argc)
            cli_error("unexpected argument '%s'", argv[optind]);
        else
            cli_error("relay needs --listen ADDR:PORT and --tokens FILE");
        return EXIT_USAGE;
    }
    if (!cert != !key) {
        cli_error("--tls-cert and --tls-key go together");
        return EXIT_USAGE;
    }
    if (!cfg.idle_timeout_ms != !cfg.on_idle) {
        cli_error("--idle-timeout and --on-idle go together");
        return EXIT_USAGE;
    }
    char host[256];
    int port;
    if (cli_hostport(listen, host, sizeof(host), &port) < 0) {
        cli_error("bad --listen '%s': expected ADDR:PORT", listen);
        return EXIT_USAGE;
    }
    if (cfg.keepalive_idle_ms >= cfg.keepalive_timeout_ms) {
        cli_error("--keepalive-idle must be shorter than --keepalive-timeout");
        return EXIT_USAGE;
    }

    struct relay_run run;
    memset(&run, 0, sizeof(run));
    char err[512];
    int rc = relay_open(&run.relay, &run.rt.loop, &cfg, err, sizeof(err));
    if (rc < 0) {
        cli_error("%s", err);
        return rc == RELAY_E_CONFIG ? EXIT_USAGE : EXIT_FAIL;
    }
    struct wsctx_server srv = {
        .protocols = relay_protocols(),
        .listen_host = host,
        .listen_port = port,
        .tls_cert = cert,
        .tls_key = key,
        .user = run.relay,
    };
    struct wsctx_config wc = {.server = &srv};
    run.rt.on_signal = on_relay_signal;
    run.rt.ud = &run;
    if (cli_runtime_init(&run.rt, &wc) < 0) {
        relay_free(run.relay);
        return EXIT_FAIL;
    }
    relay_start(run.relay);
    log_info("relay listening on %s://%s%s%s:%d", cert ? "wss" : "ws", strchr(host, ':') ? "[" : "",
             host, strchr(host, ':') ? "]" : "", wsctx_listen_port(&run.rt.ws));
    uv_run(&run.rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&run.rt);
    relay_free(run.relay);
    return EXIT_OK;
}
