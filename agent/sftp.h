/*
 * sftp: an SFTP version 3 server engine, without a channel. The owner feeds it the bytes a
 * client sent and sends the bytes it queues; the engine executes each request with libuv's
 * uv_fs_* functions, so a slow filesystem never stalls the loop. The SSH server drives it
 * from a channel, `tether sftp-server` from stdin and stdout.
 *
 * Requests start in the order they arrive. Consecutive READs run concurrently, and so do
 * consecutive WRITEs to one handle at non-overlapping offsets; every other request waits
 * for all earlier ones and holds back all later ones. So a client sees the results it would
 * see if each request ran alone, while a download or an upload keeps several in flight.
 * Replies leave in request order all the same: OpenSSH's scp and `sftp -a` truncate a file
 * at the first WRITE or READ reply that arrives out of order.
 *
 * Paths that are not absolute are resolved against home. The engine acts with the
 * process's own permissions, as OpenSSH's sftp-server does; it confines nothing.
 *
 * Memory is bounded per session: one packet being received (SFTP_WIRE_MAX_PACKET), requests
 * and their reply buffers (SFTP_MAX_REQUESTS, SFTP_MAX_REQUEST_BYTES plus one request), the
 * output queue (SFTP_MAX_OUTPUT plus the replies of requests already admitted), and
 * SFTP_MAX_HANDLES open handles. When requests or output reach their limit,
 * sftp_server_feed takes no more bytes until the engine calls want_input.
 *
 * Events are never called from inside a sftp_server_* call: they come from the loop's
 * callbacks, so the owner may call any sftp_server_* function from an event.
 */
#ifndef TETHER_SFTP_H
#define TETHER_SFTP_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "sftp_wire.h"

/* Requests received and not yet answered (OpenSSH's client keeps up to 64 in flight). */
#define SFTP_MAX_REQUESTS 64u
/* Bytes held by those requests: the packets and the replies being built for them. */
#define SFTP_MAX_REQUEST_BYTES (2u * 1024 * 1024)
/* Replies waiting for the owner to send them; beyond this, input stops. */
#define SFTP_MAX_OUTPUT (1u * 1024 * 1024)
/* Open file and directory handles per session (told to clients by limits@openssh.com). */
#define SFTP_MAX_HANDLES 64u
/* Entries per READDIR reply, as OpenSSH sends. */
#define SFTP_READDIR_BATCH 100u

/* Why a session failed (sftp_server_error). */
enum {
    SFTP_E_MALFORMED = -1, /* a packet broke the framing or overran its length */
    SFTP_E_PROTOCOL = -2,  /* a request before INIT, or a second INIT */
    SFTP_E_NOMEM = -3,
};

struct sftp_server;

struct sftp_server_events {
    /* Replies were queued: call sftp_server_output. */
    void (*want_write)(void *ud);
    /* sftp_server_feed took less than it was given; it can take more now. */
    void (*want_input)(void *ud);
    /* The session failed (sftp_server_error says why): stop feeding, send what is queued if
     * you like, then close. Called once. May be NULL. */
    void (*failed)(void *ud);
    /* After sftp_server_close: every filesystem request has finished, every handle is
     * closed and the engine is freed. */
    void (*done)(void *ud);
};

/*
 * A new session serving home (copied; at most SFTP_WIRE_MAX_PATH bytes). ev is copied.
 * Returns NULL when out of memory or when home is not an absolute path. The caller ends
 * it with sftp_server_close.
 */
struct sftp_server *sftp_server_new(uv_loop_t *loop, const char *home,
                                    const struct sftp_server_events *ev, void *ud);

/*
 * Offers bytes from the client. Returns how many were taken (copied); fewer than len means
 * the engine is full: offer the rest after want_input. A failed session takes nothing.
 */
size_t sftp_server_feed(struct sftp_server *s, const uint8_t *data, size_t len);

/* The queued reply bytes at the front (contiguous, at most 64 KiB; NULL and *len 0 when
 * none). They stay in place until consumed, so they may be written asynchronously. */
const uint8_t *sftp_server_output(struct sftp_server *s, size_t *len);
/* n bytes from the front of the output were sent. */
void sftp_server_consumed(struct sftp_server *s, size_t n);

/* Requests received and not yet answered. Zero with no output queued means idle. */
size_t sftp_server_pending(const struct sftp_server *s);
/* 0, or a negative SFTP_E_* code once the session has failed. */
int sftp_server_error(const struct sftp_server *s);

/*
 * Ends the session: requests not started are dropped, running ones are cancelled or
 * awaited, open handles are closed; then done is called (from a loop callback) and the
 * engine is freed. No other event follows this call, and s must not be used after it.
 * Queued output is discarded.
 */
void sftp_server_close(struct sftp_server *s);

#endif
