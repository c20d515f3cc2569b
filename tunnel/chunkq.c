#include "chunkq.h"

#include <stdlib.h>
#include <string.h>

struct chunk {
    struct chunk *next;
    size_t head; /* offset of the first unread byte in data (>= headroom) */
    size_t tail; /* offset one past the last written byte */
    uint8_t data[];
};

void chunkq_init(struct chunkq *q, size_t headroom)
{
    memset(q, 0, sizeof(*q));
    q->headroom = headroom;
}

void chunkq_free(struct chunkq *q)
{
    struct chunk *c = q->first;
    while (c) {
        struct chunk *next = c->next;
        free(c);
        c = next;
    }
    free(q->spare);
    q->first = q->last = q->spare = NULL;
    q->len = 0;
}

static size_t block_end(const struct chunkq *q)
{
    return q->headroom + CHUNKQ_BLOCK;
}

/* A block ready for writing: the spare if there is one. Not yet linked in. */
static struct chunk *block_take(struct chunkq *q)
{
    struct chunk *c = q->spare;
    if (c)
        q->spare = NULL;
    else if (!(c = malloc(sizeof(*c) + q->headroom + CHUNKQ_BLOCK)))
        return NULL;
    c->next = NULL;
    c->head = c->tail = q->headroom;
    return c;
}

static void block_link(struct chunkq *q, struct chunk *c)
{
    if (q->last)
        q->last->next = c;
    else
        q->first = c;
    q->last = c;
}

/* A block no longer needed: kept as the spare, or freed. */
static void block_drop(struct chunkq *q, struct chunk *c)
{
    if (!q->spare)
        q->spare = c;
    else
        free(c);
}

uint8_t *chunkq_tail(struct chunkq *q, size_t min_room, size_t *room)
{
    struct chunk *c = q->last;
    if (!c || block_end(q) - c->tail < min_room || block_end(q) == c->tail) {
        if (!(c = block_take(q)))
            return NULL;
        block_link(q, c);
    }
    *room = block_end(q) - c->tail;
    return c->data + c->tail;
}

void chunkq_commit(struct chunkq *q, size_t n)
{
    q->last->tail += n;
    q->len += n;
}

int chunkq_append(struct chunkq *q, const void *p, size_t n)
{
    /* Take every block needed before copying, so a failure appends nothing. */
    size_t have = q->last ? block_end(q) - q->last->tail : 0;
    size_t blocks = n > have ? (n - have + CHUNKQ_BLOCK - 1) / CHUNKQ_BLOCK : 0;
    struct chunk *fresh = NULL, **link = &fresh;
    for (size_t i = 0; i < blocks; i++) {
        struct chunk *c = block_take(q);
        if (!c) {
            while (fresh) {
                struct chunk *next = fresh->next;
                block_drop(q, fresh);
                fresh = next;
            }
            return -1;
        }
        *link = c;
        link = &c->next;
    }
    const uint8_t *src = p;
    struct chunk *c = q->last && have ? q->last : NULL;
    while (n > 0) {
        if (!c || c->tail == block_end(q)) {
            c = fresh;
            fresh = fresh->next;
            c->next = NULL;
            block_link(q, c);
        }
        size_t k = block_end(q) - c->tail;
        if (k > n)
            k = n;
        memcpy(c->data + c->tail, src, k);
        c->tail += k;
        q->len += k;
        src += k;
        n -= k;
    }
    return 0;
}

uint8_t *chunkq_front(struct chunkq *q, size_t *n)
{
    struct chunk *c = q->first;
    /* Only the last block can be empty (a read into it found nothing). */
    if (!c || c->head == c->tail) {
        *n = 0;
        return NULL;
    }
    *n = c->tail - c->head;
    return c->data + c->head;
}

void chunkq_consume(struct chunkq *q, size_t n)
{
    q->len -= n;
    while (n > 0) {
        struct chunk *c = q->first;
        size_t k = c->tail - c->head;
        if (k > n)
            k = n;
        c->head += k;
        n -= k;
        if (c->head == c->tail) {
            q->first = c->next;
            if (!q->first)
                q->last = NULL;
            block_drop(q, c);
        }
    }
}
