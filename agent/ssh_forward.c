/*
 * Port forwarding channels of the agent's SSH server: direct-tcpip (ssh -L, and ssh -D,
 * whose SOCKS requests arrive as direct-tcpip opens).
 *
 * libssh 0.10 answers a channel open inside its message callback and frees the message
 * when the callback returns, so the answer cannot wait for an asynchronous connect. The
 * targets are mostly loopback ports in the workspace, where a non-blocking connect has its
 * outcome by the time connect() returns: a refused port is refused right here. A target
 * whose connect is still in progress (another host) is accepted and the channel closes if
 * the connect then fails. Host names other than "localhost" are not resolved (no blocking
 * DNS on the loop): they are refused. Targets outside the forward policy (loopback unless
 * --forward-allow says more) are refused before any connect.
 *
 * libssh 0.10's only refusal reason is "administratively prohibited": the client sees the
 * open fail, and the agent's log says why (connection refused, ...).
 *
 * The other direction (ssh -R, and agent forwarding) listens in the workspace. Each
 * accepted connection asks the client for a channel (forwarded-tcpip or
 * auth-agent@openssh.com), whose answer the channel's service notices after a pump.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fwdpolicy.h"
#include "sshd_int.h"
#include "tunnel/log.h"

static int target_addr(const char *host, int port, struct sockaddr_storage *sa, socklen_t *len)
{
    memset(sa, 0, sizeof(*sa));
    if (port < 1 || port > 65535)
        return -1;
    if (strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    struct sockaddr_in *v4 = (struct sockaddr_in *)sa;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)sa;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof(*v4);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*v6);
        return 0;
    }
    return -1;
}

/*
 * Starts a non-blocking connect. Returns the socket, with *connecting set if the outcome
 * is not known yet, or a negative errno.
 */
static int start_connect(const struct sockaddr_storage *sa, socklen_t len, bool *connecting)
{
    int fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    *connecting = false;
    if (connect(fd, (const struct sockaddr *)sa, len) < 0) {
        if (errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            return -e;
        }
        /* Loopback answers at once; anything else is left to the loop. */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int err = 0;
        socklen_t elen = sizeof(err);
        if (poll(&p, 1, 0) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 &&
            err != 0) {
            close(fd);
            return -err;
        }
        *connecting = p.revents == 0;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

static int open_direct_tcpip(struct ssh_conn *c, ssh_message msg)
{
    const char *host = ssh_message_channel_request_open_destination(msg);
    int port = ssh_message_channel_request_open_destination_port(msg);
    struct sockaddr_storage sa;
    socklen_t len;
    if (!host || target_addr(host, port, &sa, &len) < 0) {
        log_info("ssh: forward to %s:%d refused: only numeric addresses and localhost",
                 host ? host : "?", port);
        return -1;
    }
    /* host is now an address (or "localhost"), and the one checked is the one dialed. */
    if (!fwdpolicy_allows(c->d->cfg->forward_policy, (const struct sockaddr *)&sa)) {
        char why[FWDPOLICY_REFUSAL_MAX];
        fwdpolicy_refusal(why, sizeof(why), host, (unsigned)port);
        log_info("ssh: forward refused: %s", why);
        return -1; /* libssh answers SSH_OPEN_ADMINISTRATIVELY_PROHIBITED */
    }
    if (c->nchans >= SSHD_MAX_CHANNELS) {
        log_warn("ssh: forward to %s:%d refused: too many channels", host, port);
        return -1;
    }
    bool connecting;
    int fd = start_connect(&sa, len, &connecting);
    if (fd < 0) {
        log_info("ssh: forward to %s:%d: connect failed: %s", host, port, strerror(-fd));
        return -1;
    }
    ssh_channel channel = ssh_message_channel_request_open_reply_accept(msg);
    if (!channel) {
        close(fd);
        return 0; /* answered already, or the session failed */
    }
    log_debug("ssh: forward to %s:%d", host, port);
    if (ssh_chan_attach_socket(c, channel, fd, connecting) < 0)
        ssh_channel_close(channel);
    return 0;
}

/* ---- listeners: ssh -R and the forwarded agent ---- */

static void on_listener_closed(uv_handle_t *h)
{
    struct ssh_listener *l = h->data;
    struct ssh_conn *c = l->conn;
    close(l->fd);
    if (l->is_agent) {
        unlink(l->path);
        char *slash = strrchr(l->path, '/');
        if (slash) {
            *slash = '\0';
            rmdir(l->path);
        }
    }
    free(l);
    ssh_conn_unref(c);
}

static void listener_close(struct ssh_listener *l)
{
    struct ssh_conn *c = l->conn;
    for (struct ssh_listener **pp = &c->listeners; *pp; pp = &(*pp)->next)
        if (*pp == l) {
            *pp = l->next;
            break;
        }
    c->nlisteners--;
    if (l->is_agent)
        c->agent_sock = NULL;
    uv_close((uv_handle_t *)&l->poll, on_listener_closed);
}

static void on_accept(uv_poll_t *h, int status, int events)
{
    struct ssh_listener *l = h->data;
    struct ssh_conn *c = l->conn;
    struct sockaddr_storage sa;
    socklen_t len = sizeof(sa);
    (void)events;
    if (status < 0 || c->closing)
        return;
    int fd = accept4(l->fd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    struct ssh_reverse r = {.is_agent = l->is_agent, .port = l->port};
    snprintf(r.addr, sizeof(r.addr), "%s", l->addr);
    snprintf(r.origin, sizeof(r.origin), "127.0.0.1");
    if (sa.ss_family == AF_INET) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&sa;
        inet_ntop(AF_INET, &v4->sin_addr, r.origin, sizeof(r.origin));
        r.origin_port = ntohs(v4->sin_port);
    } else if (sa.ss_family == AF_INET6) {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&sa;
        inet_ntop(AF_INET6, &v6->sin6_addr, r.origin, sizeof(r.origin));
        r.origin_port = ntohs(v6->sin6_port);
    }
    if (sa.ss_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    c->in_io++;
    if (ssh_chan_open_reverse(c, fd, &r) < 0)
        log_warn("ssh: a forwarded connection was dropped: too many channels");
    c->in_io--;
    ssh_conn_after_io(c);
}

static struct ssh_listener *listener_start(struct ssh_conn *c, int fd, bool is_agent)
{
    struct ssh_listener *l = calloc(1, sizeof(*l));
    if (!l || uv_poll_init(c->d->loop, &l->poll, fd) < 0) {
        free(l);
        close(fd);
        return NULL;
    }
    l->conn = c;
    l->fd = fd;
    l->is_agent = is_agent;
    l->poll.data = l;
    uv_poll_start(&l->poll, UV_READABLE, on_accept);
    l->next = c->listeners;
    c->listeners = l;
    c->nlisteners++;
    c->refs++;
    return l;
}

/* The address a -R listener binds: "" and "*" mean every address, "localhost" loopback. */
static int bind_addr(const char *addr, int port, struct sockaddr_storage *sa, socklen_t *len)
{
    if (!addr[0] || strcmp(addr, "*") == 0)
        addr = "0.0.0.0";
    /* target_addr checks the port is 1..65535; port 0 (any) is set after it. */
    if (target_addr(addr, 1, sa, len) < 0)
        return -1;
    if (sa->ss_family == AF_INET)
        ((struct sockaddr_in *)sa)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)sa)->sin6_port = htons((uint16_t)port);
    return 0;
}

static int tcpip_forward(struct ssh_conn *c, ssh_message msg)
{
    const char *addr = ssh_message_global_request_address(msg);
    int port = ssh_message_global_request_port(msg);
    struct sockaddr_storage sa;
    socklen_t len;
    if (!addr)
        addr = "";
    if (c->nlisteners >= SSHD_MAX_LISTENERS || port < 0 || port > 65535 ||
        bind_addr(addr, port, &sa, &len) < 0) {
        log_info("ssh: remote forward %s:%d refused", addr, port);
        return -1;
    }
    int bound;
    int fd = ssh_tcp_listen(&sa, len, &bound);
    if (fd < 0) {
        log_info("ssh: remote forward %s:%d refused: %s", addr, port, strerror(-fd));
        return -1;
    }
    struct ssh_listener *l = listener_start(c, fd, false);
    if (!l)
        return -1;
    snprintf(l->addr, sizeof(l->addr), "%s", addr);
    l->req_port = port;
    l->port = bound;
    log_info("ssh: remote forward listening on %s:%d", addr[0] ? addr : "*", bound);
    ssh_message_global_request_reply_success(msg, (uint16_t)bound);
    return 0;
}

static int cancel_tcpip_forward(struct ssh_conn *c, ssh_message msg)
{
    const char *addr = ssh_message_global_request_address(msg);
    int port = ssh_message_global_request_port(msg);
    for (struct ssh_listener *l = c->listeners; l; l = l->next)
        if (!l->is_agent && strcmp(l->addr, addr ? addr : "") == 0 &&
            (l->req_port == port || l->port == port)) {
            listener_close(l);
            ssh_message_global_request_reply_success(msg, 0);
            return 0;
        }
    return -1;
}

int ssh_forward_agent(struct ssh_conn *c)
{
    if (c->agent_sock)
        return 0; /* one socket per connection, shared by its sessions */
    char dir[] = "/tmp/tether-agent-XXXXXX";
    if (!mkdtemp(dir)) /* mode 0700: only this user reaches the socket */
        return -1;
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s/agent.sock", dir);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 || listen(fd, 16) < 0) {
        if (fd >= 0)
            close(fd);
        unlink(sun.sun_path);
        rmdir(dir);
        return -1;
    }
    struct ssh_listener *l = listener_start(c, fd, true);
    if (!l) {
        unlink(sun.sun_path);
        rmdir(dir);
        return -1;
    }
    snprintf(l->path, sizeof(l->path), "%s", sun.sun_path);
    c->agent_sock = l->path;
    return 0;
}

void ssh_forward_close_all(struct ssh_conn *c)
{
    while (c->listeners)
        listener_close(c->listeners);
}

int ssh_forward_message(ssh_session session, ssh_message msg, void *ud)
{
    struct ssh_conn *c = ud;
    (void)session;
    int type = ssh_message_type(msg), subtype = ssh_message_subtype(msg);
    if (type == SSH_REQUEST_CHANNEL_OPEN && subtype == SSH_CHANNEL_DIRECT_TCPIP)
        return open_direct_tcpip(c, msg) < 0 ? 1 : 0;
    if (type == SSH_REQUEST_GLOBAL && subtype == SSH_GLOBAL_REQUEST_TCPIP_FORWARD)
        return tcpip_forward(c, msg) < 0 ? 1 : 0;
    if (type == SSH_REQUEST_GLOBAL && subtype == SSH_GLOBAL_REQUEST_CANCEL_TCPIP_FORWARD)
        return cancel_tcpip_forward(c, msg) < 0 ? 1 : 0;
    return 1; /* not ours: libssh refuses it */
}
