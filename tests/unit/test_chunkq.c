/* chunkq: bytes come out in order, with writable headroom in front of every front slice. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tunnel/chunkq.h"

#define HEADROOM 30

/* Appends and reads back in uneven pieces, mixing chunkq_append and chunkq_tail. */
static void test_fifo_order_and_headroom(void **state)
{
    (void)state;
    enum { TOTAL = 3 * CHUNKQ_BLOCK + 12345 };
    uint8_t *src = malloc(TOTAL), *got = malloc(TOTAL);
    for (size_t i = 0; i < TOTAL; i++)
        src[i] = (uint8_t)(i * 131 + (i >> 9));
    struct chunkq q;
    chunkq_init(&q, HEADROOM);
    size_t in = 0, out = 0, step = 1;
    while (out < TOTAL) {
        if (in < TOTAL) {
            size_t n = (step * 7919) % 70000 + 1;
            if (n > TOTAL - in)
                n = TOTAL - in;
            if (step % 2) {
                assert_int_equal(chunkq_append(&q, src + in, n), 0);
            } else {
                size_t room;
                uint8_t *t = chunkq_tail(&q, 1, &room);
                assert_non_null(t);
                if (n > room)
                    n = room;
                memcpy(t, src + in, n);
                chunkq_commit(&q, n);
            }
            in += n;
        }
        assert_int_equal(q.len, in - out);
        size_t n;
        uint8_t *f = chunkq_front(&q, &n);
        if (!f)
            continue;
        assert_true(n <= CHUNKQ_BLOCK);
        memset(f - HEADROOM, 0xee, HEADROOM); /* headroom is ours to scribble on */
        size_t take = (step * 104729) % (n + 1);
        if (in == TOTAL && take == 0)
            take = n;
        memcpy(got + out, f, take);
        chunkq_consume(&q, take);
        out += take;
        step++;
    }
    assert_memory_equal(got, src, TOTAL);
    assert_int_equal(q.len, 0);
    size_t n;
    assert_null(chunkq_front(&q, &n));
    chunkq_free(&q);
    free(src);
    free(got);
}

static void test_tail_min_room_starts_new_block(void **state)
{
    (void)state;
    struct chunkq q;
    chunkq_init(&q, HEADROOM);
    static uint8_t junk[CHUNKQ_BLOCK];
    assert_int_equal(chunkq_append(&q, junk, CHUNKQ_BLOCK - 10), 0);
    size_t room;
    assert_non_null(chunkq_tail(&q, 100, &room));
    assert_int_equal(room, CHUNKQ_BLOCK);
    chunkq_commit(&q, 100);
    assert_int_equal(q.len, CHUNKQ_BLOCK - 10 + 100);
    size_t n;
    chunkq_front(&q, &n);
    assert_int_equal(n, CHUNKQ_BLOCK - 10);
    chunkq_free(&q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fifo_order_and_headroom),
        cmocka_unit_test(test_tail_min_room_starts_new_block),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
