/*
 * ports: the TCP ports that listen in the workspace, read from /proc/net/tcp and tcp6, so
 * the control plane can offer them (PROTOCOL.md 12.6). The agent scans on a timer and
 * reports only when the set changed; the owning process's name is looked up (through
 * /proc/PID/fd) only then, and only where this user may read it.
 *
 * Scanning is a wake-up, and an idle workspace should not wake up for nothing: the scanner
 * reads every interval while the workspace is in use (in_use says so, or it did less than
 * idle_after_ms ago) and, once idle, only when ports_scanner_idle_scan is called (the
 * agent calls it from its stats timer, which wakes it anyway), or every PORTS_IDLE_SCAN_MS
 * if nothing does. ports_scanner_wake brings it back to the interval at once.
 */
#ifndef TETHER_PORTS_H
#define TETHER_PORTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#define PORTS_MAX 512               /* listeners reported; more are cut (and said so) */
#define PORTS_SCAN_MS_DEFAULT 2000u /* how often /proc/net/tcp* is read while in use */
#define PORTS_IDLE_AFTER_MS 60000u  /* default: not in use for this long means idle */
#define PORTS_IDLE_SCAN_MS 60000u   /* idle, and no ports_scanner_idle_scan for this long */

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
/* changed(ud, msg): a "ports" control message (borrowed) to send; in_use(ud): whether the
 * workspace is in use now. The scanner starts in use. */
struct ports_scanner *ports_scanner_new(uv_loop_t *loop, uint64_t interval_ms,
                                        uint64_t idle_after_ms,
                                        void (*changed)(void *ud, json_t *msg),
                                        bool (*in_use)(void *ud), void *ud);
/* The workspace is in use again (a stream opened): scans now if it was idle, then on the
 * interval. */
void ports_scanner_wake(struct ports_scanner *s);
/* Scans if idle; nothing otherwise (the interval's scans are enough). */
void ports_scanner_idle_scan(struct ports_scanner *s);
/* Ports to report besides the listeners, as the "forward_ports" array (devcontainer.json's
 * forwardPorts; the scanner takes the reference; NULL: none). Reported with the next scan. */
void ports_scanner_set_forward(struct ports_scanner *s, json_t *forward_ports);
/* Forgets what was reported, so the next scan reports again (after a reconnect). */
void ports_scanner_reset(struct ports_scanner *s);
void ports_scanner_free(struct ports_scanner *s);

#endif
