/*
 * agent: the workspace agent daemon. Dials the relay (tunnel/dial), introduces itself with
 * a hello, and serves the streams the relay opens: tcp forwards, ssh, and reconnecting
 * PTYs, which outlive the tunnel (a relay restart or a network drop loses no shell).
 */
#ifndef TETHER_AGENT_H
#define TETHER_AGENT_H

#include <uv.h>

#include "lifecycle.h"
#include "pty/rpty.h"
#include "sshd.h"
#include "tunnel/dial.h"
#include "tunnel/wsctx.h"

struct agent;

/*
 * cfg (and the token it points to) must outlive the agent. on_shutdown (may be NULL) is
 * called when the relay asks the agent to shut down (control message "shutdown"): the
 * caller stops the agent and does not reconnect.
 */
struct agent_options {
    const struct rpty_config *pty;            /* reconnecting PTYs; NULL: defaults */
    const struct lifecycle_config *lifecycle; /* startup/shutdown scripts; NULL: none */
    uint64_t ports_interval_ms;               /* 0: PORTS_SCAN_MS_DEFAULT */
    uint64_t ports_idle_after_ms;             /* 0: PORTS_IDLE_AFTER_MS */
    const struct fwdpolicy *forward_policy;   /* targets of tcp streams; NULL: loopback */
    /* The agent's own log lines stay on stderr, not in the workspace's logs (the demo,
     * whose relay logs to the same stderr from the same process). */
    bool keep_log_local;
};

/*
 * sshd may be NULL (ssh and pty streams are then refused, and there is no lifecycle: its
 * scripts run as sessions do); the agent frees it when it stops. opts (NULL: defaults) and
 * what it points to must outlive the agent. While the agent runs, its info, warn and error
 * log lines also go to the relay (tunnel/log.h's sink) unless opts->keep_log_local.
 */
struct agent *agent_new(uv_loop_t *loop, const struct dial_config *cfg, struct sshd *sshd,
                        const struct agent_options *opts, void (*on_shutdown)(void *arg),
                        void *arg);
void agent_start(struct agent *a);
/*
 * The shutdown (PROTOCOL.md 12.7): shutting_down, the shutdown scripts, every session hung
 * up (SIGHUP, SSHD_HANGUP_GRACE_MS, then SIGKILL), off, the logs flushed, GOAWAY to the
 * relay; then frees the agent and calls done.
 */
void agent_stop(struct agent *a, void (*done)(void *arg), void *arg);

#endif
