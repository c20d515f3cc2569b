/* tether status: GET /api/v1/workspaces[/NAME] from the relay and print the JSON. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli.h"
#include "commands.h"
#include "tunnel/tokens.h"
#include "tunnel/bytebuf.h"
#include "tunnel/log.h"
#include "tunnel/wsc.h"

/* A relay's answer larger than this is cut off and reported as an error. */
#define STATUS_MAX_BODY (64u * 1024 * 1024)

static const char status_usage[] =
    "usage: tether status --url URL --token-file FILE [WORKSPACE]\n"
    "\n"
    "Prints the relay's JSON for every workspace the token may see, or for one.\n"
    "\n"
    "  --url URL           the relay (or set TETHER_URL)\n"
    "  --token-file FILE   a user token (or TETHER_TOKEN_FILE, or TETHER_TOKEN)\n"
    "  --ca-file FILE      trust these CAs for https:// instead of the system's\n"
    "  --insecure          do not check the relay's certificate (development only)\n"
    "  --log-level LEVEL   error, warn, info (default) or debug\n"
    "  -h, --help          this text\n";

struct status_run {
    struct cli_runtime rt;
    struct bytebuf body;
    bool too_big;
    int exit_code;
};

static void st_established(void *ud, struct wsc *c)
{
    (void)ud;
    (void)c;
}

static void st_receive(void *ud, struct wsc *c, const uint8_t *data, size_t len, bool binary,
                       bool final)
{
    struct status_run *s = ud;
    (void)c;
    (void)binary;
    (void) final;
    if (s->body.len + len > STATUS_MAX_BODY || bytebuf_append(&s->body, data, len) < 0)
        s->too_big = true;
}

static void st_writable(void *ud, struct wsc *c)
{
    (void)ud;
    (void)c;
}

static void st_closed(void *ud, struct wsc *c, int status, const char *reason)
{
    struct status_run *s = ud;
    (void)c;
    json_error_t jerr;
    json_t *doc = s->body.len
                      ? json_loadb((const char *)bytebuf_peek(&s->body), s->body.len, 0, &jerr)
                      : NULL;
    if (status == 200 && doc && !s->too_big) {
        json_dumpf(doc, stdout, JSON_INDENT(2));
        fputc('\n', stdout);
        s->exit_code = EXIT_OK;
    } else if (status == 200) {
        cli_error("the relay's answer is not valid JSON%s", s->too_big ? " (too large)" : "");
    } else if (status > 0) {
        const char *msg = json_string_value(json_object_get(doc, "error"));
        cli_error("relay answered HTTP %d%s%s", status, msg ? ": " : "", msg ? msg : "");
    } else {
        cli_error("cannot reach the relay: %s", reason);
    }
    json_decref(doc);
    cli_runtime_stop(&s->rt);
}

static const struct wsc_events status_events = {
    .established = st_established,
    .receive = st_receive,
    .writable = st_writable,
    .closed = st_closed,
};

static void on_status_signal(struct cli_runtime *rt, int signum)
{
    (void)signum;
    cli_runtime_stop(rt);
}

int cmd_status(int argc, char **argv)
{
    static const struct option opts[] = {CLI_OPTS_CLIENT, CLI_OPTS_END};
    struct cli_client cc;
    memset(&cc, 0, sizeof(cc));
    const struct cli_shared sh = {.command = "status", .usage = status_usage, .client = &cc};
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (argc - optind > 1) {
        cli_error("status takes at most one WORKSPACE");
        return EXIT_USAGE;
    }
    char path[128] = "/api/v1/workspaces";
    if (argc - optind == 1) {
        const char *name = argv[optind];
        if (!tokens_name_valid(name)) {
            cli_error("'%s' is not a workspace name", name);
            return EXIT_USAGE;
        }
        snprintf(path, sizeof(path), "/api/v1/workspaces/%s", name);
    }
    int rc = cli_client_resolve(&cc);
    if (rc != EXIT_OK) {
        cli_client_free(&cc);
        return rc;
    }
    struct status_run *s = calloc(1, sizeof(*s));
    if (!s) {
        cli_client_free(&cc);
        return EXIT_FAIL;
    }
    s->exit_code = EXIT_FAIL;
    struct wsctx_config wc = {.ca_file = cc.ca_file};
    s->rt.on_signal = on_status_signal;
    s->rt.ud = s;
    if (cli_runtime_init(&s->rt, &wc) < 0) {
        free(s);
        cli_client_free(&cc);
        return EXIT_FAIL;
    }
    struct wsc_params p = {
        .context = s->rt.ws.ctx,
        .vhost = s->rt.ws.client_vhost,
        .url = &cc.url,
        .path = path,
        .token = cc.token,
        .http_get = true,
        .insecure = cc.insecure,
    };
    char err[256];
    if (!wsc_connect(&p, &status_events, s, err, sizeof(err))) {
        cli_error("cannot reach the relay: %s", err);
        cli_runtime_stop(&s->rt);
    }
    uv_run(&s->rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&s->rt);
    rc = s->exit_code;
    bytebuf_free(&s->body);
    free(s);
    cli_client_free(&cc);
    return rc;
}
