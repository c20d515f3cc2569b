#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "cli.h"
#include "commands.h"
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
    uv_close((uv_handle_t *)&run->rt.sigint, NULL);
    uv_close((uv_handle_t *)&run->rt.sigterm, NULL);
    agent_stop(run->agent, on_agent_stopped, run);
}

static void on_agent_signal(struct cli_runtime *rt, int signum)
{
    log_info("signal %d: shutting down", signum);
    shut_down(rt->ud);
}

static void on_relay_shutdown(void *arg)
{
    shut_down(arg);
}

int cmd_agent(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, NULL, 'u'},
        {"token-file", required_argument, NULL, 't'},
        {"ca-file", required_argument, NULL, 'C'},
        {"insecure", no_argument, NULL, 'I'},
        {"keepalive-idle", required_argument, NULL, 'i'},
        {"keepalive-timeout", required_argument, NULL, 'T'},
        {"log-level", required_argument, NULL, 'L'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct cli_client cc;
    memset(&cc, 0, sizeof(cc));
    struct dial_config dc;
    dial_config_default(&dc);
    uint64_t ms;
    int c;
    opterr = 0; /* our own one-line messages instead of getopt's */
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'u':
            cc.url_text = optarg;
            break;
        case 't':
            cc.token_file = optarg;
            break;
        case 'C':
            cc.ca_file = optarg;
            break;
        case 'I':
            cc.insecure = true;
            break;
        case 'i':
        case 'T':
            if (cli_duration_ms(optarg, &ms) < 0 || ms < 100 || ms > 3600000) {
                cli_error("bad duration '%s' (e.g. 500ms, 15s)", optarg);
                return EXIT_USAGE;
            }
            if (c == 'i')
                dc.mux.keepalive_idle_ms = (uint32_t)ms;
            else
                dc.mux.keepalive_timeout_ms = (uint32_t)ms;
            break;
        case 'L':
            if ((tether_log_level = log_level_parse(optarg)) < 0) {
                cli_error("bad log level '%s'", optarg);
                return EXIT_USAGE;
            }
            break;
        case 'h':
            fputs(agent_usage, stdout);
            return EXIT_OK;
        default:
            return cli_bad_option("agent", argv, c);
        }
    }
    if (optind != argc) {
        cli_error("unexpected argument '%s'", argv[optind]);
        return EXIT_USAGE;
    }
    if (dc.mux.keepalive_idle_ms >= dc.mux.keepalive_timeout_ms) {
        cli_error("--keepalive-idle must be shorter than --keepalive-timeout");
        return EXIT_USAGE;
    }
    int rc = cli_client_resolve(&cc);
    if (rc != EXIT_OK) {
        cli_client_free(&cc);
        return rc;
    }
    struct agent_run run;
    memset(&run, 0, sizeof(run));
    struct wsctx_config wc = {.ca_file = cc.ca_file};
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
    run.agent = agent_new(&run.rt.loop, &dc, on_relay_shutdown, &run);
    if (!run.agent) {
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
