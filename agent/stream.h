/*
 * stream: what the agent attaches to every tunnel stream it serves. Each stream kind (tcp
 * now; ssh and pty later) embeds struct agent_stream first and supplies one table of
 * handlers, so the tunnel's callbacks dispatch without knowing the kinds.
 */
#ifndef TETHER_AGENT_STREAM_H
#define TETHER_AGENT_STREAM_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * The reason given when a stream is refused because the agent has no descriptor left:
 * the same words for every kind, so a user can tell it from a refusal by the target.
 */
#define STREAM_OUT_OF_FDS "agent is out of file descriptors"

/* True for a negative error code (errno or libuv's) that means the descriptor limit. */
static inline bool stream_out_of_fds(int rc)
{
    return rc == -EMFILE || rc == -ENFILE;
}

struct stream_ops {
    /* DATA from the peer; report drained bytes with mux_stream_consumed. */
    void (*data)(void *s, const uint8_t *data, size_t len);
    /* The peer sent FIN. */
    void (*fin)(void *s);
    /* The stream has send credit again. */
    void (*writable)(void *s);
    /* The stream is gone (code 0: both ends finished); the mux forgets the id. */
    void (*closed)(void *s, uint32_t code);
};

struct agent_stream {
    const struct stream_ops *ops;
};

#endif
