/* The forward policy: which targets port forwards may reach, and --forward-allow's rules. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <cmocka.h>

#include "agent/fwdpolicy.h"

/* The target ADDR:PORT as a socket address; an address with ':' is IPv6. */
static const struct sockaddr *target(const char *addr, unsigned port)
{
    static struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (strchr(addr, ':')) {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        assert_int_equal(inet_pton(AF_INET6, addr, &v6->sin6_addr), 1);
    } else {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        assert_int_equal(inet_pton(AF_INET, addr, &v4->sin_addr), 1);
    }
    return (const struct sockaddr *)&ss;
}

static bool allows(const struct fwdpolicy *p, const char *addr, unsigned port)
{
    return fwdpolicy_allows(p, target(addr, port));
}

/* A policy of the given rules, each of which must parse. */
static void policy_of(struct fwdpolicy *p, const char *const *rules)
{
    char err[256];
    fwdpolicy_init(p);
    for (; *rules; rules++) {
        err[0] = '\0';
        int rc = fwdpolicy_add(p, *rules, err, sizeof(err));
        if (rc != 0)
            fail_msg("rule '%s' refused: %s", *rules, err);
    }
}

static void test_loopback_only_by_default(void **state)
{
    (void)state;
    struct fwdpolicy empty;
    fwdpolicy_init(&empty);
    const struct fwdpolicy *policies[] = {NULL, &empty};
    for (int i = 0; i < 2; i++) {
        const struct fwdpolicy *p = policies[i];
        assert_true(allows(p, "127.0.0.1", 8080));
        assert_true(allows(p, "127.255.1.2", 1));
        assert_true(allows(p, "::1", 65535));
        assert_true(allows(p, "::ffff:127.0.0.1", 22));
        assert_false(allows(p, "10.0.0.1", 8080));
        assert_false(allows(p, "192.0.2.2", 22));
        assert_false(allows(p, "169.254.169.254", 80)); /* cloud metadata */
        assert_false(allows(p, "128.0.0.1", 80));
        assert_false(allows(p, "126.255.255.255", 80));
        assert_false(allows(p, "0.0.0.0", 80)); /* not loopback, even if Linux routes it so */
        assert_false(allows(p, "::", 80));
        assert_false(allows(p, "::2", 80));
        assert_false(allows(p, "fd00::1", 80));
        assert_false(allows(p, "::ffff:10.0.0.1", 80)); /* IPv4-mapped: the IPv4 address */
        assert_false(allows(p, "::7f00:1", 80));        /* IPv4-compatible is not loopback */
    }
    assert_true(fwdpolicy_is_loopback(target("127.0.0.1", 1)));
    assert_false(fwdpolicy_is_loopback(target("10.0.0.1", 1)));
}

static void test_ipv4_cidr_and_port(void **state)
{
    (void)state;
    struct fwdpolicy p;
    policy_of(&p, (const char *const[]){"10.0.0.0/8:5432", NULL});
    assert_true(allows(&p, "10.0.0.0", 5432));
    assert_true(allows(&p, "10.255.255.255", 5432));
    assert_true(allows(&p, "::ffff:10.1.2.3", 5432)); /* the same host through an AF_INET6 socket */
    assert_false(allows(&p, "10.1.2.3", 5431));
    assert_false(allows(&p, "10.1.2.3", 5433));
    assert_false(allows(&p, "11.0.0.1", 5432));
    assert_false(allows(&p, "9.255.255.255", 5432));
    assert_false(allows(&p, "a00::1", 5432)); /* the same bytes in IPv6 are another host */
    assert_true(allows(&p, "127.0.0.1", 80)); /* loopback stays allowed */
}

static void test_port_lists_and_ranges(void **state)
{
    (void)state;
    struct fwdpolicy p;
    policy_of(&p, (const char *const[]){"0.0.0.0/0:80,443,8000-9000", NULL});
    unsigned yes[] = {80, 443, 8000, 8500, 9000};
    unsigned no[] = {1, 79, 81, 442, 444, 7999, 9001, 65535};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
        assert_true(allows(&p, "203.0.113.9", yes[i]));
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
        assert_false(allows(&p, "203.0.113.9", no[i]));
    assert_false(allows(&p, "2001:db8::1", 80)); /* an IPv4 rule says nothing about IPv6 */
    policy_of(&p, (const char *const[]){"0.0.0.0/0:1-65535", NULL});
    assert_true(allows(&p, "8.8.8.8", 1));
    assert_true(allows(&p, "8.8.8.8", 65535));
}

static void test_ipv6_cidr(void **state)
{
    (void)state;
    struct fwdpolicy p;
    policy_of(&p, (const char *const[]){"[fd00::]/8:1-65535", "[2001:db8::7]:22", NULL});
    assert_true(allows(&p, "fd00::1", 1));
    assert_true(allows(&p, "fdff:ffff::1", 65535));
    assert_false(allows(&p, "fc00::1", 80));
    assert_false(allows(&p, "fe80::1", 80));
    assert_false(allows(&p, "10.0.0.1", 80));
    assert_true(allows(&p, "2001:db8::7", 22)); /* no prefix: that one address */
    assert_false(allows(&p, "2001:db8::8", 22));
    assert_false(allows(&p, "2001:db8::7", 23));
}

static void test_prefix_edges_and_host_bits(void **state)
{
    (void)state;
    struct fwdpolicy p;
    policy_of(&p, (const char *const[]){"192.168.1.7:80", "10.1.2.3/8:81", "172.16.0.1/31:82",
                                        "198.51.100.0/25:83", "[::]/0:84", NULL});
    assert_true(allows(&p, "192.168.1.7", 80)); /* a bare address is /32 */
    assert_false(allows(&p, "192.168.1.6", 80));
    assert_false(allows(&p, "192.168.1.8", 80));
    assert_true(allows(&p, "10.9.9.9", 81)); /* host bits beyond /8 are ignored */
    assert_true(allows(&p, "172.16.0.0", 82));
    assert_true(allows(&p, "172.16.0.1", 82));
    assert_false(allows(&p, "172.16.0.2", 82));
    assert_true(allows(&p, "198.51.100.127", 83));
    assert_false(allows(&p, "198.51.100.128", 83));
    assert_true(allows(&p, "2001:db8::1", 84));
    assert_true(allows(&p, "::ffff:203.0.113.1", 84)); /* in ::/0 as written */
    assert_false(allows(&p, "203.0.113.1", 84));
}

static void test_ipv4_mapped_rule_is_the_ipv4_rule(void **state)
{
    (void)state;
    struct fwdpolicy p;
    policy_of(&p, (const char *const[]){"[::ffff:10.0.0.0]/104:80", NULL});
    assert_true(allows(&p, "10.2.3.4", 80));
    assert_true(allows(&p, "::ffff:10.2.3.4", 80));
    assert_false(allows(&p, "11.2.3.4", 80));
}

static void test_other_families_are_refused(void **state)
{
    (void)state;
    struct fwdpolicy p;
    policy_of(&p, (const char *const[]){"0.0.0.0/0:1-65535", "[::]/0:1-65535", NULL});
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    assert_false(fwdpolicy_allows(&p, (const struct sockaddr *)&sun));
    assert_false(fwdpolicy_is_loopback((const struct sockaddr *)&sun));
}

static void test_bad_rules_are_refused_with_a_reason(void **state)
{
    (void)state;
    static const struct {
        const char *rule, *said;
    } bad[] = {
        {"db.internal:5432", "host name"},
        {"localhost:80", "host name"},
        {"db.internal/24:5432", "host name"},
        {"fd00::/8:80", "brackets"},
        {"[fd00::/8:80", "]"},
        {"[fd00::]/129:80", "prefix"},
        {"[fe80::1%eth0]:22", "IPv6"},
        {"[]:22", "IPv6"},
        {"[10.0.0.1]:22", "IPv6"},
        {"10.0.0.0/33:80", "prefix"},
        {"10.0.0.0/:80", "prefix"},
        {"10.0.0.0/-1:80", "prefix"},
        {"10.0.0.0/0008:80", "prefix"},
        {"10.0.0.256/8:80", "IPv4"},
        {"10.0.0/8:80", "IPv4"},
        {"10.0.0.0/8", "CIDR:PORTS"},
        {"10.0.0.0/8x:80", "CIDR:PORTS"},
        {"10.0.0.0/8:", "no ports"},
        {"10.0.0.0/8:0", "1..65535"},
        {"10.0.0.0/8:65536", "1..65535"},
        {"10.0.0.0/8:123456", "1..65535"},
        {"10.0.0.0/8:+80", "1..65535"},
        {"10.0.0.0/8:80,", "1..65535"},
        {"10.0.0.0/8:,80", "1..65535"},
        {"10.0.0.0/8:80 ", "1..65535"},
        {"10.0.0.0/8:8a", "1..65535"},
        {"10.0.0.0/8:90-80", "N <= M"},
        {"10.0.0.0/8:80-", "N <= M"},
        {"10.0.0.0/8:*", "1..65535"},
        {"/8:80", "no address"},
        {":80", "no address"},
        {"", "no address"},
    };
    struct fwdpolicy p;
    fwdpolicy_init(&p);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char err[256] = "";
        int rc = fwdpolicy_add(&p, bad[i].rule, err, sizeof(err));
        if (rc != FWDPOLICY_E_SYNTAX)
            fail_msg("rule '%s': %d, expected FWDPOLICY_E_SYNTAX", bad[i].rule, rc);
        if (!strstr(err, bad[i].said))
            fail_msg("rule '%s': '%s' does not say '%s'", bad[i].rule, err, bad[i].said);
        assert_null(strchr(err, '\n'));
        assert_int_equal(p.nrules, 0); /* a refused rule adds nothing */
    }
    assert_false(allows(&p, "10.0.0.1", 80));
}

static void test_limits(void **state)
{
    (void)state;
    struct fwdpolicy p;
    char err[256], rule[FWDPOLICY_MAX_RULE_LEN + 64];
    fwdpolicy_init(&p);
    /* FWDPOLICY_MAX_RANGES port ranges in one rule, but not one more. */
    size_t n = (size_t)snprintf(rule, sizeof(rule), "10.0.0.0/8:");
    for (unsigned i = 1; i <= FWDPOLICY_MAX_RANGES; i++)
        n += (size_t)snprintf(rule + n, sizeof(rule) - n, "%s%u", i > 1 ? "," : "", 1000 + i);
    assert_int_equal(fwdpolicy_add(&p, rule, err, sizeof(err)), 0);
    assert_true(allows(&p, "10.0.0.1", 1000 + FWDPOLICY_MAX_RANGES));
    snprintf(rule + n, sizeof(rule) - n, ",2000");
    assert_int_equal(fwdpolicy_add(&p, rule, err, sizeof(err)), FWDPOLICY_E_SYNTAX);
    assert_non_null(strstr(err, "port ranges"));
    assert_int_equal(p.nrules, 1);
    /* Rule text longer than FWDPOLICY_MAX_RULE_LEN. */
    memset(rule, '1', sizeof(rule) - 1);
    rule[sizeof(rule) - 1] = '\0';
    memcpy(rule, "10.0.0.0/8:80,", 14);
    assert_int_equal(fwdpolicy_add(&p, rule, err, sizeof(err)), FWDPOLICY_E_SYNTAX);
    assert_non_null(strstr(err, "longer than"));
    /* FWDPOLICY_MAX_RULES rules, but not one more. */
    fwdpolicy_init(&p);
    for (unsigned i = 0; i < FWDPOLICY_MAX_RULES; i++) {
        snprintf(rule, sizeof(rule), "10.0.%u.0/24:%u", i, 100 + i);
        assert_int_equal(fwdpolicy_add(&p, rule, err, sizeof(err)), 0);
    }
    assert_true(allows(&p, "10.0.63.5", 163));
    assert_false(allows(&p, "10.0.63.5", 162));
    assert_int_equal(fwdpolicy_add(&p, "10.1.0.0/16:80", err, sizeof(err)), FWDPOLICY_E_LIMIT);
    assert_non_null(strstr(err, "at most"));
    assert_false(allows(&p, "10.1.0.1", 80));
    /* A NULL or empty err is fine. */
    assert_int_equal(fwdpolicy_add(&p, "nope", NULL, 0), FWDPOLICY_E_LIMIT);
}

static void test_refusal_text(void **state)
{
    (void)state;
    char out[FWDPOLICY_REFUSAL_MAX];
    fwdpolicy_refusal(out, sizeof(out), "10.0.0.1", 5432);
    assert_string_equal(
        out, "administratively prohibited: 10.0.0.1:5432 is not allowed (--forward-allow)");
    fwdpolicy_refusal(out, sizeof(out), "fd00::1", 80);
    assert_string_equal(
        out, "administratively prohibited: [fd00::1]:80 is not allowed (--forward-allow)");
    /* The longest host a tcp OPEN can carry fits whole. */
    char host[256];
    memset(host, 'a', 255);
    host[255] = '\0';
    fwdpolicy_refusal(out, sizeof(out), host, 65535);
    assert_non_null(strstr(out, host));
    assert_non_null(strstr(out, ":65535 is not allowed (--forward-allow)"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loopback_only_by_default),
        cmocka_unit_test(test_ipv4_cidr_and_port),
        cmocka_unit_test(test_port_lists_and_ranges),
        cmocka_unit_test(test_ipv6_cidr),
        cmocka_unit_test(test_prefix_edges_and_host_bits),
        cmocka_unit_test(test_ipv4_mapped_rule_is_the_ipv4_rule),
        cmocka_unit_test(test_other_families_are_refused),
        cmocka_unit_test(test_bad_rules_are_refused_with_a_reason),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_refusal_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
