#include "fwdpolicy.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* The longest address text a rule may hold: an IPv6 address with an IPv4 tail. */
#define FWDPOLICY_ADDR_TEXT 46

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return FWDPOLICY_E_SYNTAX;
}

void fwdpolicy_init(struct fwdpolicy *p)
{
    memset(p, 0, sizeof(*p));
}

/* Clears the bits of addr beyond prefix, so that matching compares whole bytes. */
static void mask_net(uint8_t *addr, unsigned size, unsigned prefix)
{
    for (unsigned i = 0; i < size; i++) {
        unsigned bits = prefix > i * 8 ? prefix - i * 8 : 0;
        if (bits < 8)
            addr[i] &= (uint8_t)(0xff00u >> bits);
    }
}

static bool prefix_match(const uint8_t *a, const uint8_t *net, unsigned prefix)
{
    unsigned full = prefix / 8, rest = prefix % 8;
    if (memcmp(a, net, full) != 0)
        return false;
    return rest == 0 || (a[full] & (uint8_t)(0xff00u >> rest)) == net[full];
}

/* ::ffff:a.b.c.d: a socket connecting there reaches the IPv4 address a.b.c.d. */
static bool is_v4_mapped(const uint8_t a[16])
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, prefix, sizeof(prefix)) == 0;
}

static bool has_letter(const char *s)
{
    for (; *s; s++)
        if (isalpha((unsigned char)*s))
            return true;
    return false;
}

/*
 * The address part: "[IPV6]" or an IPv4 address, up to '/' or ':'. Sets r->ipv6 and
 * r->addr; *rest points after it.
 */
static int parse_addr(const char *rule, struct fwdpolicy_rule *r, const char **rest, char *err,
                      size_t errlen)
{
    char text[FWDPOLICY_ADDR_TEXT];
    const char *end;
    if (rule[0] == '[') {
        end = strchr(rule, ']');
        if (!end)
            return fail(err, errlen, "'[' without ']' (expected [IPV6]/PREFIX:PORTS)");
        size_t n = (size_t)(end - rule - 1);
        if (n == 0 || n >= sizeof(text))
            return fail(err, errlen, "bad IPv6 address");
        memcpy(text, rule + 1, n);
        text[n] = '\0';
        if (inet_pton(AF_INET6, text, r->addr) != 1)
            return fail(err, errlen, "bad IPv6 address '%s'", text);
        r->ipv6 = true;
        *rest = end + 1;
        return 0;
    }
    if (strchr(rule, ':') != strrchr(rule, ':'))
        return fail(err, errlen, "an IPv6 address goes in brackets (e.g. [fd00::]/8:PORTS)");
    end = rule + strcspn(rule, "/:");
    size_t n = (size_t)(end - rule);
    if (n == 0)
        return fail(err, errlen, "no address (expected CIDR:PORTS, e.g. 10.0.0.0/8:5432)");
    if (n >= sizeof(text))
        return fail(err, errlen, "bad address: too long");
    memcpy(text, rule, n);
    text[n] = '\0';
    if (inet_pton(AF_INET, text, r->addr) != 1) {
        if (has_letter(text))
            return fail(err, errlen,
                        "'%s' is a host name: rules take addresses only (CIDR, e.g. "
                        "10.0.0.0/8:5432)",
                        text);
        return fail(err, errlen, "bad IPv4 address '%s'", text);
    }
    *rest = end;
    return 0;
}

/* One port, 1..65535, decimal digits only; *s moves past it. */
static int parse_port(const char **s, uint16_t *out)
{
    unsigned v = 0, digits = 0;
    const char *p = *s;
    while (*p >= '0' && *p <= '9') {
        if (++digits > 5)
            return -1;
        v = v * 10 + (unsigned)(*p++ - '0');
    }
    if (digits == 0 || v < 1 || v > 65535)
        return -1;
    *out = (uint16_t)v;
    *s = p;
    return 0;
}

/* "N", "N-M", comma-separated, up to FWDPOLICY_MAX_RANGES of them. */
static int parse_ports(const char *s, struct fwdpolicy_rule *r, char *err, size_t errlen)
{
    const char *list = s;
    if (!*s)
        return fail(err, errlen, "no ports after ':' (e.g. 5432, 80,443 or 8000-9000)");
    for (;;) {
        struct fwdpolicy_ports range;
        if (parse_port(&s, &range.lo) < 0)
            return fail(err, errlen, "bad port list '%s': ports are 1..65535", list);
        range.hi = range.lo;
        if (*s == '-') {
            s++;
            if (parse_port(&s, &range.hi) < 0 || range.hi < range.lo)
                return fail(err, errlen, "bad port range in '%s': expected N-M with N <= M", list);
        }
        if (r->nports >= FWDPOLICY_MAX_RANGES)
            return fail(err, errlen, "more than %d port ranges in one rule", FWDPOLICY_MAX_RANGES);
        r->ports[r->nports++] = range;
        if (*s == '\0')
            return 0;
        if (*s != ',')
            return fail(err, errlen, "bad port list '%s': ports are 1..65535", list);
        s++;
    }
}

/* "/N" after the address, or nothing (one address). */
static int parse_prefix(const char **s, struct fwdpolicy_rule *r, char *err, size_t errlen)
{
    unsigned max = r->ipv6 ? 128 : 32;
    r->prefix = (uint8_t)max;
    if (**s != '/')
        return 0;
    const char *p = *s + 1;
    unsigned v = 0, digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 4) {
        v = v * 10 + (unsigned)(*p++ - '0');
        digits++;
    }
    if (digits == 0 || digits > 3 || v > max)
        return fail(err, errlen, "bad prefix length: expected /0 to /%u", max);
    r->prefix = (uint8_t)v;
    *s = p;
    return 0;
}

int fwdpolicy_add(struct fwdpolicy *p, const char *rule, char *err, size_t errlen)
{
    if (p->nrules >= FWDPOLICY_MAX_RULES) {
        fail(err, errlen, "at most %d rules", FWDPOLICY_MAX_RULES);
        return FWDPOLICY_E_LIMIT;
    }
    if (strnlen(rule, FWDPOLICY_MAX_RULE_LEN + 1) > FWDPOLICY_MAX_RULE_LEN)
        return fail(err, errlen, "longer than %d bytes", FWDPOLICY_MAX_RULE_LEN);
    struct fwdpolicy_rule r;
    memset(&r, 0, sizeof(r));
    const char *s = rule;
    int rc = parse_addr(rule, &r, &s, err, errlen);
    if (rc == 0)
        rc = parse_prefix(&s, &r, err, errlen);
    if (rc < 0)
        return rc;
    if (*s != ':')
        return fail(err, errlen, "expected CIDR:PORTS (e.g. 10.0.0.0/8:5432)");
    rc = parse_ports(s + 1, &r, err, errlen);
    if (rc < 0)
        return rc;
    if (r.ipv6 && r.prefix >= 96 && is_v4_mapped(r.addr)) {
        /* [::ffff:10.0.0.0]/104 is 10.0.0.0/8: stored so, it covers both forms too. */
        memmove(r.addr, r.addr + 12, 4);
        memset(r.addr + 4, 0, 12);
        r.ipv6 = false;
        r.prefix = (uint8_t)(r.prefix - 96);
    }
    mask_net(r.addr, r.ipv6 ? 16 : 4, r.prefix);
    p->rules[p->nrules++] = r;
    return 0;
}

/* The address bytes (4 or 16) and port of sa; -1 for another family. */
static int target_of(const struct sockaddr *sa, const uint8_t **addr, bool *ipv6, uint16_t *port)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)sa;
        *addr = (const uint8_t *)&v4->sin_addr;
        *ipv6 = false;
        *port = ntohs(v4->sin_port);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)sa;
        *addr = v6->sin6_addr.s6_addr;
        *ipv6 = true;
        *port = ntohs(v6->sin6_port);
        return 0;
    }
    return -1;
}

static bool addr_is_loopback(const uint8_t *a, bool ipv6)
{
    static const uint8_t v6_loopback[16] = {[15] = 1};
    if (!ipv6)
        return a[0] == 127;
    return memcmp(a, v6_loopback, 16) == 0 || (is_v4_mapped(a) && a[12] == 127);
}

bool fwdpolicy_is_loopback(const struct sockaddr *sa)
{
    const uint8_t *a;
    bool ipv6;
    uint16_t port;
    return target_of(sa, &a, &ipv6, &port) == 0 && addr_is_loopback(a, ipv6);
}

static bool rule_covers(const struct fwdpolicy_rule *r, const uint8_t *a, bool ipv6, uint16_t port)
{
    if (r->ipv6 != ipv6 || !prefix_match(a, r->addr, r->prefix))
        return false;
    for (unsigned i = 0; i < r->nports; i++)
        if (port >= r->ports[i].lo && port <= r->ports[i].hi)
            return true;
    return false;
}

bool fwdpolicy_allows(const struct fwdpolicy *p, const struct sockaddr *sa)
{
    const uint8_t *a;
    bool ipv6;
    uint16_t port;
    if (target_of(sa, &a, &ipv6, &port) < 0)
        return false;
    if (addr_is_loopback(a, ipv6))
        return true;
    if (!p)
        return false;
    bool mapped = ipv6 && is_v4_mapped(a);
    for (unsigned i = 0; i < p->nrules; i++)
        if (rule_covers(&p->rules[i], a, ipv6, port) ||
            (mapped && rule_covers(&p->rules[i], a + 12, false, port)))
            return true;
    return false;
}

void fwdpolicy_refusal(char *out, size_t outlen, const char *host, unsigned port)
{
    bool v6 = strchr(host, ':') != NULL;
    snprintf(out, outlen, "administratively prohibited: %s%s%s:%u is not allowed (--forward-allow)",
             v6 ? "[" : "", host, v6 ? "]" : "", port);
}
