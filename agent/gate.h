/*
 * gate: where new sessions wait while a login-blocking startup script runs (PROTOCOL.md
 * 12.7, lifecycle). The lifecycle closes and opens it; the SSH server and the reconnecting
 * PTYs ask it before they start a process. A closed gate keeps a list of waiters, each
 * embedded in the session that waits; a session that goes away first cancels its waiter.
 *
 * The gate also tells its owner once when the first session starts (devcontainer.json's
 * postAttachCommand runs then).
 */
#ifndef TETHER_GATE_H
#define TETHER_GATE_H

#include <stdbool.h>
#include <stddef.h>

struct gate_waiter {
    struct gate_waiter *prev, *next; /* NULL while not waiting */
    void (*open)(struct gate_waiter *w);
};

struct gate {
    bool closed;
    const char *notice;      /* what an interactive session that waits is told (ends in \r\n) */
    struct gate_waiter list; /* sentinel of a circular list */
    bool session_seen;
    void (*first_session)(void *ud); /* may be NULL */
    void *ud;
};

#define GATE_NOTICE "tether: waiting for the workspace's startup script to finish...\r\n"

static inline void gate_init(struct gate *g)
{
    *g = (struct gate){.notice = GATE_NOTICE, .list = {.prev = &g->list, .next = &g->list}};
}

/* True if a session must wait. A NULL gate never holds anyone. */
static inline bool gate_closed(const struct gate *g)
{
    return g && g->closed;
}

static inline bool gate_waiting(const struct gate_waiter *w)
{
    return w->next != NULL;
}

/* w->open runs once the gate opens (never from inside this call). */
static inline void gate_wait(struct gate *g, struct gate_waiter *w,
                             void (*open)(struct gate_waiter *))
{
    w->open = open;
    w->prev = g->list.prev;
    w->next = &g->list;
    g->list.prev->next = w;
    g->list.prev = w;
}

static inline void gate_cancel(struct gate_waiter *w)
{
    if (!gate_waiting(w))
        return;
    w->prev->next = w->next;
    w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

/* Opens the gate and lets every waiter go, in the order they came. A waiter's open may
 * cancel others: each is unlinked before its call. */
static inline void gate_open(struct gate *g)
{
    g->closed = false;
    while (g->list.next != &g->list) {
        struct gate_waiter *w = g->list.next;
        gate_cancel(w);
        w->open(w);
    }
}

/* The gate goes away: its waiters are let go without a call (they wait on until their
 * sessions end, which the owner sees to). */
static inline void gate_abandon(struct gate *g)
{
    while (g->list.next != &g->list)
        gate_cancel(g->list.next);
}

/* A session (shell, command or terminal) started: the owner hears of the first one. */
static inline void gate_session_started(struct gate *g)
{
    if (!g || g->session_seen)
        return;
    g->session_seen = true;
    if (g->first_session)
        g->first_session(g->ud);
}

#endif
