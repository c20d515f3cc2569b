/*
 * logbatch: the records of a "logs" control message (PROTOCOL.md 12.8), pure functions.
 *
 * A batch is a run of records "TIME SP SOURCE SP TEXT LF", zlib-compressed and base64-encoded
 * into the message's "data". The agent fills a batch with logbatch_add and turns it into a
 * message with logbatch_message; the relay checks a whole message with logbatch_decode
 * before it hands out any record, so a bad batch is dropped whole, never half-stored.
 */
#ifndef TETHER_LOGBATCH_H
#define TETHER_LOGBATCH_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define PROTO_MAX_LOG_LINE 4096u      /* bytes of one record's text */
#define PROTO_MAX_LOG_SOURCE 64u      /* bytes of a record's source */
#define PROTO_MAX_LOG_BATCH 65536u    /* a batch's records, uncompressed */
#define PROTO_MAX_LOG_RECORDS 65536u  /* records in one batch ("lines") */
#define PROTO_MAX_LOG_TIME_DIGITS 19u /* a record's TIME: unix ms, fits an int64_t */
/* The longest record: TIME SP SOURCE SP TEXT LF. It always fits an empty batch. */
#define PROTO_MAX_LOG_RECORD                                                                       \
    (PROTO_MAX_LOG_TIME_DIGITS + 1u + PROTO_MAX_LOG_SOURCE + 1u + PROTO_MAX_LOG_LINE + 1u)

struct logbatch {
    uint8_t buf[PROTO_MAX_LOG_BATCH];
    size_t len;     /* bytes of records in buf */
    unsigned lines; /* records in buf */
};

void logbatch_init(struct logbatch *b);

/*
 * The length of the well-formed UTF-8 character at p (1..4; n > 0 bytes there), or 0 if the
 * bytes there are not one: a stray continuation byte, a truncated sequence, an overlong
 * form, a surrogate or a code point above U+10FFFF (RFC 3629). NUL and LF are well-formed;
 * callers that refuse them check for them.
 */
size_t proto_utf8_char(const uint8_t *p, size_t n);

/* True if source is 1..PROTO_MAX_LOG_SOURCE bytes of A-Za-z0-9._:/- */
int logbatch_source_ok(const char *source, size_t len);

/*
 * Appends one record. text (len bytes, may be NULL when len is 0) need not be clean: LF and
 * NUL bytes and each byte of invalid UTF-8 become U+FFFD, one trailing CR is dropped, and the
 * result is cut to PROTO_MAX_LOG_LINE bytes on a character boundary. source is
 * NUL-terminated. Returns 0, PROTO_E_LENGTH if the record does not fit in what is left of
 * the batch (send it, init, add again: a record always fits an empty batch), or
 * PROTO_E_PAYLOAD for a bad source or a negative time_ms. On error b is unchanged.
 */
int logbatch_add(struct logbatch *b, int64_t time_ms, const char *source, const char *text,
                 size_t len);

/*
 * The "logs" message for a non-empty batch (compressed, encoded): a new reference the caller
 * releases. NULL when out of memory, or for an empty batch or a seq of 0 or above INT64_MAX.
 */
json_t *logbatch_message(const struct logbatch *b, uint64_t seq);

struct log_record {
    int64_t time_ms;
    const char *source; /* not NUL-terminated */
    size_t source_len;
    const char *text; /* not NUL-terminated; valid UTF-8 */
    size_t text_len;
};

/*
 * Checks a "logs" message whole (schema, base64, zlib, size, every record, the "lines"
 * count), then calls cb (may be NULL) for each record in order (the pointers live until the
 * call returns). Returns 0, or with a reason in err (may be NULL) and no call of cb:
 * PROTO_E_JSON if msg is not a valid "logs" message (proto_control_validate; a connection
 * error if it came from the wire), PROTO_E_LENGTH if "data" is longer than any batch needs or
 * inflates to more than PROTO_MAX_LOG_BATCH bytes, PROTO_E_PAYLOAD for anything else wrong
 * inside "data" (and when out of memory). The last two drop the batch, not the connection.
 * Allocates at most about 170 KiB while it runs (zlib included), whatever the message claims.
 */
int logbatch_decode(const json_t *msg, void (*cb)(void *ud, const struct log_record *r), void *ud,
                    char *err, size_t errlen);

#endif
