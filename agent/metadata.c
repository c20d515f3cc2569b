#include "metadata.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent/clock.h"
#include "agent/script.h"
#include "proto/logbatch.h"
#include "tunnel/log.h"

#define METADATA_INTERVAL_MAX 86400u /* seconds; the manifest's range is 1..86400 */
#define METADATA_TIMEOUT_MAX 3600u   /* seconds; the manifest's range is 1..3600 */
/* Captured stdout beyond the value's limit: trailing whitespace past METADATA_VALUE_MAX
 * would otherwise be cut before it is trimmed. */
#define METADATA_CAPTURE_SLACK 1024u
#define METADATA_ERROR_MAX 512u /* bytes of an error: reason + ": " + the stderr line */
#define METADATA_SOURCE_MAX 96u /* "metadata:" + a key */
#define MS_PER_S 1000u

struct metadata_item {
    struct metadata_item *next;
    struct metadata *m;
    char *key;
    char *script;
    unsigned interval_s, timeout_s;
    uv_timer_t timer; /* the next run */
    struct script *run;

    int64_t run_started;                /* unix ms */
    char err_line[METADATA_STDERR_MAX]; /* the run's first non-blank stderr line, raw */
    size_t err_line_len;
    bool got_err_line;

    bool known;  /* a run completed */
    bool sent;   /* value and error were reported since the last resend */
    char *value; /* the last run's, NUL-terminated */
    char *error;
    int64_t collected_at;
};

struct metadata {
    uv_loop_t *loop;
    struct proc_reaper *reaper;
    void (*report)(void *ud, json_t *msg);
    void *ud;
    struct metadata_item *items;
    char **envp;
    char *cwd;
    size_t closing; /* dropped items whose timer is not closed yet */
    bool freed;
};

/* ---- text ---- */

/*
 * Copies in to out as valid UTF-8: each invalid byte (and NUL) becomes U+FFFD. Stops before
 * the first character that would not fit in max bytes, so the cut is on a character
 * boundary. Returns the bytes written; out gets a NUL after them (it has max + 1 bytes).
 */
static size_t utf8_clean(const char *in, size_t n, char *out, size_t max)
{
    static const char fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    const unsigned char *p = (const unsigned char *)in;
    size_t len = 0;
    for (size_t i = 0; i < n;) {
        size_t cl = p[i] ? proto_utf8_char(p + i, n - i) : 0; /* NUL: replaced too */
        const char *src = cl ? in + i : fffd;
        size_t sl = cl ? cl : sizeof(fffd);
        if (len + sl > max)
            break;
        memcpy(out + len, src, sl);
        len += sl;
        i += cl ? cl : 1;
    }
    out[len] = '\0';
    return len;
}

static size_t trim_trailing_space(const char *s, size_t n)
{
    while (n > 0 && strchr(" \t\r\n\v\f", s[n - 1]) && s[n - 1] != '\0')
        n--;
    return n;
}

/* ---- reports ---- */

static json_t *item_json(const struct metadata_item *it)
{
    return json_pack("{s:s, s:s, s:s, s:I}", "key", it->key, "value", it->value, "error", it->error,
                     "collected_at", (json_int_t)it->collected_at);
}

/* Sends one message with the items in list. False when m was freed from inside report. */
static bool send_items(struct metadata *m, json_t *list)
{
    json_t *msg = json_pack("{s:s, s:o}", "type", "metadata", "items", list);
    if (!msg)
        return true;
    m->report(m->ud, msg);
    json_decref(msg);
    return !m->freed;
}

static void report_item(struct metadata_item *it)
{
    json_t *list = json_array();
    json_t *obj = item_json(it);
    if (!list || !obj || json_array_append_new(list, obj) < 0) {
        json_decref(list);
        return;
    }
    it->sent = true;
    send_items(it->m, list);
}

/* ---- running ---- */

static void on_script_line(void *ud, const char *source, const char *text, size_t len)
{
    (void)source;
    struct metadata_item *it = ud;
    if (it->got_err_line || trim_trailing_space(text, len) == 0)
        return;
    it->got_err_line = true;
    it->err_line_len = len < sizeof(it->err_line) ? len : sizeof(it->err_line);
    memcpy(it->err_line, text, it->err_line_len);
}

static void describe_error(const struct metadata_item *it, const struct script_result *r, char *out,
                           size_t max)
{
    int n = 0;
    switch (r->end) {
    case SCRIPT_EXITED:
        if (r->status == 0) {
            out[0] = '\0';
            return; /* success: whatever it said on stderr is not an error */
        }
        n = snprintf(out, max, "exit status %d", r->status);
        break;
    case SCRIPT_SIGNALED:
        n = snprintf(out, max, "killed by signal %d", r->status);
        break;
    case SCRIPT_TIMED_OUT:
        n = snprintf(out, max, "timed out after %us", it->timeout_s);
        break;
    case SCRIPT_SPAWN_FAILED:
        n = snprintf(out, max, "cannot run: %s", strerror(-r->status));
        break;
    }
    size_t len = n < 0 ? 0 : (size_t)n < max ? (size_t)n : max - 1;
    size_t line = trim_trailing_space(it->err_line, it->err_line_len);
    if (line == 0 || len + 2 + METADATA_STDERR_MAX >= max)
        return;
    memcpy(out + len, ": ", 2);
    utf8_clean(it->err_line, line, out + len + 2, METADATA_STDERR_MAX);
}

static void run_item(uv_timer_t *t);

static void on_script_exit(void *ud, const struct script_result *r)
{
    struct metadata_item *it = ud;
    char *value = malloc(METADATA_VALUE_MAX + 1);
    char error[METADATA_ERROR_MAX];
    if (value)
        utf8_clean(r->output ? r->output : "", trim_trailing_space(r->output, r->output_len), value,
                   METADATA_VALUE_MAX);
    describe_error(it, r, error, sizeof(error));
    script_free(it->run);
    it->run = NULL;
    uv_timer_start(&it->timer, run_item, (uint64_t)it->interval_s * MS_PER_S, 0);
    char *err = strdup(error);
    if (!value || !err) {
        free(value);
        free(err);
        return;
    }
    if (!it->known || strcmp(value, it->value) != 0 || strcmp(err, it->error) != 0)
        it->sent = false;
    free(it->value);
    free(it->error);
    it->value = value;
    it->error = err;
    it->known = true;
    /* When the run ended, not when its exit was reported (a background process can hold
     * its stdout open for SCRIPT_DRAIN_MS more). */
    it->collected_at = it->run_started + (int64_t)r->elapsed_ms;
    if (!it->sent)
        report_item(it);
}

static void run_item(uv_timer_t *t)
{
    struct metadata_item *it = t->data;
    struct metadata *m = it->m;
    char source[METADATA_SOURCE_MAX];
    snprintf(source, sizeof(source), "metadata:%s", it->key);
    char *argv[4];
    script_shell_argv(it->script, argv);
    struct script_spec spec = {
        .source = source,
        .argv = argv,
        .envp = m->envp,
        .cwd = m->cwd,
        .timeout_ms = (uint64_t)it->timeout_s * MS_PER_S,
        .output_cap = METADATA_VALUE_MAX + METADATA_CAPTURE_SLACK,
        .capture_stdout = true,
    };
    static const struct script_callbacks cb = {on_script_line, on_script_exit};
    it->got_err_line = false;
    it->err_line_len = 0;
    it->run_started = clock_unix_ms();
    it->run = script_start(m->loop, m->reaper, &spec, &cb, it);
    if (!it->run) { /* out of memory: try again at the next interval */
        log_warn("metadata %s: cannot start its script: out of memory", it->key);
        uv_timer_start(&it->timer, run_item, (uint64_t)it->interval_s * MS_PER_S, 0);
    }
}

/* ---- items ---- */

static void free_item_memory(struct metadata_item *it)
{
    free(it->key);
    free(it->script);
    free(it->value);
    free(it->error);
    free(it);
}

static void release(struct metadata *m)
{
    if (!m->freed || m->closing > 0 || m->items)
        return;
    proc_env_free(m->envp);
    free(m->cwd);
    free(m);
}

static void on_item_closed(uv_handle_t *h)
{
    struct metadata_item *it = h->data;
    struct metadata *m = it->m;
    free_item_memory(it);
    m->closing--;
    release(m);
}

static void drop_item(struct metadata_item *it)
{
    script_free(it->run); /* kills it if it still runs */
    it->run = NULL;
    it->m->closing++;
    uv_close((uv_handle_t *)&it->timer, on_item_closed);
}

static unsigned seconds_of(const json_t *obj, const char *name, unsigned dflt, unsigned max)
{
    json_t *v = json_object_get(obj, name);
    if (!json_is_integer(v))
        return dflt;
    json_int_t s = json_integer_value(v);
    return s < 1 ? 1 : s > (json_int_t)max ? max : (unsigned)s;
}

static struct metadata_item *new_item(struct metadata *m, const char *key, const char *script,
                                      unsigned interval_s, unsigned timeout_s)
{
    struct metadata_item *it = calloc(1, sizeof(*it));
    if (!it)
        return NULL;
    it->key = strdup(key);
    it->script = strdup(script);
    if (!it->key || !it->script) {
        free_item_memory(it);
        return NULL;
    }
    it->m = m;
    it->interval_s = interval_s;
    it->timeout_s = timeout_s;
    uv_timer_init(m->loop, &it->timer);
    it->timer.data = it;
    uv_timer_start(&it->timer, run_item, 0, 0);
    return it;
}

/* Takes the old item that is the same as the entry out of *list, or returns NULL. */
static struct metadata_item *take_same(struct metadata_item **list, const char *key,
                                       const char *script, unsigned interval_s, unsigned timeout_s)
{
    for (struct metadata_item **pp = list; *pp; pp = &(*pp)->next) {
        struct metadata_item *it = *pp;
        if (strcmp(it->key, key) != 0)
            continue;
        if (strcmp(it->script, script) != 0 || it->interval_s != interval_s ||
            it->timeout_s != timeout_s)
            return NULL;
        *pp = it->next;
        it->next = NULL;
        return it;
    }
    return NULL;
}

static bool has_key(const struct metadata_item *list, const char *key)
{
    for (; list; list = list->next)
        if (strcmp(list->key, key) == 0)
            return true;
    return false;
}

static void set_env(struct metadata *m, char *const *envp, const char *cwd)
{
    char **env = proc_env_copy(envp);
    char *dir = cwd ? strdup(cwd) : NULL;
    if (!env || (cwd && !dir)) {
        log_warn("metadata: out of memory: the scripts keep their previous environment");
        free(dir);
        proc_env_free(env);
        return;
    }
    proc_env_free(m->envp);
    free(m->cwd);
    m->envp = env;
    m->cwd = dir;
}

void metadata_set_items(struct metadata *m, const json_t *items, char *const *envp, const char *cwd)
{
    set_env(m, envp, cwd);
    struct metadata_item *old = m->items, *fresh = NULL, **tail = &fresh;
    size_t n = 0;
    size_t i;
    json_t *entry;
    json_array_foreach(items, i, entry)
    {
        const char *key = json_string_value(json_object_get(entry, "key"));
        const char *script = json_string_value(json_object_get(entry, "script"));
        if (!key || !script || has_key(fresh, key) || n >= METADATA_ITEMS_MAX)
            continue;
        unsigned interval =
            seconds_of(entry, "interval", METADATA_INTERVAL_DEFAULT, METADATA_INTERVAL_MAX);
        unsigned timeout =
            seconds_of(entry, "timeout", METADATA_TIMEOUT_DEFAULT, METADATA_TIMEOUT_MAX);
        struct metadata_item *it = take_same(&old, key, script, interval, timeout);
        if (!it)
            it = new_item(m, key, script, interval, timeout);
        if (!it) {
            log_warn("metadata %s: out of memory: the item is left out", key);
            continue;
        }
        *tail = it;
        tail = &it->next;
        n++;
    }
    m->items = fresh;
    while (old) {
        struct metadata_item *next = old->next;
        drop_item(old);
        old = next;
    }
}

void metadata_resend(struct metadata *m)
{
    json_t *list = NULL;
    size_t size = 0;
    for (struct metadata_item *it = m->items; it; it = it->next) {
        it->sent = false;
        if (!it->known)
            continue; /* reported when its first run completes */
        json_t *obj = item_json(it);
        if (!obj)
            continue;
        size_t len = json_dumpb(obj, NULL, 0, JSON_COMPACT) + 1;
        if (list && size + len > METADATA_REPORT_MAX) {
            bool alive = send_items(m, list);
            list = NULL;
            if (!alive) {
                json_decref(obj);
                return;
            }
        }
        if (!list) {
            list = json_array();
            size = 0;
        }
        if (!list || json_array_append_new(list, obj) < 0) {
            json_decref(obj);
            continue;
        }
        size += len;
        it->sent = true;
    }
    if (list)
        send_items(m, list);
}

struct metadata *metadata_new(uv_loop_t *loop, struct proc_reaper *reaper,
                              void (*report)(void *ud, json_t *msg), void *ud)
{
    struct metadata *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->loop = loop;
    m->reaper = reaper;
    m->report = report;
    m->ud = ud;
    return m;
}

void metadata_free(struct metadata *m)
{
    if (!m || m->freed)
        return;
    m->freed = true;
    struct metadata_item *it = m->items;
    m->items = NULL;
    while (it) {
        struct metadata_item *next = it->next;
        drop_item(it);
        it = next;
    }
    release(m);
}
