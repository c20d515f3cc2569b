/*
 * proto: the tether.v1 wire format.
 *
 * Pure functions that encode and decode frames and their payloads, and validate the JSON
 * control messages carried on stream 0. Nothing here does I/O or keeps state; the only
 * allocation is jansson's, for a control message whose size was checked first.
 * proto/PROTOCOL.md is the normative description; this header follows it.
 *
 * All multi-byte integers are big-endian. Decoders never read past `len` and return 0 or a
 * negative PROTO_E_* code. Decoded strings point into the caller's buffer (not
 * NUL-terminated) unless a field says otherwise.
 */
#ifndef TETHER_PROTO_H
#define TETHER_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define PROTO_VERSION 1
#define PROTO_SUBPROTOCOL "tether.v1"
#define PROTO_HEADER_SIZE 12

/* Limits. Each is enforced by the decoders before anything is allocated. */
#define PROTO_MIN_FRAME_PAYLOAD (16u * 1024)     /* smallest max_frame_payload a peer may set */
#define PROTO_DEFAULT_FRAME_PAYLOAD (64u * 1024) /* DATA payload we accept unless told */
#define PROTO_MAX_FRAME_PAYLOAD (1024u * 1024)   /* largest max_frame_payload a peer may set */
#define PROTO_MAX_CONTROL (1024u * 1024)         /* a CONTROL frame's JSON, whatever HELLO says */
#define PROTO_MIN_WINDOW (16u * 1024)            /* smallest initial_window a peer may set */
#define PROTO_DEFAULT_WINDOW (256u * 1024)       /* per-stream credit granted at OPEN */
#define PROTO_MAX_WINDOW (16u * 1024 * 1024)     /* credit may never run further ahead */
#define PROTO_DEFAULT_MAX_STREAMS 1024u          /* streams the peer may have open at once */
#define PROTO_MAX_STREAMS_LIMIT (1u << 20)
#define PROTO_MAX_TEXT 1024u     /* reason text in OPEN_FAIL, RST, GOAWAY */
#define PROTO_MAX_HOST 255u      /* host in a tcp OPEN */
#define PROTO_MAX_OPEN 8192u     /* an OPEN payload of any kind */
#define PROTO_MAX_STATS_KEYS 32u /* names in each counter object of a stats message */
#define PROTO_MAX_HELLO_SETTINGS 16u
#define PROTO_PING_SIZE 8u

/* Control message limits (PROTOCOL.md 12), checked by proto_control_validate. */
#define PROTO_MAX_SCRIPTS 32u             /* manifest "scripts" */
#define PROTO_MAX_SCRIPT_NAME 64u         /* a script's "name": 1..64 bytes of A-Za-z0-9._- */
#define PROTO_MAX_SCRIPT_TEXT 4096u       /* a script's or metadata item's "script" (shell text) */
#define PROTO_MAX_SCRIPT_TIMEOUT 86400    /* seconds; a script's "timeout" is 1..this */
#define PROTO_DEFAULT_START_TIMEOUT 300   /* seconds, a "run_on":"start" script without timeout */
#define PROTO_DEFAULT_STOP_TIMEOUT 60     /* seconds, a "run_on":"stop" script without timeout */
#define PROTO_MAX_METADATA 32u            /* manifest "metadata", and a metadata message's items */
#define PROTO_MAX_METADATA_KEY 64u        /* a metadata "key": 1..64 bytes of A-Za-z0-9._- */
#define PROTO_MAX_METADATA_INTERVAL 86400 /* seconds; "interval" is 1..this */
#define PROTO_DEFAULT_METADATA_INTERVAL 60
#define PROTO_MAX_METADATA_TIMEOUT 3600 /* seconds; a metadata item's "timeout" is 1..this */
#define PROTO_DEFAULT_METADATA_TIMEOUT 10
#define PROTO_MAX_METADATA_VALUE 10240u /* bytes of a metadata item's "value" (over 4096) */
#define PROTO_MAX_METADATA_ERROR 4096u  /* bytes of a reported "error" */
#define PROTO_MAX_FORWARD_PORTS 64u     /* ports' "forward_ports" */

enum proto_type {
    PROTO_HELLO = 1,
    PROTO_OPEN = 2,
    PROTO_OPEN_OK = 3,
    PROTO_OPEN_FAIL = 4,
    PROTO_DATA = 5,
    PROTO_CREDIT = 6,
    PROTO_RST = 7,
    PROTO_PING = 8,
    PROTO_PONG = 9,
    PROTO_GOAWAY = 10,
    PROTO_CONTROL = 11,
};

/* Frame flags. A flag not defined for a frame's type must be zero. */
#define PROTO_FLAG_FIN 0x0001u /* DATA: the sender will send no more on this stream */

/* Error codes carried by OPEN_FAIL, RST and GOAWAY. */
enum proto_code {
    PROTO_CODE_OK = 0,
    PROTO_CODE_PROTOCOL = 1,     /* the peer broke a rule of PROTOCOL.md */
    PROTO_CODE_FLOW = 2,         /* DATA beyond credit, credit beyond the window, or a reader
                                  * too slow to keep up (a dropped PTY attachment) */
    PROTO_CODE_STREAM_LIMIT = 3, /* too many open streams */
    PROTO_CODE_REFUSED = 4,      /* connection refused by the target */
    PROTO_CODE_UNREACHABLE = 5,  /* target host or network unreachable, or bad address */
    PROTO_CODE_TIMEOUT = 6,      /* dialing the target or the keepalive timed out */
    PROTO_CODE_UNSUPPORTED = 7,  /* unknown stream kind, or one this end does not serve */
    PROTO_CODE_FORBIDDEN = 8,    /* policy forbids it */
    PROTO_CODE_INTERNAL = 9,     /* the sender failed (out of memory, fds, ...) */
    PROTO_CODE_CANCEL = 10,      /* the local end went away */
    PROTO_CODE_SHUTDOWN = 11,    /* GOAWAY: the sender is shutting down */
    PROTO_CODE_REPLACED = 12,    /* GOAWAY: another agent connected for this workspace */
    PROTO_CODE_MAX = 12,
};

/* Decoder results. */
enum proto_err {
    PROTO_E_SHORT = -1,   /* need more bytes (not an error of the peer's yet) */
    PROTO_E_VERSION = -2, /* header version is not PROTO_VERSION */
    PROTO_E_TYPE = -3,    /* unknown frame type */
    PROTO_E_FLAGS = -4,   /* a flag bit undefined for the type is set */
    PROTO_E_LENGTH = -5,  /* payload length over the type's limit, or wrong fixed size */
    PROTO_E_STREAM = -6,  /* stream 0 on a stream frame, or non-zero on a session frame */
    PROTO_E_PAYLOAD = -7, /* payload malformed for its type */
    PROTO_E_KIND = -8,    /* OPEN of a kind this version does not know (answer OPEN_FAIL) */
    PROTO_E_JSON = -9,    /* CONTROL payload is not valid JSON or breaks its schema */
};

const char *proto_strerror(int err);
const char *proto_type_name(int type);
const char *proto_code_name(uint32_t code);

struct proto_header {
    uint8_t version;
    uint8_t type;
    uint16_t flags;
    uint32_t stream;
    uint32_t length;
};

/*
 * Decode and validate a header from the first PROTO_HEADER_SIZE bytes of buf. max_data is the
 * DATA payload limit this end advertised; every other type has its own fixed limit.
 * Returns 0, PROTO_E_SHORT if len < PROTO_HEADER_SIZE, or another PROTO_E_* (a connection
 * error of the peer's).
 */
int proto_header_decode(const uint8_t *buf, size_t len, uint32_t max_data, struct proto_header *h);
void proto_header_encode(uint8_t out[PROTO_HEADER_SIZE], uint8_t type, uint16_t flags,
                         uint32_t stream, uint32_t length);

/* HELLO: what the sender accepts. Settings the receiver does not know are ignored. */
enum proto_setting {
    PROTO_SETTING_MAX_FRAME_PAYLOAD = 1,
    PROTO_SETTING_INITIAL_WINDOW = 2,
    PROTO_SETTING_MAX_STREAMS = 3,
};
struct proto_hello {
    uint32_t max_frame_payload; /* largest DATA payload the sender accepts */
    uint32_t initial_window;    /* credit the sender grants every stream, both directions */
    uint32_t max_streams;       /* streams the sender lets the peer open at once */
};
#define PROTO_HELLO_SIZE (3u * 6u)
void proto_hello_default(struct proto_hello *h);
int proto_hello_decode(const uint8_t *p, size_t len, struct proto_hello *out);
/* Writes PROTO_HELLO_SIZE bytes. */
size_t proto_hello_encode(const struct proto_hello *h, uint8_t *out);

/* OPEN */
enum proto_kind {
    PROTO_KIND_TCP = 1, /* a TCP connection to host:port as seen from the agent */
    PROTO_KIND_SSH = 2, /* an SSH connection to the agent's built-in server */
    PROTO_KIND_PTY = 3, /* a reconnecting PTY, by id (PROTOCOL.md 3.2) */
};
#define PROTO_PTY_ID_SIZE 16u       /* a UUID's bytes, chosen by the client */
#define PROTO_MAX_PTY_COMMAND 4096u /* bytes of a pty OPEN's command */
#define PROTO_PTY_OPT_ZLIB 0x01u    /* the stream's DATA is a zlib stream each way */
#define PROTO_PTY_OPEN_FIXED 24u    /* a pty body without its command */
struct proto_open {
    uint8_t kind;
    uint8_t flags; /* reserved, zero */
    /* PROTO_KIND_TCP */
    uint16_t port;
    char host[PROTO_MAX_HOST + 1]; /* NUL-terminated copy */
    /* PROTO_KIND_PTY */
    uint8_t pty_id[PROTO_PTY_ID_SIZE];       /* never all zero */
    uint16_t rows, cols;                     /* as sent; the agent clamps them */
    uint8_t pty_options;                     /* PROTO_PTY_OPT_* */
    char command[PROTO_MAX_PTY_COMMAND + 1]; /* NUL-terminated; "" = the login shell */
};
/* Returns 0, PROTO_E_PAYLOAD, or PROTO_E_KIND (well-formed but unknown kind). */
int proto_open_decode(const uint8_t *p, size_t len, struct proto_open *out);
/* Returns the bytes written (at most PROTO_MAX_OPEN) or PROTO_E_PAYLOAD. */
int proto_open_encode(const struct proto_open *o, uint8_t *out, size_t cap);

/*
 * Records inside a pty stream's bytes (after zlib, if the stream uses it): type u8, length
 * u16, body. A record may span DATA frames; the receiver reassembles.
 */
enum proto_ptyrec_type {
    PROTO_PTYREC_DATA = 1,   /* terminal input (to the agent) or output (from it), 1..65535 */
    PROTO_PTYREC_RESIZE = 2, /* to the agent: rows u16, cols u16 */
    PROTO_PTYREC_EXIT = 3,   /* from the agent: how u8 (0 exit code, 1 signal), value u8 */
};
#define PROTO_PTYREC_HEADER 3u
#define PROTO_PTYREC_MAX_BODY 65535u
struct proto_ptyrec {
    uint8_t type;                 /* may be one this version does not know: skip it */
    uint16_t len;                 /* of the body */
    const uint8_t *body;          /* borrowed from the input */
    uint16_t rows, cols;          /* RESIZE */
    uint8_t exit_how, exit_value; /* EXIT */
};
/*
 * Decodes one record from p. Returns the bytes it takes (header + body), 0 if p holds only
 * part of it, or PROTO_E_PAYLOAD for a known type with a wrong body (empty DATA, RESIZE not
 * 4 bytes, EXIT not 2 bytes or how > 1).
 */
int proto_ptyrec_decode(const uint8_t *p, size_t len, struct proto_ptyrec *out);
/* Writes a record's 3-byte header. */
void proto_ptyrec_header(uint8_t type, uint16_t len, uint8_t *out);

/* OPEN_FAIL and RST: code u32 + text. GOAWAY: last_stream u32 + code u32 + text. */
struct proto_reason {
    uint32_t last_stream; /* GOAWAY only */
    uint32_t code;
    const char *text; /* points into the payload; printable ASCII/UTF-8, not NUL-terminated */
    size_t text_len;
};
int proto_reason_decode(const uint8_t *p, size_t len, struct proto_reason *out);
int proto_goaway_decode(const uint8_t *p, size_t len, struct proto_reason *out);
/* Encoders truncate text to PROTO_MAX_TEXT; they return the payload size written. */
size_t proto_reason_encode(uint32_t code, const char *text, uint8_t *out);
size_t proto_goaway_encode(uint32_t last_stream, uint32_t code, const char *text, uint8_t *out);
#define PROTO_REASON_MAX (4u + PROTO_MAX_TEXT)
#define PROTO_GOAWAY_MAX (8u + PROTO_MAX_TEXT)

/* CREDIT: absolute u64 byte offset up to which the receiver accepts DATA. */
int proto_credit_decode(const uint8_t *p, size_t len, uint64_t *offset);
void proto_credit_encode(uint64_t offset, uint8_t out[8]);

/*
 * Workspace lifecycle states ("lifecycle" message, PROTOCOL.md 12.7), in the order of the
 * wire names. They move forward only, in the partial order of proto_lifecycle_rank:
 * created < starting < {ready, start_error, start_timeout} < shutting_down <
 * {shutdown_error, shutdown_timeout} < off.
 */
enum proto_lifecycle {
    PROTO_LC_CREATED = 0,
    PROTO_LC_STARTING = 1,
    PROTO_LC_READY = 2,
    PROTO_LC_START_ERROR = 3,
    PROTO_LC_START_TIMEOUT = 4,
    PROTO_LC_SHUTTING_DOWN = 5,
    PROTO_LC_SHUTDOWN_ERROR = 6,
    PROTO_LC_SHUTDOWN_TIMEOUT = 7,
    PROTO_LC_OFF = 8,
    PROTO_LC_COUNT = 9,
};
/* The PROTO_LC_COUNT wire names indexed by enum proto_lifecycle, then NULL. */
const char *const *proto_lifecycle_states(void);
/* The state named name (a NUL-terminated wire name), or -1. */
int proto_lifecycle_state(const char *name);
/* The wire name of state, or NULL if it is not a PROTO_LC_* below PROTO_LC_COUNT. */
const char *proto_lifecycle_name(int state);
/*
 * The state's step in the partial order (0 created, 1 starting, 2 the end of starting, 3
 * shutting_down, 4 the end of shutting down, 5 off), or -1. A transition a -> b is forward
 * when rank(b) > rank(a).
 */
int proto_lifecycle_rank(int state);

/*
 * CONTROL: one JSON object with a string member "type". Known types are checked against
 * their schema (PROTOCOL.md); unknown types are accepted (the receiver ignores them).
 * On success *out is a new reference the caller releases with json_decref.
 * On failure returns PROTO_E_JSON or PROTO_E_LENGTH and writes a reason into err.
 */
int proto_control_parse(const uint8_t *p, size_t len, json_t **out, char *err, size_t errlen);
/* Validates an already-built message against the same schema. */
int proto_control_validate(const json_t *msg, char *err, size_t errlen);

#endif
