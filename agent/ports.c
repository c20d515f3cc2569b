#include "ports.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tunnel/log.h"

/* st of a listening socket in /proc/net/tcp* (the kernel's TCP_LISTEN) */
#define PROC_NET_ST_LISTEN 0x0A
#define PROC_NET_MAX (4u * 1024 * 1024) /* bytes of one /proc/net/tcp* file read */
/* The fields read from a /proc/net/tcp* line are in its first 160 bytes or so. */
#define PROC_NET_LINE_MAX 256

struct ports_scanner {
    uv_loop_t *loop;
    uv_timer_t timer;
    uint64_t interval_ms, idle_after_ms;
    bool idle;            /* the timer runs every PORTS_IDLE_SCAN_MS, not every interval */
    uint64_t last_use_ms; /* when in_use last said yes (or the scanner started) */
    void (*changed)(void *ud, json_t *msg);
    bool (*in_use)(void *ud);
    void *ud;
    struct port_entry *last;
    size_t nlast;
    bool reported;    /* something was sent since the last reset */
    bool unavailable; /* /proc could not be read at the last scan */
    json_t *forward;  /* "forward_ports" to add to each report, or NULL */
};

static int hex_addr(const char *hex, bool ipv6, char *out, size_t cap)
{
    if (!ipv6) {
        if (strlen(hex) != 8)
            return -1;
        struct in_addr a;
        a.s_addr = (uint32_t)strtoul(hex, NULL, 16); /* printed from the raw word */
        return inet_ntop(AF_INET, &a, out, (socklen_t)cap) ? 0 : -1;
    }
    if (strlen(hex) != 32)
        return -1;
    struct in6_addr a;
    for (int i = 0; i < 4; i++) {
        char word[9];
        memcpy(word, hex + 8 * i, 8);
        word[8] = '\0';
        uint32_t w = (uint32_t)strtoul(word, NULL, 16);
        memcpy((uint8_t *)&a + 4 * i, &w, 4);
    }
    return inet_ntop(AF_INET6, &a, out, (socklen_t)cap) ? 0 : -1;
}

int ports_parse(const char *text, bool ipv6, struct port_entry *out, size_t cap, size_t *n)
{
    const char *line = strchr(text, '\n'); /* the header */
    if (!line || !strstr(text, "local_address"))
        return -1;
    for (line++; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : line + strlen(line)) {
        char addr[40], one[PROC_NET_LINE_MAX];
        unsigned port, state;
        unsigned long inode;
        /* sscanf gets this line alone: glibc's sscanf measures its whole input first, which
         * made a scan quadratic in the number of sockets (seconds under valgrind). */
        snprintf(one, sizeof(one), "%.*s", (int)strcspn(line, "\n"), line);
        if (sscanf(one, " %*u: %39[0-9A-Fa-f]:%x %*s %x %*s %*s %*s %*u %*d %lu", addr, &port,
                   &state, &inode) != 4)
            continue;
        if (state != PROC_NET_ST_LISTEN || port == 0 || port > 65535 || *n >= cap)
            continue;
        struct port_entry *e = &out[*n];
        memset(e, 0, sizeof(*e));
        if (hex_addr(addr, ipv6, e->address, sizeof(e->address)) < 0)
            continue;
        e->port = (uint16_t)port;
        e->ipv6 = ipv6;
        e->inode = inode;
        (*n)++;
    }
    return 0;
}

static char *read_small(const char *path, size_t max)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 16384, len = 0;
    char *buf = malloc(cap + 1);
    ssize_t r;
    while (buf && (r = read(fd, buf + len, cap - len)) > 0) {
        len += (size_t)r;
        if (len == cap && cap < max) {
            char *b = realloc(buf, (cap *= 2) + 1);
            if (!b) {
                free(buf);
                buf = NULL;
            }
            buf = b;
        } else if (len == cap) {
            break; /* more than max: what was read is what is reported */
        }
    }
    close(fd);
    if (buf)
        buf[len] = '\0';
    return buf;
}

/* Names the processes that own the listeners' sockets, where /proc lets us see them. */
static void name_owners(struct port_entry *e, size_t n)
{
    DIR *proc = opendir("/proc");
    if (!proc)
        return;
    struct dirent *d;
    size_t named = 0;
    while ((d = readdir(proc)) && named < n) {
        if (!isdigit((unsigned char)d->d_name[0]))
            continue;
        char path[600], link[64];
        snprintf(path, sizeof(path), "/proc/%s/fd", d->d_name);
        DIR *fds = opendir(path);
        if (!fds)
            continue; /* another user's process */
        struct dirent *f;
        while ((f = readdir(fds))) {
            snprintf(path, sizeof(path), "/proc/%s/fd/%s", d->d_name, f->d_name);
            ssize_t l = readlink(path, link, sizeof(link) - 1);
            if (l <= 0)
                continue;
            link[l] = '\0';
            unsigned long ino;
            if (sscanf(link, "socket:[%lu]", &ino) != 1)
                continue;
            for (size_t i = 0; i < n; i++) {
                if (e[i].inode != ino || e[i].process[0])
                    continue;
                snprintf(path, sizeof(path), "/proc/%s/comm", d->d_name);
                char *comm = read_small(path, 64);
                if (comm) {
                    comm[strcspn(comm, "\n")] = '\0';
                    snprintf(e[i].process, sizeof(e[i].process), "%s", comm);
                    free(comm);
                    named++;
                }
            }
        }
        closedir(fds);
    }
    closedir(proc);
}

static int entry_cmp(const void *a, const void *b)
{
    const struct port_entry *x = a, *y = b;
    if (x->port != y->port)
        return x->port < y->port ? -1 : 1;
    if (x->ipv6 != y->ipv6)
        return x->ipv6 ? 1 : -1;
    return strcmp(x->address, y->address);
}

static bool same_set(const struct port_entry *a, size_t na, const struct port_entry *b, size_t nb)
{
    if (na != nb)
        return false;
    for (size_t i = 0; i < na; i++)
        if (entry_cmp(&a[i], &b[i]) != 0)
            return false;
    return true;
}

static void scan(struct ports_scanner *s)
{
    /* Not calloc: ports_parse clears each entry it fills, and zeroing 512 entries (64 KiB)
     * every scan kept those pages resident in an idle agent. */
    struct port_entry *e = malloc(PORTS_MAX * sizeof(*e));
    if (!e)
        return;
    size_t n = 0;
    bool ok = false;
    int err = 0; /* why the last file could not be read */
    static const char *const files[2] = {"/proc/net/tcp", "/proc/net/tcp6"};
    for (int v6 = 0; v6 < 2; v6++) {
        char *text = read_small(files[v6], PROC_NET_MAX);
        if (!text)
            err = errno;
        if (text && ports_parse(text, v6, e, PORTS_MAX, &n) == 0)
            ok = true;
        free(text);
    }
    qsort(e, n, sizeof(*e), entry_cmp);
    if (s->reported && ok == !s->unavailable && same_set(e, n, s->last, s->nlast)) {
        free(e);
        return;
    }
    if (!ok && !s->unavailable)
        log_warn("cannot read /proc/net/tcp or tcp6 (%s): listening ports are unavailable",
                 err ? strerror(err) : "unexpected contents");
    name_owners(e, n);
    json_t *list = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *p = json_pack("{s:i, s:s, s:s}", "port", e[i].port, "family",
                              e[i].ipv6 ? "ipv6" : "ipv4", "address", e[i].address);
        if (p && e[i].process[0])
            json_object_set_new(p, "process", json_string(e[i].process));
        json_array_append_new(list, p);
    }
    json_t *msg = json_pack("{s:s, s:o, s:b}", "type", "ports", "ports", list, "available", ok);
    if (msg && s->forward)
        json_object_set(msg, "forward_ports", s->forward);
    if (msg)
        s->changed(s->ud, msg);
    json_decref(msg);
    free(s->last);
    /* Kept for the next comparison at its own size: the room for PORTS_MAX goes back. */
    struct port_entry *fit = realloc(e, (n ? n : 1) * sizeof(*e));
    s->last = fit ? fit : e;
    s->nlast = n;
    s->reported = true;
    s->unavailable = !ok;
}

static void on_scan(uv_timer_t *t);

static void set_idle(struct ports_scanner *s, bool idle)
{
    s->idle = idle;
    uint64_t every = idle ? PORTS_IDLE_SCAN_MS : s->interval_ms;
    uv_timer_start(&s->timer, on_scan, every, every);
}

static void on_scan(uv_timer_t *t)
{
    struct ports_scanner *s = t->data;
    scan(s);
    uint64_t now = uv_now(s->loop);
    if (s->in_use(s->ud))
        s->last_use_ms = now;
    else if (!s->idle && now - s->last_use_ms >= s->idle_after_ms)
        set_idle(s, true);
}

struct ports_scanner *ports_scanner_new(uv_loop_t *loop, uint64_t interval_ms,
                                        uint64_t idle_after_ms,
                                        void (*changed)(void *ud, json_t *msg),
                                        bool (*in_use)(void *ud), void *ud)
{
    struct ports_scanner *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->loop = loop;
    s->interval_ms = interval_ms;
    s->idle_after_ms = idle_after_ms;
    s->changed = changed;
    s->in_use = in_use;
    s->ud = ud;
    s->last_use_ms = uv_now(loop);
    uv_timer_init(loop, &s->timer);
    s->timer.data = s;
    set_idle(s, false);
    return s;
}

void ports_scanner_wake(struct ports_scanner *s)
{
    s->last_use_ms = uv_now(s->loop);
    if (!s->idle)
        return;
    scan(s);
    set_idle(s, false);
}

void ports_scanner_idle_scan(struct ports_scanner *s)
{
    if (!s->idle)
        return;
    scan(s);
    set_idle(s, true); /* the fallback timer counts from this scan */
}

void ports_scanner_reset(struct ports_scanner *s)
{
    s->reported = false;
    scan(s);
}

void ports_scanner_set_forward(struct ports_scanner *s, json_t *forward_ports)
{
    json_decref(s->forward);
    s->forward = forward_ports;
    s->reported = false; /* the next scan reports, with them */
}

static void on_closed(uv_handle_t *h)
{
    struct ports_scanner *s = h->data;
    json_decref(s->forward);
    free(s->last);
    free(s);
}

void ports_scanner_free(struct ports_scanner *s)
{
    if (s)
        uv_close((uv_handle_t *)&s->timer, on_closed);
}
