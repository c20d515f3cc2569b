#include "relayapi.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tunnel/bytebuf.h"
#include "tunnel/wsc.h"

struct relayapi_get {
    struct cli_runtime rt;
    struct bytebuf body;
    bool too_big;
    json_t *doc;
    int exit_code;
};

static void get_established(void *ud, struct wsc *c)
{
    (void)ud;
    (void)c;
}

static void get_receive(void *ud, struct wsc *c, const uint8_t *data, size_t len, bool binary,
                        bool final)
{
    struct relayapi_get *g = ud;
    (void)c;
    (void)binary;
    (void) final;
    if (g->body.len + len > RELAYAPI_MAX_BODY || bytebuf_append(&g->body, data, len) < 0)
        g->too_big = true;
}

static void get_writable(void *ud, struct wsc *c)
{
    (void)ud;
    (void)c;
}

static void get_closed(void *ud, struct wsc *c, int status, const char *reason)
{
    struct relayapi_get *g = ud;
    (void)c;
    json_error_t jerr;
    json_t *doc = g->body.len
                      ? json_loadb((const char *)bytebuf_peek(&g->body), g->body.len, 0, &jerr)
                      : NULL;
    if (status == 200 && doc && !g->too_big) {
        g->doc = doc;
        doc = NULL;
        g->exit_code = EXIT_OK;
    } else if (status == 200) {
        cli_error("the relay's answer is not valid JSON%s", g->too_big ? " (too large)" : "");
    } else if (status > 0) {
        const char *msg = json_string_value(json_object_get(doc, "error"));
        cli_error("relay answered HTTP %d%s%s", status, msg ? ": " : "", msg ? msg : "");
    } else {
        cli_error("cannot reach the relay: %s", reason);
    }
    json_decref(doc);
    cli_runtime_stop(&g->rt);
}

static const struct wsc_events get_events = {
    .established = get_established,
    .receive = get_receive,
    .writable = get_writable,
    .closed = get_closed,
};

static void on_get_signal(struct cli_runtime *rt, int signum)
{
    (void)signum;
    cli_runtime_stop(rt);
}

int relayapi_get(const struct cli_client *cc, const char *path, json_t **doc)
{
    *doc = NULL;
    struct relayapi_get *g = calloc(1, sizeof(*g));
    if (!g) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    g->exit_code = EXIT_FAIL;
    struct wsctx_config wc = {
        .ca_file = cc->ca_file, .tls = cc->url.tls, .max_connections = WSCTX_FEW_CONNECTIONS};
    g->rt.on_signal = on_get_signal;
    g->rt.ud = g;
    if (cli_runtime_init(&g->rt, &wc) < 0) {
        free(g);
        return EXIT_FAIL;
    }
    struct wsc_params p = {
        .context = g->rt.ws.ctx,
        .vhost = g->rt.ws.client_vhost,
        .loop = &g->rt.loop,
        .url = &cc->url,
        .path = path,
        .token = cc->token,
        .http_get = true,
        .insecure = cc->insecure,
    };
    char err[256];
    if (!wsc_connect(&p, &get_events, g, err, sizeof(err))) {
        cli_error("cannot reach the relay: %s", err);
        cli_runtime_stop(&g->rt);
    }
    uv_run(&g->rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&g->rt);
    int rc = g->exit_code;
    *doc = g->doc;
    bytebuf_free(&g->body);
    free(g);
    return rc;
}
