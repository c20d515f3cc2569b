/*
 * relay: the control-plane end of the tunnel, small and real.
 *
 * Serves, on the server vhost of a wsctx:
 *   GET  /api/v1/workspaces            JSON array of workspaces the user token may see
 *   GET  /api/v1/workspaces/NAME       one workspace
 *   GET  /api/v1/workspaces/NAME/logs[?after=N]  its agent's log lines, numbered
 *   GET  /metrics                      the Prometheus text format
 *   WS   /api/v1/agent                 agents dial in here (subprotocol tether.v1)
 *   WS   /api/v1/workspaces/NAME/tcp/PORT   a raw byte stream to 127.0.0.1:PORT in NAME
 *   GET  /w/NAME, /w/NAME/login, /web/FILE  the web terminal (PROTOCOL.md 14.8)
 * Agents and users authenticate with "Authorization: Bearer TOKEN" (tokens.h); the web
 * terminal's cookie stands in for a user token on its page and pty websocket.
 */
#ifndef TETHER_RELAY_H
#define TETHER_RELAY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "wsctx.h"

struct relay_config {
    const char *tokens_path;
    uint32_t keepalive_idle_ms; /* tunnel keepalive toward agents (mux defaults) */
    uint32_t keepalive_timeout_ms;
    /* Idle policy: once a workspace has been idle this long (its agent's stats say so), run
     * on_idle once with TETHER_WORKSPACE=NAME in its environment; again only after activity
     * ended the idle period. 0 / NULL: no policy. */
    uint64_t idle_timeout_ms;
    const char *on_idle;
    unsigned stats_interval_s; /* asked of agents in the manifest (0: no stats) */
    /* Manifest members for the agents, by workspace (manifestfile.h); NULL: none. */
    const char *manifest_path;
    size_t log_lines; /* log lines kept per workspace, 1..LOGRING_MAX_LINES (default 2000) */
};
void relay_config_default(struct relay_config *cfg);

struct relay;

enum relay_error {
    RELAY_E_FAIL = -1,   /* the tokens file, or out of memory */
    RELAY_E_CONFIG = -2, /* the --manifest file: a usage error */
};

/*
 * Loads the tokens and the manifest file; the loop need not be initialised yet. Returns 0
 * with the relay in *out, or a RELAY_E_* with a reason in err.
 */
int relay_open(struct relay **out, uv_loop_t *loop, const struct relay_config *cfg, char *err,
               size_t errlen);
/* relay_open for callers that need no reason class: NULL with a reason in err. */
struct relay *relay_new(uv_loop_t *loop, const struct relay_config *cfg, char *err, size_t errlen);
/* The protocol table for wsctx_server.protocols; pass the relay as wsctx_server.user. */
const struct lws_protocols *relay_protocols(void);
/* Starts the relay's timers once the context exists. */
void relay_start(struct relay *r);
/* Sends every agent GOAWAY and stops the timers; call before wsctx_stop. */
void relay_stop(struct relay *r);
/* Frees the relay; call after wsctx_finish (lws callbacks use it until then). */
void relay_free(struct relay *r);

#endif
