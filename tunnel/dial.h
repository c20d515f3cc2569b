/*
 * dial: the agent's end of the tunnel. Dials the relay's /api/v1/agent websocket with a
 * bearer token, runs a mux over it, keeps it alive, and reconnects with exponential backoff
 * and jitter when it drops. Stream events go to the owner's mux callbacks unchanged.
 */
#ifndef TETHER_DIAL_H
#define TETHER_DIAL_H

#include <stdint.h>

#include <uv.h>

#include "mux.h"
#include "url.h"
#include "wsctx.h"

#define DIAL_BACKOFF_MIN_MS 100u
#define DIAL_BACKOFF_MAX_MS 30000u
#define DIAL_STABLE_MS 10000u /* connected this long: the next drop starts backoff afresh */

struct dial_config {
    struct wsctx *ws;
    struct tether_url url;
    const char *token; /* borrowed; must outlive the dial */
    bool insecure;
    struct mux_config mux;
    uint32_t backoff_min_ms;
    uint32_t backoff_max_ms;
    uint32_t stable_ms;
};
void dial_config_default(struct dial_config *cfg);

struct dial_events {
    /* The tunnel is up (both HELLOs exchanged); streams may be opened on m. */
    void (*connected)(void *ud, struct mux *m);
    /* The tunnel is down; every stream was closed via stream_closed first. */
    void (*disconnected)(void *ud, const char *why);
};

struct dial;

/*
 * Creates the dialer; `streams` are the mux callbacks for stream and control events (its
 * want_write, hello and goaway entries are ignored: the dialer handles those). Both tables
 * and ud are borrowed and must outlive the dial.
 */
struct dial *dial_new(uv_loop_t *loop, const struct dial_config *cfg,
                      const struct mux_callbacks *streams, const struct dial_events *ev, void *ud);
/* Starts connecting now. */
void dial_start(struct dial *d);
/* Sends a control message if connected. Returns 0 or a negative MUX_E_* code. */
int dial_send_control(struct dial *d, const json_t *msg);
/* The current mux, or NULL while disconnected. */
struct mux *dial_mux(struct dial *d);
/*
 * Gives the pages of the output buffer back to the kernel while none of its bytes wait to
 * be sent: a big batch touches up to 1 MiB of it, which otherwise stays resident for the
 * life of the process. For an owner that sees the connection idle.
 */
void dial_trim(struct dial *d);
/*
 * Stops for good: closes the connection (GOAWAY SHUTDOWN), cancels timers, and calls done
 * once everything is released. The dial is freed before done is called.
 */
void dial_stop(struct dial *d, void (*done)(void *arg), void *arg);

#endif
