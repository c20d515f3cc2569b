/*
 * ring: the replay buffer of a reconnecting PTY. It keeps the last `cap` bytes of output,
 * so a client that attaches (again) first sees what it missed, in order, once.
 *
 * Memory is allocated on the first write, at most cap bytes, and never grows. Positions are
 * counted over the PTY's whole life (a u64 never wraps in practice), so a caller can tell
 * how much of the output has fallen out of the buffer.
 */
#ifndef TETHER_RING_H
#define TETHER_RING_H

#include <stddef.h>
#include <stdint.h>

#define RING_DEFAULT_CAP (256u * 1024)
#define RING_MIN_CAP 1024u
#define RING_MAX_CAP (64u * 1024 * 1024)

struct ring {
    uint8_t *buf;   /* NULL until the first write */
    size_t cap;     /* RING_MIN_CAP..RING_MAX_CAP */
    uint64_t total; /* bytes ever written */
};

/* cap is clamped to RING_MIN_CAP..RING_MAX_CAP. Allocates nothing yet. */
void ring_init(struct ring *r, size_t cap);
void ring_free(struct ring *r);

/* Appends len bytes, dropping the oldest beyond cap. Returns 0 or -ENOMEM (the first
 * write allocates; nothing is kept then). */
int ring_write(struct ring *r, const uint8_t *data, size_t len);

/* Bytes held now: min(total, cap). */
size_t ring_len(const struct ring *r);

/*
 * The held bytes, oldest first, as at most two pieces (the buffer wraps). Returns the
 * number of pieces (0, 1 or 2); the pointers stay valid until the next write or free.
 */
int ring_pieces(const struct ring *r, const uint8_t *piece[2], size_t len[2]);

#endif
