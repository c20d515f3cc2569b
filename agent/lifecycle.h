/*
 * lifecycle: the workspace's states (PROTOCOL.md 12.7) and the scripts that move them.
 *
 *   created -> starting -> ready | start_error | start_timeout
 *           -> shutting_down -> [shutdown_error | shutdown_timeout] -> off
 *
 * States only move forward. Startup begins with the first manifest (once per agent
 * process): the --startup-script, the manifest's "run_on": "start" scripts and
 * devcontainer.json's postStartCommand run in parallel, each with its timeout; `ready`
 * when all exit 0, `start_timeout` if one timed out (its process group is killed), else
 * `start_error` if one failed. While a login-blocking script runs, the gate is closed and
 * new sessions wait (gate.h). devcontainer.json's postAttachCommand runs when the first
 * session starts; its remoteEnv goes into every session (sshd_set_extra_env) and its
 * forwardPorts into the ports report.
 *
 * Every transition is logged ("lifecycle: STATE"), and reported to the relay while
 * connected; the current state again after each reconnect.
 */
#ifndef TETHER_LIFECYCLE_H
#define TETHER_LIFECYCLE_H

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#include "agentlog.h"
#include "gate.h"
#include "ports.h"
#include "proto/proto.h"
#include "sshd.h"

#define LIFECYCLE_STARTUP_TIMEOUT_MS (5u * 60 * 1000)
#define LIFECYCLE_SHUTDOWN_TIMEOUT_MS (60u * 1000)

struct lifecycle_config {
    const char *startup_script; /* shell text, or NULL */
    uint64_t startup_timeout_ms;
    bool startup_blocks_login;
    const char *shutdown_script; /* shell text, or NULL */
    uint64_t shutdown_timeout_ms;
};
void lifecycle_config_default(struct lifecycle_config *cfg);

struct lifecycle;

/*
 * Scripts run as session processes of sshd (its environment, directory and reaper); their
 * output goes to log; report(ud, msg) sends a "lifecycle" message (borrowed) while
 * connected; ports gets devcontainer.json's forwardPorts. cfg must outlive the lifecycle.
 */
struct lifecycle *lifecycle_new(uv_loop_t *loop, const struct lifecycle_config *cfg,
                                struct sshd *sshd, struct agentlog *log,
                                struct ports_scanner *ports, void (*report)(void *ud, json_t *msg),
                                void *ud);
/* The sessions' gate (closed while a login-blocking script runs). */
struct gate *lifecycle_gate(struct lifecycle *lc);
/* A manifest arrived (validated): the first one starts the workspace. */
void lifecycle_manifest(struct lifecycle *lc, const json_t *manifest);
/* The tunnel is up: the current state is reported again. */
void lifecycle_connected(struct lifecycle *lc);
/* A PROTO_LC_* state. */
enum proto_lifecycle lifecycle_state(const struct lifecycle *lc);

/*
 * Moves to shutting_down, stops the startup scripts still running, runs the shutdown
 * scripts (the flag's and the manifest's "run_on": "stop"), each with its timeout, and
 * calls done when they ended (shutdown_error / shutdown_timeout first if one failed).
 */
void lifecycle_shut_down(struct lifecycle *lc, void (*done)(void *arg), void *arg);
/* The sessions are gone: off. */
void lifecycle_off(struct lifecycle *lc);
/* Kills what still runs and frees the lifecycle (before sshd, whose reaper it uses). */
void lifecycle_free(struct lifecycle *lc);

#endif
