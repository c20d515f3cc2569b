/*
 * ptyconv: the relay's converter for one pty stream (PROTOCOL.md 3.2 and 14.7), sans-I/O.
 *
 * Toward the agent it turns what a websocket client sends (JSON text messages, raw binary
 * input) into pty records (DATA, RESIZE) and deflates them into the stream's one zlib
 * stream, with Z_SYNC_FLUSH at the end of every call, so every byte it hands out can be
 * decoded by the agent as soon as it arrives. From the agent it inflates the stream's bytes,
 * reassembles records across calls and gives back the raw terminal output and the exit
 * status. No sockets, no lws, no logging: the caller sends, logs and decides.
 *
 * Limits (each checked before anything is allocated for it):
 *  - A client text message is at most PTYCONV_MAX_JSON bytes; a longer one is ignored
 *    (its fragments are dropped as they arrive, nothing is buffered past the limit).
 *  - Inflating writes only into the caller's buffer, at most `cap` bytes per call, so a
 *    zlib bomb costs the caller exactly the output room it offers. The caller takes agent
 *    bytes only under the stream's credit, which bounds the compressed bytes held.
 *  - Records from the agent are never buffered whole: DATA bodies stream straight through,
 *    unknown records are skipped by count, only RESIZE and EXIT bodies (a few bytes) are
 *    collected.
 *
 * Client messages (PROTOCOL.md 14.7): a JSON object, {"data": "..."} and/or
 * {"rows": R, "cols": C}. A message that is not JSON, not an object, has "data" that is not
 * a string, "rows"/"cols" that are not integers, or only one of "rows" and "cols", is
 * ignored as a whole (PTYCONV_E_IGNORED, with the reason). Unknown members are ignored.
 * Integer sizes outside 1..65535 are clamped into that range (the agent clamps further to
 * what a terminal can use): a size is never dropped, and 0 or a negative never reaches the
 * wire.
 *
 * Ownership: ptyconv_new allocates, ptyconv_free frees. Output bytebufs belong to the
 * caller; ptyconv only appends to them.
 */
#ifndef TETHER_PTYCONV_H
#define TETHER_PTYCONV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tunnel/bytebuf.h"

#define PTYCONV_MAX_JSON (1024u * 1024) /* a client text message, in bytes */
#define PTYCONV_MIN_SIZE 1u             /* rows and cols are clamped into 1..65535 */
#define PTYCONV_MAX_SIZE 65535u
/* Deflate settings toward the agent: terminal input is small and sparse, so a small window
 * and memory level keep each stream near 32 KiB of deflate state. Any inflater accepts it. */
#define PTYCONV_ZLEVEL 1
#define PTYCONV_ZWBITS 12
#define PTYCONV_ZMEMLEVEL 5

enum ptyconv_err {
    PTYCONV_E_NOMEM = -1,   /* out of memory: the stream cannot go on */
    PTYCONV_E_ZLIB = -2,    /* zlib failed for a reason that is nobody's input */
    PTYCONV_E_RECORD = -3,  /* the agent sent a malformed record: RST PROTOCOL */
    PTYCONV_E_INFLATE = -4, /* the agent's bytes are not a valid zlib stream: RST PROTOCOL */
    PTYCONV_E_IGNORED = -5, /* a client message was ignored (the reason says why) */
};

const char *ptyconv_strerror(int err);

struct ptyconv;

/* zlib: the stream uses PROTO_PTY_OPT_ZLIB (the relay always asks for it). NULL: no memory. */
struct ptyconv *ptyconv_new(bool zlib);
void ptyconv_free(struct ptyconv *pc);

/*
 * A piece of a client text message (first/final as the websocket library reports them).
 * Pieces are collected until the final one, then the message is converted and its bytes for
 * the agent are appended to out. Returns 0 (converted, or more pieces to come),
 * PTYCONV_E_IGNORED (the message is dropped; why says why: log it), PTYCONV_E_NOMEM or
 * PTYCONV_E_ZLIB (the stream cannot go on; out may hold part of a flush).
 */
int ptyconv_client_text(struct ptyconv *pc, const uint8_t *p, size_t len, bool first, bool final,
                        struct bytebuf *out, char *why, size_t whylen);

/* Raw terminal input (a binary message, or part of one): DATA records into out. */
int ptyconv_client_input(struct ptyconv *pc, const uint8_t *p, size_t len, struct bytebuf *out);

/* A resize, clamped into 1..65535: one RESIZE record into out. */
int ptyconv_client_resize(struct ptyconv *pc, long long rows, long long cols, struct bytebuf *out);

/*
 * Bytes of the stream from the agent. Inflates from in (*used says how many bytes it took)
 * into out, at most cap bytes, parses the records there and leaves only the terminal output
 * at the front of out (*produced bytes). Call again while in has bytes left or
 * ptyconv_agent_pending says zlib holds output that did not fit; a call may take input and
 * produce nothing (headers, skipped records). Returns 0, PTYCONV_E_RECORD or
 * PTYCONV_E_INFLATE (the agent broke the protocol; every later call returns the same), or
 * PTYCONV_E_NOMEM / PTYCONV_E_ZLIB.
 */
int ptyconv_agent_output(struct ptyconv *pc, const uint8_t *in, size_t len, size_t *used,
                         uint8_t *out, size_t cap, size_t *produced);
/* True if the last ptyconv_agent_output filled out: call it again, even with no input. */
bool ptyconv_agent_pending(const struct ptyconv *pc);

/* The process's status from the agent's EXIT record: the exit code, or 128 + the signal
 * number. -1 until an EXIT record arrived. */
int ptyconv_exit_status(const struct ptyconv *pc);

#endif
