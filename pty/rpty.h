/*
 * rpty: reconnecting PTYs. A session is a process on a PTY, named by a client-chosen id,
 * that outlives its clients: they attach, detach and attach again, and each attach first
 * receives the output the session kept (pty/ring), then live output. Several clients may be
 * attached at once: all see the output, any may type, the last resize wins.
 *
 * A session with no client attached ends after the TTL. A process that exits ends its
 * session and tells every attached client its exit status; if none is attached, the
 * session keeps the status and the last output for the next attach (or until the TTL).
 *
 * No tunnel here: clients are a table of callbacks (the agent's pty streams).
 */
#ifndef TETHER_RPTY_H
#define TETHER_RPTY_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "proc.h"
#include "ring.h"

#define RPTY_ID_SIZE 16
#define RPTY_DEFAULT_TTL_MS (5u * 60 * 1000)
#define RPTY_DEFAULT_MAX 32u        /* sessions per agent */
#define RPTY_INPUT_MAX (64u * 1024) /* input queued while the PTY does not read */
#define RPTY_READ_MAX (64u * 1024)  /* one read of output */
#define RPTY_MIN_SIZE 1u            /* rows and cols are clamped to these */
#define RPTY_MAX_ROWS 1000u
#define RPTY_MAX_COLS 1000u

struct rpty_config {
    size_t ring_size;      /* replay bytes kept per session (RING_DEFAULT_CAP) */
    uint64_t ttl_ms;       /* a session with no client ends after this */
    unsigned max_sessions; /* more are refused */
};
void rpty_config_default(struct rpty_config *cfg);

struct rpty;
struct rpty_attachment;

struct rpty_client_ops {
    /* Output (the replay first, then live); borrowed for the call. */
    void (*output)(void *ud, const uint8_t *data, size_t len);
    /* The process ended (how 0: exit code, 1: signal). The attachment is gone when this
     * returns: do not detach it. */
    void (*exited)(void *ud, int how, int value);
    /* The session's input queue has room again after rpty_input took less than offered. */
    void (*input_ready)(void *ud);
};

struct rpty_registry {
    uv_loop_t *loop;
    struct proc_reaper *reaper;
    struct rpty_config cfg;
    struct rpty *sessions;
    unsigned count;
};

void rpty_registry_init(struct rpty_registry *r, uv_loop_t *loop, struct proc_reaper *reaper,
                        const struct rpty_config *cfg);
/* Ends every session (their process groups get SIGHUP). Handles close from the loop. */
void rpty_registry_close(struct rpty_registry *r);

/*
 * Attaches to session id, starting it from spec (path, argv, envp, cwd, nice, oom; the PTY
 * is made here) if it does not exist. rows and cols are clamped. Delivers the replay
 * through ops->output before returning. Returns 0 with *out set, or 0 with *out NULL when
 * the session had already ended (ops->exited was called after the replay: the session is
 * gone now), or -EAGAIN (too many sessions), -ENOMEM, or a spawn error (negative errno).
 */
int rpty_attach(struct rpty_registry *r, const uint8_t id[RPTY_ID_SIZE], unsigned rows,
                unsigned cols, const struct proc_spec *spec, const struct rpty_client_ops *ops,
                void *ud, struct rpty_attachment **out);
/* True if session id exists (attaching to it starts nothing). */
bool rpty_exists(struct rpty_registry *r, const uint8_t id[RPTY_ID_SIZE]);
/* Terminal input: returns the bytes taken (fewer when the queue is full: input_ready
 * follows once there is room). */
size_t rpty_input(struct rpty_attachment *a, const uint8_t *data, size_t len);
void rpty_resize(struct rpty_attachment *a, unsigned rows, unsigned cols);
/* The client leaves; the session lives on (for its TTL if it was the last). */
void rpty_detach(struct rpty_attachment *a);

#endif
