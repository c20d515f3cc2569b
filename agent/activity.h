/*
 * activity: what the agent counts to tell whether anyone is really working in the
 * workspace (PROTOCOL.md 12.5). Activity is bytes a person or tool sends into the
 * workspace: SSH channel data from the client, PTY input, port-forward traffic either way.
 * Keepalives, window and credit updates, resizes and silent sessions are not.
 *
 * One per agent, owned by it; the stream handlers hold a pointer and call activity_note.
 */
#ifndef TETHER_ACTIVITY_H
#define TETHER_ACTIVITY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "clock.h"

enum activity_kind { ACTIVITY_SSH, ACTIVITY_SFTP, ACTIVITY_PTY, ACTIVITY_FORWARD, ACTIVITY_KINDS };

struct activity {
    uv_loop_t *loop;
    uint64_t start_mono_ms; /* when the agent started (uv_now) */
    uint64_t last_mono_ms;  /* of the last activity; 0 = none yet */
    int64_t last_unix_ms;
    uint64_t rx[ACTIVITY_KINDS]; /* bytes into the workspace */
    uint64_t tx[ACTIVITY_KINDS]; /* bytes out of it */
};

static inline const char *activity_kind_name(enum activity_kind k)
{
    static const char *const names[ACTIVITY_KINDS] = {"ssh", "sftp", "pty", "forward"};
    return names[k];
}

static inline void activity_init(struct activity *a, uv_loop_t *loop)
{
    *a = (struct activity){.loop = loop, .start_mono_ms = uv_now(loop)};
}

/* Someone acted without sending bytes (an SSH exec, shell or subsystem request). */
static inline void activity_touch(struct activity *a)
{
    if (!a)
        return;
    a->last_mono_ms = uv_now(a->loop);
    a->last_unix_ms = clock_unix_ms();
}

/* rx bytes came in, tx went out; active: this counts as someone working. */
static inline void activity_note(struct activity *a, enum activity_kind k, size_t rx, size_t tx,
                                 int active)
{
    if (!a)
        return;
    a->rx[k] += rx;
    a->tx[k] += tx;
    if (active && (rx || tx))
        activity_touch(a);
}

/* Milliseconds since the last activity, or since the start if there was none. */
static inline uint64_t activity_idle_ms(const struct activity *a)
{
    uint64_t since = a->last_mono_ms ? a->last_mono_ms : a->start_mono_ms;
    uint64_t now = uv_now(a->loop);
    return now > since ? now - since : 0;
}

#endif
