/* The replay ring of reconnecting PTYs: what a client sees when it attaches. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pty/ring.h"

/* Concatenates the ring's pieces into out; returns the length. */
static size_t replay(const struct ring *r, uint8_t *out)
{
    const uint8_t *p[2];
    size_t l[2], n = 0;
    int k = ring_pieces(r, p, l);
    for (int i = 0; i < k; i++) {
        memcpy(out + n, p[i], l[i]);
        n += l[i];
    }
    return n;
}

static void test_empty(void **state)
{
    (void)state;
    struct ring r;
    ring_init(&r, 4096);
    const uint8_t *p[2];
    size_t l[2];
    assert_int_equal(ring_pieces(&r, p, l), 0);
    assert_int_equal(ring_len(&r), 0);
    assert_null(r.buf); /* nothing is allocated before the first output */
    ring_free(&r);
}

static void test_keeps_the_last_cap_bytes_in_order(void **state)
{
    (void)state;
    enum { CAP = 1024, TOTAL = 10 * CAP + 37 };
    struct ring r;
    ring_init(&r, CAP);
    uint8_t *all = malloc(TOTAL), out[CAP];
    for (size_t i = 0; i < TOTAL; i++)
        all[i] = (uint8_t)(i * 7 + i / 251);
    /* Written in uneven pieces, so the buffer wraps at every possible offset. */
    size_t off = 0, step = 1;
    while (off < TOTAL) {
        size_t n = step < TOTAL - off ? step : TOTAL - off;
        assert_int_equal(ring_write(&r, all + off, n), 0);
        off += n;
        step = step * 3 % 997 + 1;
        size_t held = off < CAP ? off : CAP;
        assert_int_equal(ring_len(&r), held);
        assert_int_equal(replay(&r, out), held);
        assert_memory_equal(out, all + off - held, held);
    }
    assert_int_equal(r.total, TOTAL);
    free(all);
    ring_free(&r);
}

static void test_a_write_longer_than_the_ring(void **state)
{
    (void)state;
    struct ring r;
    ring_init(&r, 1024);
    uint8_t big[5000], out[1024];
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)i;
    ring_write(&r, (const uint8_t *)"abc", 3);
    assert_int_equal(ring_write(&r, big, sizeof(big)), 0);
    assert_int_equal(r.total, 5003);
    assert_int_equal(replay(&r, out), 1024);
    assert_memory_equal(out, big + sizeof(big) - 1024, 1024);
    ring_free(&r);
}

static void test_capacity_is_clamped(void **state)
{
    (void)state;
    struct ring r;
    ring_init(&r, 0);
    assert_int_equal(r.cap, RING_MIN_CAP);
    ring_init(&r, (size_t)1 << 40);
    assert_int_equal(r.cap, RING_MAX_CAP);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_keeps_the_last_cap_bytes_in_order),
        cmocka_unit_test(test_a_write_longer_than_the_ring),
        cmocka_unit_test(test_capacity_is_clamped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
