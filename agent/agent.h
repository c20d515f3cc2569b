/*
 * agent: the workspace agent daemon. Dials the relay (tunnel/dial), introduces itself with
 * a hello, and serves the streams the relay opens: tcp forwards, ssh, and reconnecting
 * PTYs, which outlive the tunnel (a relay restart or a network drop loses no shell).
 */
#ifndef TETHER_AGENT_H
#define TETHER_AGENT_H

#include <uv.h>

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
/*
 * sshd may be NULL (ssh and pty streams are then refused); the agent frees it when it stops.
 * pty_cfg: the reconnecting PTYs' settings (NULL: defaults).
 */
struct agent *agent_new(uv_loop_t *loop, const struct dial_config *cfg, struct sshd *sshd,
                        const struct rpty_config *pty_cfg, void (*on_shutdown)(void *arg),
                        void *arg);
void agent_start(struct agent *a);
/* Says goodbye to the relay, closes every stream, frees the agent, then calls done. */
void agent_stop(struct agent *a, void (*done)(void *arg), void *arg);

#endif
