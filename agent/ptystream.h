/*
 * ptystream: tunnel streams of kind pty, served by the agent: each one is an attachment to
 * a reconnecting PTY (pty/rpty). The stream's bytes are records (PROTOCOL.md 3.2), through
 * zlib when the OPEN asked for it; output goes out under the stream's credit, and an
 * attachment whose reader falls too far behind is dropped (RST FLOW): it can reattach and
 * get the replay.
 */
#ifndef TETHER_PTYSTREAM_H
#define TETHER_PTYSTREAM_H

#include <stdint.h>

#include "activity.h"
#include "gate.h"
#include "proto/proto.h"
#include "pty/rpty.h"
#include "tunnel/mux.h"

/* Output waiting for credit beyond the replay buffer: past this the attachment is dropped. */
#define PTYSTREAM_BACKLOG_SLACK (1024u * 1024)
/* Inflated input waiting to become records (one record plus one inflate step). */
#define PTYSTREAM_INFLATE_STEP (16u * 1024)

/* What a new PTY runs: the agent's login shell or a command, with its environment. */
struct ptystream_env {
    const char *shell; /* absolute path */
    char *const *envp; /* the session environment (TERM included) */
    const char *cwd;
    int oom_score_adj;
    int nice;
    struct activity *activity; /* input counts as activity; may be NULL */
    /* A new PTY waits while this is closed (a login-blocking startup script runs): the
     * stream is accepted, shows the gate's notice, and the shell starts once it opens. Input
     * meanwhile waits too. Reattaching to a PTY that exists never waits. NULL: no gate. */
    struct gate *gate;
};

/*
 * Serves a pty OPEN on stream id: attaches (starting the PTY if its id is new) and accepts,
 * or rejects with a reason (too many PTYs: STREAM_LIMIT). The object becomes the stream's
 * user pointer (a struct agent_stream) and frees itself. env is copied where the start must
 * wait for the gate.
 */
void ptystream_open(struct rpty_registry *reg, const struct ptystream_env *env, struct mux *m,
                    uint32_t id, const struct proto_open *o);

#endif
