#include "ring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void ring_init(struct ring *r, size_t cap)
{
    r->buf = NULL;
    r->cap = cap < RING_MIN_CAP ? RING_MIN_CAP : cap > RING_MAX_CAP ? RING_MAX_CAP : cap;
    r->total = 0;
}

void ring_free(struct ring *r)
{
    free(r->buf);
    r->buf = NULL;
}

size_t ring_len(const struct ring *r)
{
    return r->total < r->cap ? (size_t)r->total : r->cap;
}

int ring_write(struct ring *r, const uint8_t *data, size_t len)
{
    if (len == 0)
        return 0;
    if (!r->buf && !(r->buf = malloc(r->cap)))
        return -ENOMEM;
    /* Only the last cap bytes of a long write can survive it. */
    if (len > r->cap) {
        r->total += len - r->cap;
        data += len - r->cap;
        len = r->cap;
    }
    size_t at = (size_t)(r->total % r->cap);
    size_t first = r->cap - at < len ? r->cap - at : len;
    memcpy(r->buf + at, data, first);
    memcpy(r->buf, data + first, len - first);
    r->total += len;
    return 0;
}

int ring_pieces(const struct ring *r, const uint8_t *piece[2], size_t len[2])
{
    size_t held = ring_len(r);
    if (held == 0 || !r->buf)
        return 0;
    size_t end = (size_t)(r->total % r->cap); /* where the next byte goes */
    if (r->total <= r->cap || end == 0) {
        /* Not wrapped yet, or wrapped exactly: one piece. */
        size_t start = r->total <= r->cap ? 0 : end;
        piece[0] = r->buf + start;
        len[0] = held;
        return 1;
    }
    piece[0] = r->buf + end;
    len[0] = r->cap - end;
    piece[1] = r->buf;
    len[1] = end;
    return 2;
}
