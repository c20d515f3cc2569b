#include "wsstatus.h"

#include <stdio.h>
#include <string.h>

#include "log.h"
#include "proto/logbatch.h"
#include "proto/proto.h"

/*
 * What one agent connection may make the relay log (lifecycle changes, lost and dropped
 * batches): plenty for an honest agent, and a hostile one cannot flood the relay's log.
 */
#define WSSTATUS_LOG_BUDGET 64u

void wsstatus_init(struct wsstatus *s, size_t log_lines)
{
    memset(s, 0, sizeof(*s));
    s->lifecycle = -1;
    s->lifecycle_changed_at = -1;
    s->log_budget = WSSTATUS_LOG_BUDGET;
    /* Every line is cut to LOGRING_MAX_TEXT, so this is the bound the line count implies:
     * the byte limit only makes it hold whatever the lines are. */
    logring_init(&s->logs, log_lines, log_lines * LOGRING_LINE_MAX_COST);
}

void wsstatus_free(struct wsstatus *s)
{
    json_decref(s->stats);
    json_decref(s->ports);
    json_decref(s->forward_ports);
    json_decref(s->metadata);
    logring_free(&s->logs);
    s->stats = s->ports = s->forward_ports = s->metadata = NULL;
}

void wsstatus_agent_hello(struct wsstatus *s)
{
    s->log_budget = WSSTATUS_LOG_BUDGET;
    s->lifecycle = -1;
    s->lifecycle_changed_at = -1;
    json_decref(s->metadata);
    s->metadata = NULL;
    s->metadata_full_warned = false;
    json_decref(s->forward_ports);
    s->forward_ports = NULL;
    /* last_seq stays: an agent numbers its batches across reconnects, so batches lost with
     * the old connection show as missing; a restarted agent starts again at 1 (not above). */
}

/* True if one more relay log line about this workspace's agent may be written. */
static bool may_log(struct wsstatus *s, const char *name)
{
    if (s->log_budget == 0)
        return false;
    if (--s->log_budget == 0)
        log_warn("workspace %s: more lifecycle and log-batch events from this agent connection "
                 "are not logged",
                 name);
    return s->log_budget > 0;
}

/* ---- logs ---- */

/* Stores a line of the relay's own among the agent's. */
static void log_marker(struct wsstatus *s, int64_t now_unix_ms, const char *text)
{
    logring_append(&s->logs, now_unix_ms, WSSTATUS_LOG_SOURCE, strlen(WSSTATUS_LOG_SOURCE), text,
                   strlen(text));
}

struct batch_sink {
    struct wsstatus *s;
    size_t lost; /* lines the ring had no memory for */
};

static void log_record(void *ud, const struct log_record *rec)
{
    struct batch_sink *k = ud;
    if (logring_append(&k->s->logs, rec->time_ms, rec->source, rec->source_len, rec->text,
                       rec->text_len) < 0)
        k->lost++;
}

/* Printable ASCII of a decoder's reason, for a log line and a marker. */
static void plain_text(char *dst, size_t cap, const char *src)
{
    size_t n = 0;
    for (; src[n] && n + 1 < cap; n++)
        dst[n] = (src[n] >= 0x20 && src[n] < 0x7f) ? src[n] : '?';
    dst[n] = '\0';
}

/*
 * A batch is stored whole or not at all (logbatch_decode checks it first). Batches are
 * numbered from 1 by the agent process, one more each: a jump forward means batches were
 * lost on the way, and is marked; a number not above the last means a new agent process,
 * and is not a loss.
 */
static void logs_message(struct wsstatus *s, const char *name, const json_t *msg,
                         int64_t now_unix_ms)
{
    json_t *jseq = json_object_get(msg, "seq");
    uint64_t seq = json_is_integer(jseq) && json_integer_value(jseq) > 0
                       ? (uint64_t)json_integer_value(jseq)
                       : 0;
    char text[200];
    if (seq && s->last_seq && seq > s->last_seq + 1) {
        uint64_t missing = seq - s->last_seq - 1;
        snprintf(text, sizeof(text), "[relay: %llu log batches missing]",
                 (unsigned long long)missing);
        if (may_log(s, name))
            log_warn("workspace %s: %llu log batch%s missing (batch %llu after %llu)", name,
                     (unsigned long long)missing, missing == 1 ? " is" : "es are",
                     (unsigned long long)seq, (unsigned long long)s->last_seq);
        log_marker(s, now_unix_ms, text);
    }
    if (seq)
        s->last_seq = seq;
    char err[160], why[160];
    struct batch_sink k = {.s = s};
    if (logbatch_decode(msg, log_record, &k, err, sizeof(err)) < 0) {
        plain_text(why, sizeof(why), err);
        if (may_log(s, name))
            log_warn("workspace %s: log batch %llu dropped: %s", name, (unsigned long long)seq,
                     why);
        snprintf(text, sizeof(text), "[relay: a log batch was dropped: %s]", why);
        log_marker(s, now_unix_ms, text);
        return;
    }
    if (k.lost)
        log_warn("workspace %s: out of memory: %zu log lines lost", name, k.lost);
}

/* ---- metadata ---- */

/* Merges the items by key; keys past PROTO_MAX_METADATA are ignored (with one warning). */
static void metadata_message(struct wsstatus *s, const char *name, const json_t *msg)
{
    json_t *items = json_object_get(msg, "items");
    if (!s->metadata && !(s->metadata = json_object()))
        return;
    size_t i;
    json_t *item;
    json_array_foreach(items, i, item)
    {
        const char *key = json_string_value(json_object_get(item, "key"));
        json_t *value = json_object_get(item, "value");
        json_t *error = json_object_get(item, "error");
        json_t *at = json_object_get(item, "collected_at");
        if (!key || !json_is_string(value))
            continue; /* proto's schema makes these present */
        if (!json_object_get(s->metadata, key) &&
            json_object_size(s->metadata) >= PROTO_MAX_METADATA) {
            if (!s->metadata_full_warned)
                log_warn("workspace %s: more than %u metadata keys; \"%.64s\" and later new keys "
                         "are ignored",
                         name, PROTO_MAX_METADATA, key);
            s->metadata_full_warned = true;
            continue;
        }
        json_t *o = json_object();
        if (!o || json_object_set(o, "value", value) ||
            json_object_set_new(o, "error",
                                json_is_string(error) ? json_incref(error) : json_string("")) ||
            json_object_set_new(o, "collected_at",
                                json_is_integer(at) ? json_incref(at) : json_null())) {
            json_decref(o);
            continue;
        }
        json_object_set_new(s->metadata, key, o);
    }
}

/* ---- the rest ---- */

static void lifecycle_message(struct wsstatus *s, const char *name, const json_t *msg)
{
    int state = proto_lifecycle_state(json_string_value(json_object_get(msg, "state")));
    json_t *at = json_object_get(msg, "changed_at");
    if (state < 0)
        return; /* proto's schema allows only the known names */
    if (state != s->lifecycle && may_log(s, name))
        log_info("workspace %s: %s", name, proto_lifecycle_name(state));
    s->lifecycle = state;
    s->lifecycle_changed_at = json_is_integer(at) ? json_integer_value(at) : -1;
}

bool wsstatus_control(struct wsstatus *s, const char *name, const json_t *msg, uint64_t now_mono,
                      int64_t now_unix_ms)
{
    const char *type = json_string_value(json_object_get(msg, "type"));
    if (!type)
        return false;
    if (strcmp(type, "ports") == 0) {
        json_decref(s->ports);
        s->ports = json_incref(json_object_get(msg, "ports"));
        /* Each ports message is the whole picture: no forward_ports means none now. */
        json_decref(s->forward_ports);
        s->forward_ports = json_incref(json_object_get(msg, "forward_ports"));
    } else if (strcmp(type, "stats") == 0) {
        json_decref(s->stats);
        s->stats = json_incref((json_t *)msg);
        s->stats_mono_ms = now_mono;
    } else if (strcmp(type, "lifecycle") == 0) {
        lifecycle_message(s, name, msg);
    } else if (strcmp(type, "logs") == 0) {
        logs_message(s, name, msg, now_unix_ms);
    } else if (strcmp(type, "metadata") == 0) {
        metadata_message(s, name, msg);
    } else {
        return false;
    }
    return true;
}

int64_t wsstatus_idle_ms(const struct wsstatus *s, uint64_t now_mono)
{
    if (!s->stats)
        return -1;
    uint64_t reported = (uint64_t)json_integer_value(json_object_get(s->stats, "idle_ms"));
    return (int64_t)(reported + (now_mono - s->stats_mono_ms));
}

const char *wsstatus_lifecycle(const struct wsstatus *s)
{
    return s->lifecycle >= 0 ? proto_lifecycle_name(s->lifecycle) : NULL;
}

static json_t *copy_or(const json_t *v, json_t *otherwise)
{
    if (!v)
        return otherwise;
    json_decref(otherwise);
    return json_deep_copy(v);
}

static json_t *stats_member(const struct wsstatus *s, const char *key)
{
    return copy_or(s->stats ? json_object_get(s->stats, key) : NULL, json_object());
}

void wsstatus_json(const struct wsstatus *s, json_t *o, uint64_t now_mono)
{
    json_t *last = s->stats ? json_object_get(s->stats, "last_activity") : NULL;
    json_object_set_new(o, "last_activity",
                        last ? json_integer(json_integer_value(last)) : json_null());
    int64_t idle = wsstatus_idle_ms(s, now_mono);
    json_object_set_new(o, "idle_seconds", idle >= 0 ? json_integer(idle / 1000) : json_null());
    json_object_set_new(o, "sessions", stats_member(s, "sessions"));
    json_object_set_new(o, "rx_bytes", stats_member(s, "rx_bytes"));
    json_object_set_new(o, "tx_bytes", stats_member(s, "tx_bytes"));
    json_object_set_new(o, "ports", copy_or(s->ports, json_array()));
    const char *lc = wsstatus_lifecycle(s);
    json_object_set_new(o, "lifecycle", lc ? json_string(lc) : json_null());
    json_object_set_new(o, "lifecycle_changed_at",
                        lc && s->lifecycle_changed_at >= 0 ? json_integer(s->lifecycle_changed_at)
                                                           : json_null());
    json_object_set_new(o, "metadata", copy_or(s->metadata, json_object()));
    json_object_set_new(o, "forward_ports", copy_or(s->forward_ports, json_array()));
}
