/*
 * logring: the last log lines of one workspace, as the relay keeps them (PROTOCOL.md 14.4.2).
 *
 * Every line appended gets the next number n (1, 2, 3, ...; never reused for the ring's
 * life), so a reader can ask for the lines after the last one it saw. The ring keeps at most
 * max_lines lines and at most max_bytes bytes of them (each line costs LOGRING_LINE_COST
 * plus its text and source); the oldest lines are pushed out first. Memory is taken as lines
 * arrive, never for the whole capacity up front: an idle workspace's ring costs nothing but
 * the struct.
 */
#ifndef TETHER_LOGRING_H
#define TETHER_LOGRING_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define LOGRING_MAX_TEXT 4096u     /* bytes of a line's text kept (longer text is cut) */
#define LOGRING_MAX_SOURCE 64u     /* bytes of a line's source kept */
#define LOGRING_MAX_LINES 1000000u /* largest max_lines */
#define LOGRING_MIN_SLOTS 16u      /* the first slot array; it doubles up to max_lines */

/* One kept line, in one allocation: text NUL source NUL (see logring_source). */
struct logring_line {
    uint64_t n;
    int64_t time_ms;
    uint16_t text_len;
    uint8_t source_len;
    char text[];
};

static inline const char *logring_source(const struct logring_line *l)
{
    return l->text + l->text_len + 1;
}

/* What a line costs besides its text and source: the struct and two NULs. */
#define LOGRING_LINE_COST (sizeof(struct logring_line) + 2)
/*
 * The most one line can cost. max_lines * this bounds the lines whatever they are; the slot
 * array adds at most max_lines pointers.
 */
#define LOGRING_LINE_MAX_COST (LOGRING_LINE_COST + LOGRING_MAX_TEXT + LOGRING_MAX_SOURCE)

struct logring {
    struct logring_line **slots; /* cap slots; count lines from head, wrapping */
    size_t cap, head, count;
    size_t max_lines, max_bytes;
    size_t bytes;    /* what the kept lines cost: LOGRING_LINE_COST + text + source each */
    uint64_t next_n; /* the number the next line gets */
};

/*
 * An empty ring (allocates nothing). max_lines is clamped to 1..LOGRING_MAX_LINES and
 * max_bytes raised to at least LOGRING_LINE_MAX_COST, so any one line fits.
 */
void logring_init(struct logring *r, size_t max_lines, size_t max_bytes);
/* Frees every line; the ring is empty (and usable) again, its numbering goes on. */
void logring_clear(struct logring *r);
void logring_free(struct logring *r);

/*
 * Copies one line in, pushing out the oldest lines as the limits need. text is cut to
 * LOGRING_MAX_TEXT bytes and source to LOGRING_MAX_SOURCE, on a UTF-8 character boundary;
 * callers pass valid UTF-8. Returns 0, or -1 (out of memory: the line is not kept, and
 * takes no number).
 */
int logring_append(struct logring *r, int64_t time_ms, const char *source, size_t source_len,
                   const char *text, size_t text_len);

/* The number of the oldest kept line; logring_next() if the ring is empty. */
uint64_t logring_first(const struct logring *r);
/* The number the next appended line will get (1 for a new ring). */
uint64_t logring_next(const struct logring *r);
/* The kept line numbered n, or NULL (pushed out, or not there yet). */
const struct logring_line *logring_get(const struct logring *r, uint64_t n);

/*
 * Calls cb for each kept line with n > after, oldest first, until cb returns non-zero (it
 * refuses that line: it is not taken). Returns the number of the first line not taken, where
 * a reader goes on: logring_next() when cb took them all.
 */
uint64_t logring_each_after(const struct logring *r, uint64_t after,
                            int (*cb)(void *ud, const struct logring_line *line), void *ud);

/*
 * The reply of GET .../logs?after=AFTER: {"lines": [{"n", "time", "source", "text"}...],
 * "first": F, "next": N}, with the lines after `after` but at most max_lines of them and,
 * past the first line, at most max_text bytes of text; "next" is where the next request
 * starts (after=next-1). A new reference, or NULL (out of memory).
 */
json_t *logring_json(const struct logring *r, uint64_t after, size_t max_lines, size_t max_text);

#endif
