/* logring: lines come back numbered and in order, the oldest go first, memory stays bounded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tunnel/logring.h"

static void append(struct logring *r, int64_t time_ms, const char *source, const char *text)
{
    assert_int_equal(logring_append(r, time_ms, source, strlen(source), text, strlen(text)), 0);
}

static void append_numbered(struct logring *r, unsigned from, unsigned to)
{
    char text[32];
    for (unsigned i = from; i <= to; i++) {
        snprintf(text, sizeof(text), "line %u", i);
        append(r, 1000 + i, "test", text);
    }
}

/* Every kept line from `from` to `to` (inclusive) says "line N" with its own number. */
static void assert_lines(const struct logring *r, uint64_t from, uint64_t to)
{
    char want[32];
    assert_int_equal(logring_first(r), from);
    assert_int_equal(logring_next(r), to + 1);
    for (uint64_t n = from; n <= to; n++) {
        const struct logring_line *l = logring_get(r, n);
        assert_non_null(l);
        assert_int_equal(l->n, n);
        assert_int_equal(l->time_ms, 1000 + (int64_t)n);
        snprintf(want, sizeof(want), "line %llu", (unsigned long long)n);
        assert_string_equal(l->text, want);
        assert_string_equal(logring_source(l), "test");
    }
    assert_null(logring_get(r, from - 1));
    assert_null(logring_get(r, to + 1));
}

static void test_empty(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 100, 0);
    assert_null(r.slots); /* nothing allocated before the first line */
    assert_int_equal(logring_first(&r), 1);
    assert_int_equal(logring_next(&r), 1);
    assert_null(logring_get(&r, 0));
    assert_null(logring_get(&r, 1));
    json_t *j = logring_json(&r, 0, 100, 1 << 20);
    assert_non_null(j);
    assert_int_equal(json_array_size(json_object_get(j, "lines")), 0);
    assert_int_equal(json_integer_value(json_object_get(j, "first")), 1);
    assert_int_equal(json_integer_value(json_object_get(j, "next")), 1);
    json_decref(j);
    logring_free(&r);
}

static void test_order_and_numbers(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 100, 0);
    append_numbered(&r, 1, 50);
    assert_lines(&r, 1, 50);
    logring_free(&r);
}

/* Past max_lines the oldest line goes for each new one; numbers go on. */
static void test_wrap_around(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 10, 0);
    append_numbered(&r, 1, 10);
    assert_lines(&r, 1, 10);
    append_numbered(&r, 11, 11);
    assert_lines(&r, 2, 11);
    append_numbered(&r, 12, 1234);
    assert_lines(&r, 1225, 1234);
    assert_int_equal(r.count, 10);
    assert_true(r.cap <= 10);
    logring_free(&r);
}

/* Slots grow with the lines, never past max_lines, never all at once. */
static void test_lazy_slots(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, LOGRING_MAX_LINES, (size_t)-1);
    append_numbered(&r, 1, 3);
    assert_int_equal(r.cap, LOGRING_MIN_SLOTS);
    append_numbered(&r, 4, 100);
    assert_true(r.cap >= 100 && r.cap <= 256);
    assert_lines(&r, 1, 100);
    logring_free(&r);

    logring_init(&r, 40, 0);
    append_numbered(&r, 1, 1000);
    assert_int_equal(r.cap, 40);
    assert_lines(&r, 961, 1000);
    logring_free(&r);
}

struct collect {
    uint64_t ns[64];
    size_t count, stop_after;
};

static int collect(void *ud, const struct logring_line *l)
{
    struct collect *c = ud;
    if (c->count == c->stop_after)
        return 1;
    c->ns[c->count++] = l->n;
    return 0;
}

static void test_each_after(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 10, 0);
    append_numbered(&r, 1, 25); /* keeps 16..25 */
    struct collect c = {.stop_after = 64};
    assert_int_equal(logring_each_after(&r, 0, collect, &c), 26); /* pushed out: from first */
    assert_int_equal(c.count, 10);
    assert_int_equal(c.ns[0], 16);
    assert_int_equal(c.ns[9], 25);

    c = (struct collect){.stop_after = 64};
    assert_int_equal(logring_each_after(&r, 20, collect, &c), 26);
    assert_int_equal(c.count, 5);
    assert_int_equal(c.ns[0], 21);

    c = (struct collect){.stop_after = 64};
    assert_int_equal(logring_each_after(&r, 25, collect, &c), 26); /* nothing new */
    assert_int_equal(c.count, 0);
    assert_int_equal(logring_each_after(&r, 1000, collect, &c), 26); /* from the future */
    assert_int_equal(c.count, 0);

    c = (struct collect){.stop_after = 3}; /* the reader stops: it goes on where it stopped */
    assert_int_equal(logring_each_after(&r, 17, collect, &c), 21);
    assert_int_equal(c.count, 3);
    assert_int_equal(c.ns[0], 18);
    assert_int_equal(c.ns[2], 20);
    logring_free(&r);
}

/* The byte limit pushes lines out however few there are; a line always fits. */
static void test_byte_limit(void **state)
{
    (void)state;
    struct logring r;
    size_t limit = 4 * LOGRING_LINE_MAX_COST;
    logring_init(&r, 1000, limit);
    char *big = malloc(LOGRING_MAX_TEXT + 100);
    memset(big, 'x', LOGRING_MAX_TEXT + 100);
    big[LOGRING_MAX_TEXT + 99] = '\0';
    for (int i = 0; i < 100; i++) {
        assert_int_equal(logring_append(&r, i, "big", 3, big, strlen(big)), 0);
        assert_true(r.bytes <= limit);
    }
    assert_int_equal(r.count, 4);
    assert_int_equal(logring_first(&r), 97);
    assert_int_equal(logring_next(&r), 101);
    /* Short lines after long ones: the long ones go as room is needed. */
    append(&r, 1, "s", "short");
    assert_int_equal(r.count, 5);
    assert_true(r.bytes <= limit);

    /* A limit below one line's cost is raised: the largest line still fits. */
    logring_free(&r);
    logring_init(&r, 1000, 1);
    assert_int_equal(logring_append(&r, 0, "big", 3, big, strlen(big)), 0);
    assert_int_equal(logring_append(&r, 0, "big", 3, big, strlen(big)), 0);
    assert_int_equal(r.count, 1);
    assert_int_equal(logring_first(&r), 2);
    free(big);
    logring_free(&r);
}

/* Text and source are cut to their limits on character boundaries. */
static void test_cut_on_utf8_boundary(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 10, 0);
    /* "é" is 2 bytes: 4095 bytes of 'a' and then "é" must not be cut in half. */
    char text[LOGRING_MAX_TEXT + 8];
    memset(text, 'a', LOGRING_MAX_TEXT - 1);
    memcpy(text + LOGRING_MAX_TEXT - 1, "\xc3\xa9zz", 4);
    assert_int_equal(logring_append(&r, 5, "src", 3, text, LOGRING_MAX_TEXT + 3), 0);
    const struct logring_line *l = logring_get(&r, 1);
    assert_int_equal(l->text_len, LOGRING_MAX_TEXT - 1);
    assert_int_equal(strlen(l->text), LOGRING_MAX_TEXT - 1);

    char source[LOGRING_MAX_SOURCE + 20];
    memset(source, 's', sizeof(source));
    assert_int_equal(logring_append(&r, 5, source, sizeof(source), "", 0), 0);
    l = logring_get(&r, 2);
    assert_int_equal(l->source_len, LOGRING_MAX_SOURCE);
    assert_int_equal(strlen(logring_source(l)), LOGRING_MAX_SOURCE);
    assert_int_equal(l->text_len, 0);
    assert_string_equal(l->text, "");
    logring_free(&r);
}

/* Clearing frees the lines; the numbers go on (clients poll with after=). */
static void test_clear_keeps_numbering(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 10, 0);
    append_numbered(&r, 1, 7);
    logring_clear(&r);
    assert_null(r.slots);
    assert_int_equal(r.bytes, 0);
    assert_int_equal(logring_first(&r), 8);
    assert_int_equal(logring_next(&r), 8);
    append_numbered(&r, 8, 9);
    assert_lines(&r, 8, 9);
    logring_free(&r);
}

static void test_max_lines_clamped(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 0, 0);
    append_numbered(&r, 1, 3);
    assert_lines(&r, 3, 3);
    logring_free(&r);
    logring_init(&r, (size_t)LOGRING_MAX_LINES * 10, 0);
    assert_int_equal(r.max_lines, LOGRING_MAX_LINES);
    logring_free(&r);
}

static void test_json(void **state)
{
    (void)state;
    struct logring r;
    logring_init(&r, 5, 0);
    append_numbered(&r, 1, 8); /* keeps 4..8 */
    json_t *j = logring_json(&r, 5, 100, 1 << 20);
    assert_non_null(j);
    char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(s, "{\"first\":4,\"lines\":["
                           "{\"n\":6,\"source\":\"test\",\"text\":\"line 6\",\"time\":1006},"
                           "{\"n\":7,\"source\":\"test\",\"text\":\"line 7\",\"time\":1007},"
                           "{\"n\":8,\"source\":\"test\",\"text\":\"line 8\",\"time\":1008}],"
                           "\"next\":9}");
    free(s);
    json_decref(j);

    /* At most max_lines lines; next says where to go on. */
    j = logring_json(&r, 0, 2, 1 << 20);
    assert_int_equal(json_array_size(json_object_get(j, "lines")), 2);
    assert_int_equal(
        json_integer_value(json_object_get(json_array_get(json_object_get(j, "lines"), 0), "n")),
        4);
    assert_int_equal(json_integer_value(json_object_get(j, "next")), 6);
    json_decref(j);

    /* Text beyond max_text waits for the next request, but one line always comes. */
    j = logring_json(&r, 0, 100, 1);
    assert_int_equal(json_array_size(json_object_get(j, "lines")), 1);
    assert_int_equal(json_integer_value(json_object_get(j, "next")), 5);
    json_decref(j);
    j = logring_json(&r, 0, 100, 12); /* "line N" is 6 bytes: two fit */
    assert_int_equal(json_array_size(json_object_get(j, "lines")), 2);
    json_decref(j);
    logring_free(&r);
}

/*
 * However long the lines, the ring never holds more than max_lines of them and stays within
 * max_lines * LOGRING_LINE_MAX_COST bytes.
 */
static void test_memory_bound(void **state)
{
    (void)state;
    struct logring r;
    enum { LINES = 50 };
    logring_init(&r, LINES, LINES * LOGRING_LINE_MAX_COST);
    char *text = malloc(3 * LOGRING_MAX_TEXT);
    memset(text, 'y', 3 * LOGRING_MAX_TEXT);
    for (unsigned i = 0; i < 5000; i++) {
        size_t len = (i * 7919u) % (3 * LOGRING_MAX_TEXT);
        assert_int_equal(logring_append(&r, i, "mem", 3, text, len), 0);
        assert_true(r.count <= LINES);
        assert_true(r.bytes <= (size_t)LINES * LOGRING_LINE_MAX_COST);
        assert_true(r.cap <= LINES);
    }
    assert_int_equal(logring_next(&r), 5001);
    assert_int_equal(logring_first(&r), 5001 - LINES);
    free(text);
    logring_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_order_and_numbers),
        cmocka_unit_test(test_wrap_around),
        cmocka_unit_test(test_lazy_slots),
        cmocka_unit_test(test_each_after),
        cmocka_unit_test(test_byte_limit),
        cmocka_unit_test(test_cut_on_utf8_boundary),
        cmocka_unit_test(test_clear_keeps_numbering),
        cmocka_unit_test(test_max_lines_clamped),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_memory_bound),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
