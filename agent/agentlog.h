/*
 * agentlog: the workspace's log lines on their way to the relay (PROTOCOL.md 12.8):
 * script output and the agent's own info, warn and error lines, each with its time and
 * source, in batches of at most AGENTLOG_FLUSH_MS or 64 KiB (proto/logbatch).
 *
 * While the relay is unreachable or not taking them fast enough, batches wait, up to
 * AGENTLOG_BACKLOG_MAX bytes of records; past that new lines are dropped and counted, and
 * once there is room again a marker line says how many went, where they went missing.
 * Nothing goes silently.
 */
#ifndef TETHER_AGENTLOG_H
#define TETHER_AGENTLOG_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>
#include <uv.h>

#define AGENTLOG_FLUSH_MS 1000u
#define AGENTLOG_BACKLOG_MAX (4u << 20) /* bytes of records kept while disconnected */

struct agentlog;

/* send(ud, msg) hands a "logs" message (borrowed) to the tunnel and returns 0, or -1 if the
 * tunnel cannot take it now (the batch waits and is offered again AGENTLOG_FLUSH_MS later);
 * it is called only between agentlog_connected(l, true) and agentlog_connected(l, false). */
struct agentlog *agentlog_new(uv_loop_t *loop, int (*send)(void *ud, json_t *msg), void *ud);
/* One line (without its newline) from source, timestamped now. */
void agentlog_line(struct agentlog *l, const char *source, const char *text, size_t len);
/* The tunnel came up (what waited is sent now) or went down. */
void agentlog_connected(struct agentlog *l, bool up);
/* Sends (or keeps) the batch being filled now, without waiting for the timer. */
void agentlog_flush(struct agentlog *l);
/* Lines still waiting are lost (the caller flushed what it could). */
void agentlog_free(struct agentlog *l);

#endif
