/*
 * bytebuf: a FIFO of bytes in one contiguous allocation, used where bytes wait between a
 * socket and a stream. The caller bounds its size (by credit or a window); bytebuf itself
 * only grows to what it is asked to hold.
 */
#ifndef TETHER_BYTEBUF_H
#define TETHER_BYTEBUF_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct bytebuf {
    uint8_t *data;
    size_t head; /* first unread byte */
    size_t len;  /* unread bytes */
    size_t cap;
};

/* Appends n bytes. Returns 0 or -1 (out of memory; nothing appended). */
static inline int bytebuf_append(struct bytebuf *b, const void *p, size_t n)
{
    if (n == 0)
        return 0; /* memcpy wants real pointers even for no bytes, and data may be NULL */
    if (b->head + b->len + n > b->cap) {
        if (b->head > 0) { /* slide unread bytes to the front before growing */
            memmove(b->data, b->data + b->head, b->len);
            b->head = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 4096;
            while (cap < b->len + n)
                cap *= 2;
            uint8_t *d = realloc(b->data, cap);
            if (!d)
                return -1;
            b->data = d;
            b->cap = cap;
        }
    }
    memcpy(b->data + b->head + b->len, p, n);
    b->len += n;
    return 0;
}

static inline const uint8_t *bytebuf_peek(const struct bytebuf *b)
{
    return b->data + b->head;
}

static inline void bytebuf_consume(struct bytebuf *b, size_t n)
{
    b->head += n;
    b->len -= n;
    if (b->len == 0)
        b->head = 0;
}

static inline void bytebuf_free(struct bytebuf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

#endif
