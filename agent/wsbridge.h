/*
 * wsbridge: joins a local byte stream to one of the relay's websocket byte pipes
 * (/api/v1/workspaces/NAME/tcp/PORT or /ssh, PROTOCOL.md §14.5 and §14.6).
 *
 * The local side is a readable uv stream (bytes to the relay) and a writable uv stream
 * (bytes from the relay); they are the same handle for a TCP connection (tether forward)
 * and two pipes for stdin and stdout (tether ssh-proxy). The bridge keeps memory bounded
 * both ways: it stops reading the local stream while too many bytes wait for the
 * websocket, and pauses the websocket while too many bytes wait for the local stream.
 *
 * Ends of stream map both ways: end of file on the readable stream becomes an empty
 * binary message (the websocket's half close); the relay's empty message becomes a
 * shutdown of the writable stream (and, when it is a handle of its own, its close), after
 * every byte before it was written. An abnormal end (a failed stream, a websocket closed
 * with anything but 1000) closes the local side at once, with a TCP reset where the local
 * side is TCP, so that a cut transfer never looks complete.
 */
#ifndef TETHER_WSBRIDGE_H
#define TETHER_WSBRIDGE_H

#include <stdbool.h>
#include <stddef.h>

#include <uv.h>

#include "tunnel/wsc.h"

/* Bytes read from the local stream and not yet sent: reading pauses above this. */
#define WSBRIDGE_TO_WS_MAX (256u * 1024)
/* The least free space worth reading into: below it, a fresh block is started. */
#define WSBRIDGE_READ_MIN (16u * 1024)
/* Bytes waiting for the local stream: the websocket is paused above this. */
#define WSBRIDGE_TO_LOCAL_MAX (1024u * 1024)

struct wsbridge;

/* How a bridge ended. */
struct wsbridge_end {
    /*
     * The websocket's close code (1000: both directions finished), the HTTP status of a
     * refused upgrade (401, 404, 503), or 0 when there was neither (the relay could not be
     * reached, or the connection dropped).
     */
    int status;
    const char *reason; /* one line, never NULL */
    bool established;   /* the websocket was open at some point */
    /*
     * The local side closed or failed first and the bridge closed the websocket itself:
     * status and reason then say nothing about the relay.
     */
    bool local_first;
    int local_error; /* the UV_E* error of the local stream that failed, or 0 */
};

struct wsbridge_events {
    /*
     * Optional. The websocket ended (or could not be opened) and the local side has not
     * ended first: called before the local side is closed, so an owner whose reader goes
     * away at the end of file (ssh kills its ProxyCommand) can still report the end. May be
     * called from within wsbridge_start.
     */
    void (*ended)(void *ud, const struct wsbridge_end *end);
    /* Called once, when the websocket is gone and every local handle is closed. */
    void (*done)(void *ud, const struct wsbridge_end *end);
};

struct wsbridge_params {
    const struct wsc_params *ws; /* where to connect; copied as wsc_connect copies it */
    uv_stream_t *in;             /* read from: initialised, connected, not reading */
    uv_stream_t *out;            /* written to; may be the same handle as in */
};

/*
 * Starts connecting and, once the websocket is open, moving bytes. On success the bridge
 * owns the handles' data fields and their closing: it closes them, and `done` follows
 * exactly once (also when connecting fails); the bridge frees itself after `done`
 * returns, and the handles' memory (the caller's) may be freed in `done`. ev must outlive
 * the bridge.
 * Returns 0, or UV_ENOMEM with nothing taken (the caller still owns and closes the handles).
 */
int wsbridge_start(const struct wsbridge_params *p, const struct wsbridge_events *ev, void *ud);

/* True if the bridge ended well: both directions finished and the relay closed with 1000. */
bool wsbridge_end_ok(const struct wsbridge_end *e);

/*
 * One line for a person about an end that was not ok: refusals of the upgrade (bad token,
 * unknown or offline workspace), the stream's failure (the relay's close code 4000+code
 * and its reason), an unreachable relay. `what` names the pipe for stream failures, e.g.
 * "forward to ws port 8080".
 */
void wsbridge_end_text(const struct wsbridge_end *e, const char *workspace, const char *what,
                       char *buf, size_t len);

#endif
