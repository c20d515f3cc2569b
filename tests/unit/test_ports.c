/* Listening ports parsed from /proc/net/tcp and tcp6 text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "agent/ports.h"
#include "tunnel/log.h"

struct log_sink tether_log_sink;
int tether_log_level = LOG_ERROR; /* ports.c logs through tunnel/log */

static const char tcp4[] =
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        "
    "0 4242 1 0000000000000000 100 0 0 10 0\n"
    "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        "
    "0 17 1 0000000000000000 100 0 0 10 0\n"
    "   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        "
    "0 99 1 0000000000000000 20 4 30 10 -1\n";

static const char tcp6[] =
    "  sl  local_address                         remote_address                        st "
    "tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0\n"
    "   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 556 1 0000000000000000 100 0 0 10 0\n";

static void test_ipv4_listeners_only(void **state)
{
    (void)state;
    struct port_entry e[8];
    size_t n = 0;
    assert_int_equal(ports_parse(tcp4, false, e, 8, &n), 0);
    assert_int_equal(n, 2); /* the ESTABLISHED line is not a listener */
    assert_int_equal(e[0].port, 8080);
    assert_string_equal(e[0].address, "127.0.0.1");
    assert_int_equal(e[0].inode, 4242);
    assert_int_equal(e[1].port, 22);
    assert_string_equal(e[1].address, "0.0.0.0");
    assert_false(e[0].ipv6);
}

static void test_ipv6_listeners(void **state)
{
    (void)state;
    struct port_entry e[8];
    size_t n = 0;
    assert_int_equal(ports_parse(tcp6, true, e, 8, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(e[0].port, 3000);
    assert_string_equal(e[0].address, "::");
    assert_true(e[0].ipv6);
    assert_int_equal(e[1].port, 80);
    assert_string_equal(e[1].address, "::1");
}

static void test_cap_and_garbage(void **state)
{
    (void)state;
    struct port_entry e[1];
    size_t n = 0;
    assert_int_equal(ports_parse(tcp4, false, e, 1, &n), 0);
    assert_int_equal(n, 1); /* cut at the cap */
    n = 0;
    assert_int_equal(ports_parse("not proc at all", false, e, 1, &n), -1);
    assert_int_equal(ports_parse("", false, e, 1, &n), -1);
    assert_int_equal(
        ports_parse("  sl  local_address\n garbage line\n 0: ZZ:1 x\n", false, e, 1, &n), 0);
    assert_int_equal(n, 0);
}

/*
 * A host with tens of thousands of sockets: the scan stays linear. Each line used to go to
 * sscanf with the rest of the file behind it, and glibc's sscanf measures its whole input:
 * 40000 lines took seconds of CPU (minutes under valgrind), every scan.
 */
static void test_many_sockets_parse_in_linear_time(void **state)
{
    (void)state;
    enum { LINES = 40000 };
    static const char established[] =
        "%6d: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1F90 01 "
        "00000000:00000000 00:00000000 00000000     0        0 %d 1 0000000000000000 20 4 30 10 "
        "-1\n";
    size_t cap = (LINES + 2) * 200;
    char *text = malloc(cap);
    assert_non_null(text);
    size_t len = (size_t)snprintf(text, cap, "%s", tcp6);
    for (int i = 0; i < LINES; i++)
        len += (size_t)snprintf(text + len, cap - len, established, i + 2, 1000 + i);
    snprintf(text + len, cap - len,
             "%6d: 00000000000000000000000000000000:1A0B 00000000000000000000000000000000:0000 "
             "0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 "
             "100 0 0 10 0\n",
             LINES + 2);
    struct port_entry e[8];
    size_t n = 0;
    clock_t t0 = clock();
    assert_int_equal(ports_parse(text, true, e, 8, &n), 0);
    double cpu_s = (double)(clock() - t0) / CLOCKS_PER_SEC;
    free(text);
    assert_int_equal(n, 3); /* the two of tcp6[] and the one after the 40000 connections */
    assert_int_equal(e[2].port, 6667);
    assert_int_equal(e[2].inode, 777);
    if (cpu_s > 1.0)
        fail_msg("parsing %d lines took %.2f s of CPU", LINES + 3, cpu_s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ipv4_listeners_only),
        cmocka_unit_test(test_ipv6_listeners),
        cmocka_unit_test(test_cap_and_garbage),
        cmocka_unit_test(test_many_sockets_parse_in_linear_time),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
