/*
 * wsc: one outgoing websocket (or plain HTTP GET) connection on the process's lws context,
 * with a bearer token, TLS verification, and events delivered to its owner.
 *
 * Ownership: wsc_connect allocates; the wsc frees itself after its `closed` event returns.
 * The owner must not touch it after that event. Every connection that wsc_connect returned
 * ends with exactly one `closed` event, whether it was established or not.
 */
#ifndef TETHER_WSC_H
#define TETHER_WSC_H

/* A request path: room for a /pty path whose 4096-byte command is percent-encoded. */
#define WSC_MAX_PATH 12800u

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>
#include <libwebsockets.h>

#include "url.h"

struct wsc;

struct wsc_events {
    /* The websocket is open (or an HTTP GET's response status line arrived). */
    void (*established)(void *ud, struct wsc *c);
    /* A piece of a received message (binary or text), or of the HTTP body. */
    void (*receive)(void *ud, struct wsc *c, const uint8_t *data, size_t len, bool binary,
                    bool final);
    /* The connection can take one wsc_write now. */
    void (*writable)(void *ud, struct wsc *c);
    /*
     * The connection is gone. status: the peer's websocket close code; for an HTTP GET its
     * response status; for a refused upgrade the HTTP status; 0 if there was none (connect
     * error, reset). reason is a one-line description, never NULL.
     */
    void (*closed)(void *ud, struct wsc *c, int status, const char *reason);
};

struct wsc_params {
    struct lws_context *context;
    struct lws_vhost *vhost; /* the client vhost of wsctx */
    uv_loop_t *loop;         /* the loop lws runs on */
    const struct tether_url *url;
    const char *path;        /* endpoint path, appended to the URL's prefix */
    const char *subprotocol; /* NULL for none */
    const char *token;       /* bearer token; copied, never logged */
    bool http_get;           /* plain HTTP GET instead of a websocket */
    bool insecure;           /* skip certificate checks (development only) */
};

/* Starts connecting. Returns NULL (and fills err) if it could not even start. */
struct wsc *wsc_connect(const struct wsc_params *p, const struct wsc_events *ev, void *ud,
                        char *err, size_t errlen);

/* Room every buffer given to wsc_write must have in front of the data: the frame header
 * goes there. */
#define WSC_PRE (LWS_PRE + 16)
/*
 * Sends one whole message (binary or text) from buf + WSC_PRE; the payload is masked in
 * place, so buf's contents are scrambled afterwards. Call only from `writable`.
 * Returns 0 or -1 (the connection is failing; `closed` follows).
 */
int wsc_write(struct wsc *c, uint8_t *buf, size_t len, bool binary);
/*
 * The same, without a copy of what the socket does not take at once: the unsent rest stays
 * in buf and goes out first, before the next `writable`. So buf must stay untouched until
 * then (or until `closed`). For a sender with one long-lived buffer, such as the tunnel.
 */
int wsc_write_keep(struct wsc *c, uint8_t *buf, size_t len, bool binary);
/*
 * Asks for a `writable` event: once this loop iteration's callbacks are done if the
 * connection is an open ws:// one whose socket has room (wsc_write_now), else when lws
 * sees POLLOUT.
 */
void wsc_want_write(struct wsc *c);
/*
 * True when wsc_write_keep may be called right now, outside `writable`: an open ws://
 * connection (framed by us) with nothing of its own waiting to go out first. A sender that
 * writes at once saves the trip through the poller that `writable` takes (latency).
 */
bool wsc_write_now(const struct wsc *c);
/* Whether a wsc_write_keep caller's buffer still holds bytes to send (it must stay). */
bool wsc_keeps_buffer(const struct wsc *c);
/* Stops or resumes reading from the peer (for connections that are not the tunnel). */
void wsc_pause_rx(struct wsc *c, bool pause);
/* Closes with a websocket close code and reason; `closed` follows, asynchronously. */
void wsc_close(struct wsc *c, int code, const char *reason);
/*
 * Drops the connection at once, without a close handshake (the peer is unresponsive):
 * `closed` is called before this returns, and c is gone afterwards. lws finishes tearing
 * the socket down in the background.
 */
void wsc_abort(struct wsc *c, const char *reason);
/* The peer is alive (a frame of ours arrived): resets lws's own idle timers. */
void wsc_confirm_alive(struct wsc *c, uint64_t now_ms);

/* The lws protocol entry for the client vhost (wsctx uses it). */
int wsc_lws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                     size_t len);
#define WSC_PROTOCOL                                                                               \
    {                                                                                              \
        "tether-client", wsc_lws_callback, 0, 65536, 0, NULL, 0                                    \
    }

#endif
