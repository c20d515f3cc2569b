/*
 * mux: the tunnel's stream multiplexer, sans-I/O.
 *
 * One struct mux is one end of one tunnel connection. The transport feeds it the bytes it
 * received (mux_feed), asks it for bytes to send (mux_output) whenever the transport can
 * write, and tells it the time (mux_tick). Everything else arrives through callbacks. No
 * sockets, no clocks, no event loop: the unit tests and the fuzzer drive it directly.
 *
 * Invariants:
 *  - Nothing is allocated for a frame before its header passed proto_header_decode.
 *  - A stream's queued output never exceeds the credit its peer granted (mux_stream_room),
 *    so memory per stream is bounded by the window in each direction.
 *  - Credit is granted only for bytes the owner reports as drained (mux_stream_consumed).
 *  - Control frames go out before DATA; DATA is scheduled round-robin across streams.
 *  - Callbacks may call back into the mux, except mux_free, mux_feed and mux_message_end.
 *
 * Ownership: the mux owns its streams' queues. Callbacks get borrowed pointers valid only
 * for the duration of the call. Stream user pointers belong to the caller.
 */
#ifndef TETHER_MUX_H
#define TETHER_MUX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "proto/proto.h"

/* Negative error codes of mux functions (besides PROTO_E_* passed through). */
enum mux_err {
    MUX_E_CLOSED = -100,   /* the connection is going away (GOAWAY sent or received) */
    MUX_E_NOSTREAM = -101, /* no such stream, or it is in the wrong state for the call */
    MUX_E_LIMIT = -102,    /* the peer's max_streams, or ids exhausted */
    MUX_E_NOMEM = -103,
    MUX_E_PROTOCOL = -104, /* the peer broke the protocol: GOAWAY is queued, flush and close */
    MUX_E_TIMEOUT = -105,  /* keepalive: nothing received within keepalive_timeout_ms */
    MUX_E_FULL = -106,     /* the control queue is full: the peer is not reading */
    MUX_E_NOTREADY = -107, /* the peer's HELLO has not arrived: no OPEN may be sent yet */
    MUX_E_INVALID = -108,  /* an argument out of range: a commit beyond what was reserved */
};

enum mux_role {
    MUX_ROLE_AGENT, /* opens odd stream ids */
    MUX_ROLE_RELAY, /* opens even stream ids */
};

struct mux_config {
    enum mux_role role;
    struct proto_hello local;      /* what we advertise in HELLO (our receive limits) */
    uint32_t keepalive_idle_ms;    /* send PING after this long with nothing received */
    uint32_t keepalive_timeout_ms; /* the connection is dead after this long */
    size_t max_control_queue;      /* encoded control frames waiting to be sent */
};
#define MUX_KEEPALIVE_IDLE_MS 15000u
#define MUX_KEEPALIVE_TIMEOUT_MS 45000u
#define MUX_MAX_CONTROL_QUEUE (4u * 1024 * 1024)

void mux_config_default(struct mux_config *cfg, enum mux_role role);

struct mux;

struct mux_callbacks {
    /*
     * The peer opened stream id. Answer with mux_stream_accept or mux_stream_reject, now or
     * later; until accepted, the peer sends no DATA. Kinds that proto does not know are
     * rejected by the mux itself and never reach this callback.
     */
    void (*stream_opened)(void *ud, uint32_t id, const struct proto_open *open);
    /* Our OPEN was answered: code 0 = OPEN_OK, otherwise OPEN_FAIL's code and text.
     * After a failure the stream is gone (no stream_closed follows). An OPEN_FAIL that
     * carries code 0 is reported as PROTO_CODE_PROTOCOL. */
    void (*stream_open_result)(void *ud, uint32_t id, void *stream_ud, uint32_t code,
                               const char *text, size_t text_len);
    /* DATA arrived. Report with mux_stream_consumed once it is drained to its destination. */
    void (*stream_data)(void *ud, uint32_t id, void *stream_ud, const uint8_t *data, size_t len);
    /* The peer sent FIN: no more DATA on this stream. */
    void (*stream_fin)(void *ud, uint32_t id, void *stream_ud);
    /* mux_stream_room went from 0 to more: read from the local source again. */
    void (*stream_writable)(void *ud, uint32_t id, void *stream_ud);
    /*
     * The stream ended: FIN both ways and our queue flushed (code 0), RST from the peer, a
     * stream-level protocol fault of the peer's (the mux sent RST), or the connection ended
     * (mux_fail_all). This may also end a stream of ours whose OPEN is still unanswered.
     * An RST that carries code 0 is reported as PROTO_CODE_PROTOCOL. The id is invalid
     * from now on.
     */
    void (*stream_closed)(void *ud, uint32_t id, void *stream_ud, uint32_t code, const char *text,
                          size_t text_len);
    /* A valid CONTROL message arrived on stream 0; msg is borrowed. */
    void (*control)(void *ud, json_t *msg);
    /* The peer's HELLO arrived (its limits are in effect from now on). */
    void (*hello)(void *ud, const struct proto_hello *peer);
    /* The peer sent GOAWAY: it accepts no new streams; the transport should close soon. */
    void (*goaway)(void *ud, uint32_t code, const char *text, size_t text_len);
    /* There is output: the transport should arrange to call mux_output. */
    void (*want_write)(void *ud);
};

/* Creates a mux and queues our HELLO. Returns NULL on allocation failure. */
struct mux *mux_new(const struct mux_config *cfg, const struct mux_callbacks *cb, void *ud,
                    uint64_t now_ms);
/* Frees the mux and every stream silently (no callbacks). */
void mux_free(struct mux *m);

/*
 * Feeds received bytes. Complete frames are processed at once (DATA is passed to
 * stream_data without copying); a partial frame's bytes are kept until the rest arrives.
 * Returns 0, or MUX_E_PROTOCOL after queueing GOAWAY: flush mux_output, then close
 * (MUX_E_NOMEM if a partial frame could not be buffered). After an error every call
 * returns MUX_E_PROTOCOL and parses nothing.
 */
int mux_feed(struct mux *m, const uint8_t *data, size_t len, uint64_t now_ms);
/* The transport's message ended: a frame may not span messages. Returns 0 or MUX_E_PROTOCOL. */
int mux_message_end(struct mux *m);

/*
 * Writes whole frames into buf (control frames first, then DATA round-robin) and returns the
 * byte count; 0 means nothing to send. cap must be at least MUX_OUTPUT_MIN. DATA goes out
 * only once every queued control frame has (an OPEN_OK always precedes its stream's DATA).
 * Streams that end with this batch (our FIN written, the peer's received) get stream_closed
 * before it returns. After a connection error only control frames (the GOAWAY) are written.
 */
#define MUX_OUTPUT_MIN (PROTO_HEADER_SIZE + PROTO_MAX_CONTROL)
size_t mux_output(struct mux *m, uint8_t *buf, size_t cap);
bool mux_wants_output(const struct mux *m);

/*
 * Advances the keepalive clock: queues PING after keepalive_idle_ms of silence. Also gives
 * back the storage of send queues that drained and saw no mux_stream_send since the previous
 * call (a busy stream keeps its queue's storage between batches). Returns 0,
 * or MUX_E_TIMEOUT once nothing arrived for keepalive_timeout_ms. mux_next_tick_ms says
 * how many ms from now the next call is due. One PING is outstanding at a time: the next
 * goes only after its PONG, or keepalive_timeout_ms after it was sent.
 */
int mux_tick(struct mux *m, uint64_t now_ms);
uint64_t mux_next_tick_ms(const struct mux *m, uint64_t now_ms);
/* Round-trip time of the last PING answered, in ms; -1 before the first. */
int64_t mux_rtt_ms(const struct mux *m);

/*
 * Opens a stream; *id receives its id. Returns 0, MUX_E_NOTREADY (no HELLO from the peer
 * yet), MUX_E_CLOSED, MUX_E_LIMIT (the peer's max_streams) or MUX_E_NOMEM.
 */
int mux_stream_open(struct mux *m, const struct proto_open *open, void *stream_ud, uint32_t *id);
/* Answers a stream the peer opened (MUX_E_NOSTREAM if it is not awaiting an answer).
 * Reject sends OPEN_FAIL and forgets the stream; code 0 is sent as PROTO_CODE_REFUSED. */
int mux_stream_accept(struct mux *m, uint32_t id, void *stream_ud);
int mux_stream_reject(struct mux *m, uint32_t id, uint32_t code, const char *text);
/* Sends RST and forgets the stream at once (no stream_closed for it). Code 0 is sent as
 * PROTO_CODE_CANCEL (RST never carries 0). Out of memory for the RST, the stream is
 * forgotten all the same, MUX_E_NOMEM returned, and the connection ends: mux_feed fails
 * from then on. */
int mux_stream_reset(struct mux *m, uint32_t id, uint32_t code, const char *text);
void mux_stream_set_user(struct mux *m, uint32_t id, void *stream_ud);

/*
 * How many bytes mux_stream_send will take now: the peer's credit minus what is queued.
 * 0 for an unknown stream, a peer's stream not accepted yet, after mux_stream_shutdown, or
 * while the credit is used up. Before OPEN_OK the initial window may be queued; it is sent
 * once OPEN_OK arrives.
 */
size_t mux_stream_room(const struct mux *m, uint32_t id);
/* Queues up to len bytes (copied); returns the count taken (<= room) or a negative error:
 * MUX_E_NOSTREAM (unknown, not accepted, or shut down), MUX_E_CLOSED, MUX_E_NOMEM. */
int mux_stream_send(struct mux *m, uint32_t id, const uint8_t *data, size_t len);
/*
 * mux_stream_send without the copy: a reader reads straight into the stream's send queue.
 * mux_stream_reserve sets *space to contiguous free storage at the queue's tail and returns
 * its size: at most want and the stream's room, less where the ring wraps. It offers the
 * queue's free storage, and grows the storage (doubling it at most, so that a stream that
 * carries a few bytes keeps a small queue) only when less than 4 KiB of it is free. It
 * returns 0 when the stream has no room, or a negative error as mux_stream_send.
 * mux_stream_commit(n) then queues the first n bytes written there (n <= what reserve
 * returned; 0 queues nothing; more, or a commit without a reserve, is MUX_E_INVALID).
 * Nothing may touch the mux between the two calls: the space is only valid until then.
 */
int mux_stream_reserve(struct mux *m, uint32_t id, size_t want, uint8_t **space);
int mux_stream_commit(struct mux *m, uint32_t id, size_t n);
/* Queues FIN after the queued data: we send nothing more. */
int mux_stream_shutdown(struct mux *m, uint32_t id);
/* n bytes delivered by stream_data have been drained: grants credit when half a window is. */
void mux_stream_consumed(struct mux *m, uint32_t id, size_t n);
/* Bytes queued but not yet sent on a stream (0 if unknown). */
size_t mux_stream_queued(const struct mux *m, uint32_t id);
/* Bytes of storage the stream's send queue holds, queued or not (0 if unknown). */
size_t mux_stream_queue_storage(const struct mux *m, uint32_t id);

/*
 * Queues a CONTROL message (serialised compactly). Returns 0, MUX_E_FULL, MUX_E_CLOSED (only
 * after a connection error: messages may still follow a GOAWAY), or PROTO_E_JSON /
 * PROTO_E_LENGTH for a message the peer would reject.
 */
int mux_send_control(struct mux *m, const json_t *msg);
/* Bytes of session frames (CONTROL, PONG, GOAWAY, ...) queued and not yet handed out. */
size_t mux_control_queued(const struct mux *m);
/* Queues GOAWAY: no new streams either way. Existing streams may finish. GOAWAY is sent at
 * most once per connection: a later call, or a connection error after it, adds none. */
int mux_goaway(struct mux *m, uint32_t code, const char *text);
/* Ends every stream with stream_closed(code, text): the connection is gone. No new streams
 * open after it (mux_stream_open returns MUX_E_CLOSED). */
void mux_fail_all(struct mux *m, uint32_t code, const char *text);

size_t mux_stream_count(const struct mux *m);
bool mux_is_closing(const struct mux *m);
bool mux_peer_hello_received(const struct mux *m);
/* The peer's limits (defaults until its HELLO arrives). */
const struct proto_hello *mux_peer_limits(const struct mux *m);

#endif
