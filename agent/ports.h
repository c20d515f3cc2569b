/*
 * ports: the TCP ports that listen in the workspace, read from /proc/net/tcp and tcp6, so
 * the control plane can offer them (PROTOCOL.md 12.6). The agent scans on a timer and
 * reports only when the set changed; the owning process's name is looked up (through
 * /proc/PID/fd) only then, and only where this user may read it.
 */
#ifndef TETHER_PORTS_H
#define TETHER_PORTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#define PORTS_MAX 512               /* listeners reported; more are cut (and said so) */
#define PORTS_SCAN_MS_DEFAULT 2000u /* how often /proc/net/tcp* is read */

struct port_entry {
    uint16_t port;
    bool ipv6;
    char address[48]; /* as text: "0.0.0.0", "::", "127.0.0.1" */
    unsigned long inode;
    char process[64]; /* "" when unknown */
};

/*
 * Parses the text of /proc/net/tcp (ipv6 false) or tcp6 (true) and appends its LISTEN
 * sockets to out (at most cap in all; *n counts them). Returns 0, or -1 for text that is
 * not in that format (nothing appended from it).
 */
int ports_parse(const char *text, bool ipv6, struct port_entry *out, size_t cap, size_t *n);

struct ports_scanner;
/* changed(ud, msg): a "ports" control message (borrowed) to send. */
struct ports_scanner *ports_scanner_new(uv_loop_t *loop, uint64_t interval_ms,
                                        void (*changed)(void *ud, json_t *msg), void *ud);
/* Ports to report besides the listeners, as the "forward_ports" array (devcontainer.json's
 * forwardPorts; the scanner takes the reference; NULL: none). Reported with the next scan. */
void ports_scanner_set_forward(struct ports_scanner *s, json_t *forward_ports);
/* Forgets what was reported, so the next scan reports again (after a reconnect). */
void ports_scanner_reset(struct ports_scanner *s);
void ports_scanner_free(struct ports_scanner *s);

#endif
