/*
 * chunkq: a FIFO of bytes in fixed-size blocks, for bytes on their way to a websocket.
 *
 * Two properties make it cheap on the data path: bytes are never moved once written (no
 * sliding, no reallocation), and the front bytes always have `headroom` writable bytes in
 * front of them in the same block, where a websocket frame header can be written in place
 * (lws_write needs LWS_PRE there; wsc_write needs WSC_PRE). Sockets can read straight into
 * the tail (chunkq_tail / chunkq_commit), so a byte is copied only by the kernel.
 *
 * The caller bounds the queue's length (by credit or a window); a drained queue keeps one
 * spare block so that a steady stream allocates nothing.
 */
#ifndef TETHER_CHUNKQ_H
#define TETHER_CHUNKQ_H

#include <stddef.h>
#include <stdint.h>

#define CHUNKQ_BLOCK (64u * 1024) /* payload bytes per block */

struct chunk;

struct chunkq {
    struct chunk *first;
    struct chunk *last;
    struct chunk *spare;
    size_t len;      /* bytes queued */
    size_t headroom; /* bytes kept free in front of every block's payload */
};

void chunkq_init(struct chunkq *q, size_t headroom);
void chunkq_free(struct chunkq *q);

/* Appends n bytes (copied). Returns 0 or -1 (out of memory: nothing appended). */
int chunkq_append(struct chunkq *q, const void *p, size_t n);
/*
 * Free space at the tail to read into: at least min_room bytes (min_room <= CHUNKQ_BLOCK).
 * Returns NULL (out of memory) or a pointer; *room says how much is there.
 */
uint8_t *chunkq_tail(struct chunkq *q, size_t min_room, size_t *room);
/* Adds n bytes just written at chunkq_tail's pointer. */
void chunkq_commit(struct chunkq *q, size_t n);

/*
 * The contiguous bytes at the front (at most one block): *n says how many. The q->headroom
 * bytes before the returned pointer may be overwritten. NULL when the queue is empty.
 */
uint8_t *chunkq_front(struct chunkq *q, size_t *n);
void chunkq_consume(struct chunkq *q, size_t n);

#endif
