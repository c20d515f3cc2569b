#include "cli.h"

#include <getopt.h>
#include <pwd.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tunnel/log.h"
#include "tunnel/tokens.h"

void cli_error(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "tether: %s\n", line);
}

int cli_getopt(int argc, char **argv, const struct option *opts)
{
    opterr = 0;
    return getopt_long(argc, argv, ":h", opts, NULL);
}

/* Durations of keepalive settings: at least 100 ms, at most an hour. */
static int keepalive_value(const char *arg, uint32_t *out)
{
    uint64_t ms;
    if (cli_duration_ms(arg, &ms) < 0 || ms < 100 || ms > 3600000) {
        cli_error("bad duration '%s' (e.g. 500ms, 15s; from 100ms to 1h)", arg);
        return EXIT_USAGE;
    }
    *out = (uint32_t)ms;
    return CLI_NEXT;
}

int cli_shared_option(const struct cli_shared *sh, int c, char **argv)
{
    struct cli_client *cc = sh->client;
    switch (c) {
    case 'u':
    case 't':
    case 'C':
    case 'I':
        if (!cc)
            break;
        if (c == 'u')
            cc->url_text = optarg;
        else if (c == 't')
            cc->token_file = optarg;
        else if (c == 'C')
            cc->ca_file = optarg;
        else
            cc->insecure = true;
        return CLI_NEXT;
    case 'i':
        if (sh->keepalive_idle_ms)
            return keepalive_value(optarg, sh->keepalive_idle_ms);
        break;
    case 'T':
        if (sh->keepalive_timeout_ms)
            return keepalive_value(optarg, sh->keepalive_timeout_ms);
        break;
    case 'L':
        if ((tether_log_level = log_level_parse(optarg)) < 0) {
            cli_error("bad log level '%s' (error, warn, info or debug)", optarg);
            return EXIT_USAGE;
        }
        return CLI_NEXT;
    case 'h':
        fputs(sh->usage, stdout);
        return EXIT_OK;
    case ':':
        cli_error("option '%s' needs a value (see 'tether %s --help')", argv[optind - 1],
                  sh->command);
        return EXIT_USAGE;
    default:
        break;
    }
    cli_error("unknown option '%s' (see 'tether %s --help')", argv[optind - 1], sh->command);
    return EXIT_USAGE;
}

int cli_duration_ms(const char *text, uint64_t *ms)
{
    char *end;
    double v = strtod(text, &end);
    if (end == text || v < 0 || v > 1e9)
        return -1;
    double scale;
    if (strcmp(end, "ms") == 0)
        scale = 1;
    else if (strcmp(end, "s") == 0 || *end == '\0')
        scale = 1000;
    else if (strcmp(end, "m") == 0)
        scale = 60000;
    else if (strcmp(end, "h") == 0)
        scale = 3600000;
    else
        return -1;
    *ms = (uint64_t)(v * scale);
    return 0;
}

int cli_hostport(const char *text, char *host, size_t hostlen, int *port)
{
    const char *colon;
    const char *h = text;
    size_t hl;
    if (*text == '[') {
        const char *rb = strchr(text, ']');
        if (!rb || rb[1] != ':')
            return -1;
        h = text + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(text, ':');
        if (!colon)
            return -1;
        hl = (size_t)(colon - text);
    }
    if (hl == 0 || hl >= hostlen)
        return -1;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || p < 0 || p > 65535)
        return -1;
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (int)p;
    return 0;
}

const char *cli_env(const char *name)
{
    const char *v = getenv(name);
    return v && v[0] ? v : NULL;
}

int cli_client_resolve(struct cli_client *c)
{
    char err[512];
    if (!c->url_text)
        c->url_text = cli_env("TETHER_URL");
    if (!c->url_text) {
        cli_error("no relay URL: give --url URL or set TETHER_URL");
        return EXIT_USAGE;
    }
    if (url_parse(c->url_text, &c->url, err, sizeof(err)) < 0) {
        cli_error("%s", err);
        return EXIT_USAGE;
    }
    if (!c->token_file)
        c->token_file = cli_env("TETHER_TOKEN_FILE");
    /* Taken (or not) now, and gone from the environment either way: no child inherits it.
     * unsetenv only drops the pointer: the bytes stay in the initial environment, which
     * /proc/PID/environ (ps e) shows, so they are overwritten first. */
    char *env_value = getenv("TETHER_TOKEN");
    char *env_token = env_value && env_value[0] ? strdup(env_value) : NULL;
    if (env_value)
        memset(env_value, 0, strlen(env_value));
    unsetenv("TETHER_TOKEN");
    if (c->token_file) {
        c->token = tokens_read_secret(c->token_file, CLI_MAX_TOKEN, err, sizeof(err));
    } else if (env_token) {
        c->token = env_token;
        env_token = NULL;
    }
    if (env_token) { /* a token file won */
        memset(env_token, 0, strlen(env_token));
        free(env_token);
    }
    if (!c->token && c->token_file) {
        cli_error("%s", err);
        return EXIT_FAIL;
    }
    if (!c->token) {
        cli_error("no token: give --token-file FILE, or set TETHER_TOKEN_FILE or TETHER_TOKEN");
        return EXIT_USAGE;
    }
    if (!c->token[0] || strlen(c->token) > CLI_MAX_TOKEN || strpbrk(c->token, " \t\r\n")) {
        cli_error("the token in %s is empty or malformed",
                  c->token_file ? c->token_file : "TETHER_TOKEN");
        return EXIT_FAIL;
    }
    if (c->insecure)
        fprintf(stderr, "tether: WARNING: --insecure: the relay's TLS certificate is not "
                        "checked; use this only for development\n");
    return EXIT_OK;
}

void cli_client_free(struct cli_client *c)
{
    if (c->token) {
        memset(c->token, 0, strlen(c->token));
        free(c->token);
        c->token = NULL;
    }
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct cli_runtime *rt = s->data;
    if (rt->on_signal)
        rt->on_signal(rt, signum);
}

int cli_runtime_init(struct cli_runtime *rt, const struct wsctx_config *cfg_in)
{
    char err[512];
    uv_loop_init(&rt->loop);
    struct wsctx_config cfg = *cfg_in;
    cfg.loop = &rt->loop;
    if (wsctx_create(&rt->ws, &cfg, err, sizeof(err)) < 0) {
        cli_error("%s", err);
        /* Teardown in PITFALLS.md's order: destroy, let the loop run, destroy again. */
        if (rt->ws.ctx) {
            wsctx_stop(&rt->ws);
            uv_run(&rt->loop, UV_RUN_DEFAULT);
        }
        wsctx_finish(&rt->ws, &rt->loop);
        return -1;
    }
    uv_signal_init(&rt->loop, &rt->sigint);
    uv_signal_init(&rt->loop, &rt->sigterm);
    rt->sigint.data = rt->sigterm.data = rt;
    uv_signal_start(&rt->sigint, on_signal, SIGINT);
    uv_signal_start(&rt->sigterm, on_signal, SIGTERM);
    return 0;
}

void cli_runtime_stop(struct cli_runtime *rt)
{
    if (!uv_is_closing((uv_handle_t *)&rt->sigint)) {
        uv_close((uv_handle_t *)&rt->sigint, NULL);
        uv_close((uv_handle_t *)&rt->sigterm, NULL);
    }
    wsctx_stop(&rt->ws);
}

static void close_leftover(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

void cli_runtime_finish(struct cli_runtime *rt)
{
    int rc = wsctx_finish(&rt->ws, &rt->loop);
    if (rc != 0) {
        /* Something still holds a handle: run once more and retry rather than leak. */
        uv_run(&rt->loop, UV_RUN_DEFAULT);
        rc = uv_loop_close(&rt->loop);
    }
    if (rc != 0) {
        /* A handle nobody will ever close: libwebsockets 4.1 abandons a connection's poll
         * handle when a connect attempt fails after its socket was registered (see
         * tests/valgrind/tether.supp). Close what is left, as lws's own libuv teardown
         * does, so that the loop's memory is freed. */
        uv_walk(&rt->loop, close_leftover, NULL);
        uv_run(&rt->loop, UV_RUN_DEFAULT);
        uv_loop_close(&rt->loop);
    }
}

int cli_default_state_dir(char *buf, size_t len)
{
    const char *xdg = getenv("XDG_STATE_HOME");
    if (xdg && xdg[0] == '/')
        return snprintf(buf, len, "%s/tether", xdg) < (int)len ? 0 : -1;
    const char *home = getenv("HOME");
    if (!home || home[0] != '/') {
        struct passwd *pw = getpwuid(getuid());
        home = pw ? pw->pw_dir : NULL;
    }
    if (!home || home[0] != '/')
        return -1;
    return snprintf(buf, len, "%s/.local/state/tether", home) < (int)len ? 0 : -1;
}
