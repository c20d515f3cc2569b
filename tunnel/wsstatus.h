/*
 * wsstatus: what the relay knows of one workspace from its agent's control messages (stats,
 * ports, lifecycle, metadata, logs; PROTOCOL.md 12) and how the API shows it (14.3).
 *
 * Messages arrive validated by proto_control_validate; what is kept is still the agent's
 * word, bounded by the protocol's limits: at most PROTO_MAX_METADATA metadata keys, and the
 * log ring's lines (logring.h). No I/O; the caller passes the clocks.
 */
#ifndef TETHER_WSSTATUS_H
#define TETHER_WSSTATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "logring.h"

/* Marker lines the relay stores among the agent's (source "relay"). */
#define WSSTATUS_LOG_SOURCE "relay"

struct wsstatus {
    json_t *stats;                /* the agent's last stats message, or NULL */
    uint64_t stats_mono_ms;       /* when it arrived, on the caller's monotonic clock */
    json_t *ports;                /* the last ports list, or NULL */
    json_t *forward_ports;        /* the last ports message's forward_ports, or NULL */
    int lifecycle;                /* enum proto_lifecycle, or -1 before the agent reported one */
    int64_t lifecycle_changed_at; /* unix ms, from the agent */
    json_t *metadata;             /* key -> {value, error, collected_at}; NULL when empty */
    bool metadata_full_warned;    /* warned once that keys past the limit are ignored */
    unsigned log_budget;          /* relay log lines this connection may still cause */
    uint64_t last_seq;            /* of the last logs batch; 0 = none yet */
    struct logring logs;
};

/* Nothing reported yet; the ring keeps log_lines lines (logring_init clamps it). */
void wsstatus_init(struct wsstatus *s, size_t log_lines);
void wsstatus_free(struct wsstatus *s);

/*
 * A new agent connection said hello: lifecycle, metadata and forward_ports belong to the
 * agent that reported them and are forgotten (the batch sequence goes on: see last_seq). Stats and
 * ports stay until the new agent replaces them; the logs stay (their numbering goes on).
 */
void wsstatus_agent_hello(struct wsstatus *s);

/*
 * Takes a validated control message of the workspace's current agent: stats, ports,
 * lifecycle, logs or metadata. `name` is the workspace's, for warnings; now_mono is the
 * caller's monotonic clock, now_unix_ms the time for marker lines. Returns true if the
 * message was one of these (handled), false for any other type.
 */
bool wsstatus_control(struct wsstatus *s, const char *name, const json_t *msg, uint64_t now_mono,
                      int64_t now_unix_ms);

/* Milliseconds the workspace has been idle, from the agent's last stats; -1 if unknown. */
int64_t wsstatus_idle_ms(const struct wsstatus *s, uint64_t now_mono);

/* The wire name of the reported lifecycle state, or NULL. */
const char *wsstatus_lifecycle(const struct wsstatus *s);

/*
 * Adds the status members of a workspace's JSON to o: last_activity, idle_seconds,
 * sessions, rx_bytes, tx_bytes, ports, lifecycle, lifecycle_changed_at, metadata,
 * forward_ports (PROTOCOL.md 14.3).
 */
void wsstatus_json(const struct wsstatus *s, json_t *o, uint64_t now_mono);

#endif
