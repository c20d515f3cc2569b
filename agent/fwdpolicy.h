/*
 * fwdpolicy: which targets the agent's port forwards may reach (tunnel streams of kind tcp,
 * and SSH direct-tcpip channels: ssh -L and -D).
 *
 * Loopback (127.0.0.0/8, ::1, and ::ffff:127.0.0.0/104) is always allowed: that is what a
 * workspace's forwards are for. Everything else needs a rule from `--forward-allow
 * CIDR:PORTS`, so a hostile relay, or an SSH client, cannot use the agent to reach the
 * workspace's network. Rules name addresses only, never host names: a rule must mean the
 * same thing whatever DNS says later.
 *
 * Rule syntax (one rule per --forward-allow):
 *   10.0.0.0/8:5432            IPv4 CIDR
 *   192.168.1.7:80,443         one IPv4 address (/32)
 *   [fd00::]/8:1-65535         IPv6 CIDR, the address in brackets
 *   [fd00::7]:22               one IPv6 address (/128)
 *   0.0.0.0/0:80,443,8000-9000 ports: a comma-separated list of N or N-M, 1..65535
 * Bits set beyond the prefix length are ignored (10.1.2.3/8 means 10.0.0.0/8). An
 * IPv4-mapped rule ([::ffff:10.0.0.0]/104) is stored as the IPv4 rule it means.
 *
 * Pure: no I/O and no allocation; a policy is one fixed-size struct that the caller owns.
 */
#ifndef TETHER_FWDPOLICY_H
#define TETHER_FWDPOLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <sys/socket.h>

#define FWDPOLICY_MAX_RULES 64     /* --forward-allow options per agent */
#define FWDPOLICY_MAX_RANGES 16    /* port ranges ("N" or "N-M") in one rule */
#define FWDPOLICY_MAX_RULE_LEN 256 /* bytes of one rule's text */

/* fwdpolicy_add's errors (err says which part of the rule is wrong). */
#define FWDPOLICY_E_SYNTAX (-1) /* not CIDR:PORTS, a host name, a bad prefix or port */
#define FWDPOLICY_E_LIMIT (-2)  /* more than FWDPOLICY_MAX_RULES rules */

struct fwdpolicy_ports {
    uint16_t lo, hi; /* inclusive, 1 <= lo <= hi */
};

struct fwdpolicy_rule {
    bool ipv6;
    uint8_t prefix;   /* 0..32 or 0..128 */
    uint8_t addr[16]; /* the network, bits beyond prefix cleared; IPv4 uses the first 4 */
    unsigned nports;
    struct fwdpolicy_ports ports[FWDPOLICY_MAX_RANGES];
};

struct fwdpolicy {
    unsigned nrules;
    struct fwdpolicy_rule rules[FWDPOLICY_MAX_RULES];
};

/* An empty policy: loopback only. */
void fwdpolicy_init(struct fwdpolicy *p);

/*
 * Parses rule (syntax above) and adds it to p. Returns 0, or FWDPOLICY_E_* with a one-line
 * reason in err (which names no option: the caller adds that); p is unchanged then.
 */
int fwdpolicy_add(struct fwdpolicy *p, const char *rule, char *err, size_t errlen);

/*
 * May a forward connect to sa (AF_INET or AF_INET6, with its port)? p NULL means the empty
 * policy. An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it maps to, and
 * is allowed if a rule covers either form. Other families are never allowed.
 */
bool fwdpolicy_allows(const struct fwdpolicy *p, const struct sockaddr *sa);

/* Is sa a loopback address (allowed whatever the rules)? */
bool fwdpolicy_is_loopback(const struct sockaddr *sa);

/*
 * The text both kinds of forward give for a refused target (OPEN_FAIL's reason, the log):
 * "administratively prohibited: HOST:PORT is not allowed (--forward-allow)", with an IPv6
 * HOST in brackets. HOST is the target as the peer named it; FWDPOLICY_REFUSAL_MAX holds it
 * for any host of up to 255 bytes (longer ones are cut).
 */
#define FWDPOLICY_REFUSAL_MAX 336
void fwdpolicy_refusal(char *out, size_t outlen, const char *host, unsigned port);

#endif
