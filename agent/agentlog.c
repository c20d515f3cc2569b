#include "agentlog.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "proto/logbatch.h"
#include "proto/proto.h"

/* A batch that waits for the relay, as its message (already compressed). */
struct pending {
    struct pending *next;
    json_t *msg;
    size_t raw; /* bytes of records it holds, counted against the backlog */
};

struct agentlog {
    uv_timer_t timer; /* first member: the handle's memory is the object's */
    int (*send)(void *ud, json_t *msg);
    void *ud;
    bool connected;
    bool closing;
    struct logbatch batch; /* being filled */
    uint64_t seq;          /* of the last batch made */
    struct pending *head, **tail;
    size_t backlog; /* raw bytes in the pending list */
    unsigned long long dropped;
};

static void on_timer(uv_timer_t *t)
{
    agentlog_flush((struct agentlog *)t);
}

struct agentlog *agentlog_new(uv_loop_t *loop, int (*send)(void *ud, json_t *msg), void *ud)
{
    struct agentlog *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    uv_timer_init(loop, &l->timer);
    l->send = send;
    l->ud = ud;
    l->tail = &l->head;
    logbatch_init(&l->batch);
    return l;
}

static void add(struct agentlog *l, int64_t t, const char *source, const char *text, size_t len);
static void note_dropped(struct agentlog *l);

/* Offers the waiting batches in order; one the tunnel does not take waits for the timer. */
static void send_pending(struct agentlog *l)
{
    while (l->connected && l->head) {
        struct pending *p = l->head;
        if (l->send(l->ud, p->msg) < 0) {
            if (!uv_is_active((uv_handle_t *)&l->timer))
                uv_timer_start(&l->timer, on_timer, AGENTLOG_FLUSH_MS, 0);
            return;
        }
        l->head = p->next;
        if (!l->head)
            l->tail = &l->head;
        l->backlog -= p->raw;
        json_decref(p->msg);
        free(p);
    }
    note_dropped(l);
}

void agentlog_flush(struct agentlog *l)
{
    uv_timer_stop(&l->timer);
    if (l->batch.lines == 0) {
        send_pending(l);
        return;
    }
    json_t *msg = logbatch_message(&l->batch, ++l->seq);
    size_t raw = l->batch.len;
    logbatch_init(&l->batch);
    struct pending *p = msg ? malloc(sizeof(*p)) : NULL;
    if (!p) { /* out of memory: the relay sees the seq gap and says so */
        json_decref(msg);
        send_pending(l);
        return;
    }
    *p = (struct pending){.msg = msg, .raw = raw};
    *l->tail = p;
    l->tail = &p->next;
    l->backlog += raw;
    send_pending(l);
}

/* Appends a record, sending the batch first if it is full. */
static void add(struct agentlog *l, int64_t t, const char *source, const char *text, size_t len)
{
    int rc = logbatch_add(&l->batch, t, source, text, len);
    if (rc == PROTO_E_LENGTH) {
        agentlog_flush(l);
        rc = logbatch_add(&l->batch, t, source, text, len);
    }
    if (rc < 0)
        return; /* a bad source is the caller's bug; such lines cannot be sent */
    if (!uv_is_active((uv_handle_t *)&l->timer))
        uv_timer_start(&l->timer, on_timer, AGENTLOG_FLUSH_MS, 0);
}

/* Lines were dropped and there is room again: one marker says how many, where they were. */
static void note_dropped(struct agentlog *l)
{
    if (!l->dropped || l->closing || l->backlog + l->batch.len >= AGENTLOG_BACKLOG_MAX)
        return;
    char marker[160];
    int n = snprintf(marker, sizeof(marker),
                     "[tether: %llu log lines dropped here: the relay was unreachable or slow "
                     "and %u bytes were waiting]",
                     l->dropped, AGENTLOG_BACKLOG_MAX);
    l->dropped = 0;
    add(l, clock_unix_ms(), "agent", marker, (size_t)n);
}

void agentlog_line(struct agentlog *l, const char *source, const char *text, size_t len)
{
    if (l->closing)
        return;
    note_dropped(l);
    if (l->dropped || l->backlog + l->batch.len >= AGENTLOG_BACKLOG_MAX) {
        l->dropped++; /* still no room (or the marker could not go in yet): keep counting */
        return;
    }
    add(l, clock_unix_ms(), source, text, len);
}

void agentlog_connected(struct agentlog *l, bool up)
{
    l->connected = up;
    if (up)
        send_pending(l);
}

static void on_closed(uv_handle_t *h)
{
    free(h); /* the timer is the first member */
}

void agentlog_free(struct agentlog *l)
{
    if (!l)
        return;
    l->closing = true;
    while (l->head) {
        struct pending *p = l->head;
        l->head = p->next;
        json_decref(p->msg);
        free(p);
    }
    uv_close((uv_handle_t *)&l->timer, on_closed);
}
