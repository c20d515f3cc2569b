#include "logring.h"

#include <stdlib.h>
#include <string.h>

void logring_init(struct logring *r, size_t max_lines, size_t max_bytes)
{
    memset(r, 0, sizeof(*r));
    r->max_lines = max_lines < 1                   ? 1
                   : max_lines > LOGRING_MAX_LINES ? LOGRING_MAX_LINES
                                                   : max_lines;
    r->max_bytes = max_bytes < LOGRING_LINE_MAX_COST ? LOGRING_LINE_MAX_COST : max_bytes;
    r->next_n = 1;
}

static struct logring_line *slot(const struct logring *r, size_t i)
{
    return r->slots[(r->head + i) % r->cap];
}

static void drop_oldest(struct logring *r)
{
    struct logring_line *l = r->slots[r->head];
    r->bytes -= LOGRING_LINE_COST + l->text_len + l->source_len;
    free(l);
    r->slots[r->head] = NULL;
    r->head = (r->head + 1) % r->cap;
    r->count--;
}

void logring_clear(struct logring *r)
{
    while (r->count > 0)
        drop_oldest(r);
    free(r->slots);
    r->slots = NULL;
    r->cap = r->head = 0;
}

void logring_free(struct logring *r)
{
    logring_clear(r);
}

/* Doubles the slot array (up to max_lines), keeping the lines in order from slot 0. */
static int grow(struct logring *r)
{
    size_t cap = r->cap ? r->cap * 2 : LOGRING_MIN_SLOTS;
    if (cap > r->max_lines)
        cap = r->max_lines;
    if (cap <= r->cap)
        return -1;
    struct logring_line **slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return -1;
    for (size_t i = 0; i < r->count; i++)
        slots[i] = slot(r, i);
    free(r->slots);
    r->slots = slots;
    r->cap = cap;
    r->head = 0;
    return 0;
}

/* The longest prefix of s of at most max bytes that ends on a character boundary. */
static size_t utf8_cut(const char *s, size_t len, size_t max)
{
    if (len <= max)
        return len;
    size_t n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

int logring_append(struct logring *r, int64_t time_ms, const char *source, size_t source_len,
                   const char *text, size_t text_len)
{
    text_len = utf8_cut(text, text_len, LOGRING_MAX_TEXT);
    source_len = utf8_cut(source, source_len, LOGRING_MAX_SOURCE);
    size_t cost = LOGRING_LINE_COST + text_len + source_len;
    /* Allocate first: out of memory must not cost the lines we have. */
    struct logring_line *l = malloc(sizeof(*l) + text_len + 1 + source_len + 1);
    if (!l)
        return -1;
    l->time_ms = time_ms;
    l->text_len = (uint16_t)text_len;
    l->source_len = (uint8_t)source_len;
    memcpy(l->text, text, text_len);
    l->text[text_len] = '\0';
    memcpy(l->text + text_len + 1, source, source_len);
    l->text[text_len + 1 + source_len] = '\0';
    while (r->count > 0 && (r->count >= r->max_lines || r->bytes + cost > r->max_bytes))
        drop_oldest(r);
    if (r->count == r->cap && grow(r) < 0) {
        if (r->count == 0) {
            free(l);
            return -1;
        }
        drop_oldest(r); /* no room for more slots: this line replaces the oldest */
    }
    l->n = r->next_n++;
    r->slots[(r->head + r->count) % r->cap] = l;
    r->count++;
    r->bytes += cost;
    return 0;
}

uint64_t logring_next(const struct logring *r)
{
    return r->next_n;
}

uint64_t logring_first(const struct logring *r)
{
    return r->next_n - r->count;
}

const struct logring_line *logring_get(const struct logring *r, uint64_t n)
{
    uint64_t first = logring_first(r);
    if (n < first || n >= r->next_n)
        return NULL;
    return slot(r, (size_t)(n - first));
}

uint64_t logring_each_after(const struct logring *r, uint64_t after,
                            int (*cb)(void *ud, const struct logring_line *line), void *ud)
{
    uint64_t first = logring_first(r);
    uint64_t n = after >= r->next_n ? r->next_n : after + 1 < first ? first : after + 1;
    for (; n < r->next_n; n++)
        if (cb(ud, slot(r, (size_t)(n - first))))
            break;
    return n;
}

struct json_walk {
    json_t *lines;
    size_t max_lines, max_text;
    size_t taken, text;
    int failed;
};

/* A JSON string of valid UTF-8 text; bytes jansson refuses become '?' (never expected). */
static json_t *json_text(const char *s, size_t len)
{
    json_t *v = json_stringn(s, len);
    if (v || !s)
        return v;
    char *copy = malloc(len + 1);
    if (!copy)
        return NULL;
    for (size_t i = 0; i < len; i++)
        copy[i] = (unsigned char)s[i] >= 0x80 ? '?' : s[i];
    v = json_stringn(copy, len);
    free(copy);
    return v;
}

static int json_line(void *ud, const struct logring_line *l)
{
    struct json_walk *w = ud;
    if (w->taken >= w->max_lines || (w->taken > 0 && w->text + l->text_len > w->max_text))
        return 1;
    json_t *o = json_object();
    if (!o || json_object_set_new(o, "n", json_integer((json_int_t)l->n)) ||
        json_object_set_new(o, "time", json_integer(l->time_ms)) ||
        json_object_set_new(o, "source", json_text(logring_source(l), l->source_len)) ||
        json_object_set_new(o, "text", json_text(l->text, l->text_len))) {
        json_decref(o);
        w->failed = 1;
        return 1;
    }
    if (json_array_append_new(w->lines, o)) { /* it released o */
        w->failed = 1;
        return 1;
    }
    w->taken++;
    w->text += l->text_len;
    return 0;
}

json_t *logring_json(const struct logring *r, uint64_t after, size_t max_lines, size_t max_text)
{
    struct json_walk w = {.lines = json_array(), .max_lines = max_lines, .max_text = max_text};
    json_t *o = json_object();
    if (!o || !w.lines) {
        json_decref(o);
        json_decref(w.lines);
        return NULL;
    }
    uint64_t next = logring_each_after(r, after, json_line, &w);
    if (w.failed || json_object_set_new(o, "lines", w.lines) ||
        json_object_set_new(o, "first", json_integer((json_int_t)logring_first(r))) ||
        json_object_set_new(o, "next", json_integer((json_int_t)next))) {
        if (w.failed)
            json_decref(w.lines);
        json_decref(o);
        return NULL;
    }
    return o;
}
