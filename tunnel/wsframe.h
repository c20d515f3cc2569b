/*
 * wsframe: RFC 6455 framing for the client end of a websocket, sans-I/O.
 *
 * libwebsockets' own client parses every received byte through a state machine and masks
 * every sent byte one at a time (PITFALLS.md measured the ceilings). tether's clients frame
 * their websockets with this module instead, over an lws raw connection (lws still does the
 * connect, TLS and the loop). The bytes on the wire are plain RFC 6455: frames from the
 * server are unmasked, ours are masked with a fresh random key each.
 *
 * Parsing is streaming: payload is handed out as it arrives, in place, without copying; only
 * a control frame's payload (at most 125 bytes) is kept. Extensions are not negotiated, so
 * RSV bits must be zero.
 */
#ifndef TETHER_WSFRAME_H
#define TETHER_WSFRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum wsframe_opcode {
    WSFRAME_CONTINUATION = 0x0,
    WSFRAME_TEXT = 0x1,
    WSFRAME_BINARY = 0x2,
    WSFRAME_CLOSE = 0x8,
    WSFRAME_PING = 0x9,
    WSFRAME_PONG = 0xA,
};

#define WSFRAME_MAX_HEADER 14u   /* 2 + 8 (length) + 4 (mask) */
#define WSFRAME_MAX_CONTROL 125u /* a control frame's payload */

enum wsframe_err {
    WSFRAME_E_RSV = -1,      /* RSV bits set: no extension was negotiated */
    WSFRAME_E_OPCODE = -2,   /* reserved opcode */
    WSFRAME_E_MASKED = -3,   /* a server's frame must not be masked */
    WSFRAME_E_CONTROL = -4,  /* control frame fragmented or longer than 125 bytes */
    WSFRAME_E_SEQUENCE = -5, /* continuation without a message, or a new message inside one */
    WSFRAME_E_LENGTH = -6,   /* 64-bit length with the top bit set, or over the limit */
    WSFRAME_E_CALLBACK = -7, /* a callback asked to stop */
};

struct wsframe_events {
    /*
     * Payload of a data message, in pieces as it arrives. binary tells the message's type;
     * final is true on the last piece of the message (also for an empty message, len 0).
     * Return 0, or non-zero to stop parsing (wsframe_parse returns WSFRAME_E_CALLBACK).
     */
    int (*data)(void *ud, const uint8_t *p, size_t len, bool binary, bool final);
    /* A whole control frame (close, ping or pong). */
    int (*control)(void *ud, uint8_t opcode, const uint8_t *p, size_t len);
};

struct wsframe_parser {
    uint64_t max_message; /* 0 = no limit; else a data message larger than this is an error */
    /* state */
    uint8_t hdr[WSFRAME_MAX_HEADER];
    uint8_t hdr_len;  /* header bytes collected */
    uint8_t hdr_need; /* header bytes this frame's header has (2 until known) */
    bool in_payload;
    uint8_t opcode;
    bool fin;
    uint64_t remaining; /* payload bytes of the current frame still to come */
    bool in_message;    /* a fragmented data message is open */
    bool message_binary;
    uint64_t message_len;
    uint8_t control[WSFRAME_MAX_CONTROL];
    uint8_t control_len;
};

void wsframe_parser_init(struct wsframe_parser *p, uint64_t max_message);
/* Feeds received bytes. Returns 0 or a negative WSFRAME_E_* (the connection must close 1002). */
int wsframe_parse(struct wsframe_parser *p, const uint8_t *data, size_t len,
                  const struct wsframe_events *ev, void *ud);

/*
 * Writes a masked frame header for a payload of len bytes into out (at least
 * WSFRAME_MAX_HEADER bytes) and returns its size.
 */
size_t wsframe_header(uint8_t *out, uint8_t opcode, bool fin, uint64_t len, const uint8_t mask[4]);
/* XORs p with the mask, word-wide; offset is p's position within the frame's payload. */
void wsframe_mask(uint8_t *p, size_t len, const uint8_t mask[4], size_t offset);

const char *wsframe_strerror(int err);

#endif
