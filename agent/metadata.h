/*
 * metadata: runs the manifest's metadata scripts on their schedule and reports what they
 * print as "metadata" control messages (PROTOCOL.md 12).
 *
 * Each item runs right away and then every interval after its previous run ended, never
 * two runs of one item at once, with script.h (capture_stdout, the item's timeout). A run's
 * value is its stdout with trailing whitespace trimmed, invalid UTF-8 (and NUL) replaced
 * with U+FFFD, cut to METADATA_VALUE_MAX bytes on a character boundary. Its error is "" on
 * exit 0, else "exit status N", "killed by signal N", "timed out after Ns" or "cannot run:
 * REASON", followed by ": " and the first line the script wrote to stderr (at most
 * METADATA_STDERR_MAX bytes), if any. stderr goes nowhere else.
 *
 * An item is reported when its value or error differs from what was last reported (or was
 * never reported since metadata_resend); collected_at alone changing is not a change.
 */
#ifndef TETHER_METADATA_H
#define TETHER_METADATA_H

#include <jansson.h>
#include <uv.h>

#include "pty/proc.h"

#define METADATA_ITEMS_MAX 32u        /* items in a manifest (PROTO_MAX_METADATA) */
#define METADATA_VALUE_MAX 10240u     /* bytes of a value (PROTO_MAX_METADATA_VALUE) */
#define METADATA_STDERR_MAX 200u      /* bytes of the stderr line appended to an error */
#define METADATA_INTERVAL_DEFAULT 60u /* seconds between runs, when the item names none */
#define METADATA_TIMEOUT_DEFAULT 10u  /* seconds a run may take, when the item names none */
/* Bytes of one report's JSON: a resend of many large values is split across messages
 * to stay well under PROTO_MAX_CONTROL (control characters escape to 6 bytes each). */
#define METADATA_REPORT_MAX (512u * 1024)

struct metadata;

/*
 * Creates the runner with no items. report gets each "metadata" message (borrowed: it
 * takes a reference to keep it); it may call metadata_free. reaper is the agent's one
 * proc_reaper and must outlive the runner's scripts. Returns NULL when out of memory.
 */
struct metadata *metadata_new(uv_loop_t *loop, struct proc_reaper *reaper,
                              void (*report)(void *ud, json_t *msg), void *ud);

/*
 * Replaces the set of items. items: the manifest's validated "metadata" array, or NULL for
 * none; entries without a key or script are skipped, at most METADATA_ITEMS_MAX are used.
 * An item whose key, script, interval and timeout are all unchanged keeps its schedule, its
 * running script and its last value; every other old item is dropped (its running script
 * is killed) and every other new one runs at once. envp (the scripts' whole environment,
 * NULL-terminated; NULL: empty) and cwd (NULL: the agent's directory) are copied and used
 * by every run from now on.
 */
void metadata_set_items(struct metadata *m, const json_t *items, char *const *envp,
                        const char *cwd);

/*
 * After a reconnect: what every item last reported counts as unsent. Everything known now
 * is reported at once (one or more messages), and each item not known yet is reported when
 * its run completes, changed or not.
 */
void metadata_resend(struct metadata *m);

/* Kills running scripts and stops reporting; the memory is freed once the handles are
 * closed on the loop. NULL is a no-op. */
void metadata_free(struct metadata *m);

#endif
