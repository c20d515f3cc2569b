/*
 * tether forward: listens on a local TCP port; every accepted connection becomes one
 * websocket to the relay's /api/v1/workspaces/NAME/tcp/PORT, which the relay turns into one
 * tunnel stream to 127.0.0.1:PORT inside the workspace.
 *
 * Byte stream over the websocket: binary messages carry the bytes; an empty binary message
 * means "no more from me" (a TCP half-close); the relay closes with 1000 when both ends are
 * done, or with 4000+code and a reason when the stream failed (PROTOCOL.md).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "tcpreset.h"
#include "commands.h"
#include "proto/proto.h"
#include "tunnel/chunkq.h"
#include "tunnel/log.h"
#include "tunnel/wsc.h"

/* Bytes read from a local connection and not yet sent: reading pauses above this. */
#define FWD_TO_WS_MAX (256u * 1024)
/* The least free space worth reading into: below it, a fresh block is started. */
#define FWD_READ_MIN (16u * 1024)
/* Bytes waiting for the local socket: the websocket is paused above this. */
#define FWD_TO_TCP_MAX (1024u * 1024)

static const char forward_usage[] =
    "usage: tether forward --url URL --token-file FILE WORKSPACE "
    "[BIND_ADDR:]LOCAL_PORT:REMOTE_PORT\n"
    "\n"
    "Listens on BIND_ADDR:LOCAL_PORT (default 127.0.0.1) and forwards every connection to\n"
    "127.0.0.1:REMOTE_PORT inside WORKSPACE, through the relay.\n"
    "\n"
    "  --url URL           the relay (or set TETHER_URL)\n"
    "  --token-file FILE   a user token (or TETHER_TOKEN_FILE, or TETHER_TOKEN)\n"
    "  --ca-file FILE      trust these CAs for wss:// instead of the system's\n"
    "  --insecure          do not check the relay's certificate (development only)\n"
    "  --log-level LEVEL   error, warn, info (default) or debug\n"
    "  -h, --help          this text\n";

struct forward {
    struct cli_runtime rt;
    struct cli_client cc;
    const char *workspace;
    int remote_port;
    char path[256];
    uv_tcp_t listener;
    size_t active;
    uint8_t fin_msg[WSC_PRE]; /* the empty end-of-stream message is built here */
};

struct fwd_conn {
    struct forward *f;
    uv_tcp_t tcp;
    struct wsc *ws;
    bool ws_open;
    bool reading;
    bool tcp_eof;      /* the local side half-closed */
    bool fin_sent;     /* ... and we told the relay */
    bool fin_received; /* the relay has nothing more */
    bool tcp_closing;
    bool tcp_closed; /* the handle is closed: c lives on only until the websocket ends */
    bool rx_paused;
    bool rx_in_message;  /* a message from the relay has started and not ended */
    struct chunkq to_ws; /* read straight from the socket, sent from where it lies */
    size_t to_tcp;       /* bytes in uv_write requests */
};

struct fwd_write {
    uv_write_t req;
    struct fwd_conn *c;
    size_t len;
    uint8_t data[];
};

/*
 * A connection is freed once both its socket handle and its websocket are gone; whichever
 * ends last frees it (here or in ws_closed).
 */
static void on_tcp_closed(uv_handle_t *h)
{
    struct fwd_conn *c = h->data;
    c->f->active--;
    c->tcp_closed = true;
    chunkq_free(&c->to_ws);
    if (c->ws)
        wsc_close(c->ws, LWS_CLOSE_STATUS_NORMAL, "local connection closed");
    else
        free(c);
}

/*
 * Closes the local socket. reset: the stream ended abnormally, so the local app gets a
 * connection reset rather than an end of file that would make a cut transfer look whole.
 */
static void tcp_close(struct fwd_conn *c, bool reset)
{
    if (c->tcp_closing)
        return;
    c->tcp_closing = true;
    if (!reset || uv_tcp_close_reset(&c->tcp, on_tcp_closed) < 0)
        uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct fwd_conn *c = h->data;
    size_t room = 0;
    uint8_t *tail = chunkq_tail(&c->to_ws, FWD_READ_MIN, &room);
    (void)suggested;
    /* No memory yields UV_ENOBUFS in on_read, which closes the connection. */
    *buf = uv_buf_init((char *)tail, tail ? (unsigned)room : 0);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct fwd_conn *c = s->data;
    (void)buf;
    if (n > 0) {
        chunkq_commit(&c->to_ws, (size_t)n);
        if (c->to_ws.len >= FWD_TO_WS_MAX) {
            uv_read_stop(s);
            c->reading = false;
        }
        if (c->ws_open)
            wsc_want_write(c->ws);
        return;
    }
    if (n == 0)
        return;
    uv_read_stop(s);
    c->reading = false;
    if (n == UV_EOF && !tcp_was_reset(&c->tcp)) {
        c->tcp_eof = true;
        if (c->ws_open)
            wsc_want_write(c->ws);
        return;
    }
    tcp_close(c, true);
}

static void start_reading(struct fwd_conn *c)
{
    if (c->reading || c->tcp_eof || c->tcp_closing || c->to_ws.len >= FWD_TO_WS_MAX)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
}

static void ws_established(void *ud, struct wsc *ws)
{
    struct fwd_conn *c = ud;
    c->ws_open = true;
    start_reading(c);
    wsc_want_write(ws);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    (void)status;
    free(req);
}

static void maybe_shutdown_tcp(struct fwd_conn *c)
{
    if (!c->fin_received || c->to_tcp > 0 || c->tcp_closing)
        return;
    uv_shutdown_t *req = malloc(sizeof(*req));
    if (!req || uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        free(req);
        tcp_close(c, true);
    }
}

static void on_write(uv_write_t *req, int status)
{
    struct fwd_write *w = (struct fwd_write *)req;
    struct fwd_conn *c = w->c;
    c->to_tcp -= w->len;
    free(w);
    if (status < 0) {
        tcp_close(c, true);
        return;
    }
    if (c->rx_paused && c->to_tcp < FWD_TO_TCP_MAX / 2 && c->ws) {
        c->rx_paused = false;
        wsc_pause_rx(c->ws, false);
    }
    maybe_shutdown_tcp(c);
    if (!c->ws && c->to_tcp == 0)
        tcp_close(c, false); /* the relay ended normally and our last bytes are out */
}

static void ws_receive(void *ud, struct wsc *ws, const uint8_t *data, size_t len, bool binary,
                       bool final)
{
    struct fwd_conn *c = ud;
    bool empty_message = len == 0 && final && !c->rx_in_message;
    c->rx_in_message = !final;
    if (c->tcp_closing)
        return;
    if (!binary) {
        wsc_close(ws, LWS_CLOSE_STATUS_UNACCEPTABLE_OPCODE, "text message");
        return;
    }
    if (empty_message) { /* the relay's end of stream */
        c->fin_received = true;
        maybe_shutdown_tcp(c);
        return;
    }
    size_t done = 0;
    if (c->to_tcp == 0) {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
        int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (n > 0)
            done = (size_t)n;
        else if (n < 0 && n != UV_EAGAIN) {
            tcp_close(c, true);
            return;
        }
    }
    if (done == len)
        return;
    struct fwd_write *w = malloc(sizeof(*w) + len - done);
    if (!w) {
        tcp_close(c, true);
        return;
    }
    w->c = c;
    w->len = len - done;
    memcpy(w->data, data + done, w->len);
    uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)w->len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) < 0) {
        free(w);
        tcp_close(c, true);
        return;
    }
    c->to_tcp += w->len;
    if (c->to_tcp >= FWD_TO_TCP_MAX && !c->rx_paused) {
        c->rx_paused = true;
        wsc_pause_rx(ws, true);
    }
}

static void ws_writable(void *ud, struct wsc *ws)
{
    struct fwd_conn *c = ud;
    struct forward *f = c->f;
    size_t n;
    uint8_t *front = chunkq_front(&c->to_ws, &n);
    if (front) {
        /* Framed and masked where the bytes lie: the block keeps WSC_PRE bytes in front. */
        if (wsc_write(ws, front - WSC_PRE, n, true) < 0)
            return;
        chunkq_consume(&c->to_ws, n);
        start_reading(c);
        if (c->to_ws.len > 0 || c->tcp_eof)
            wsc_want_write(ws);
        return;
    }
    if (c->tcp_eof && !c->fin_sent) {
        c->fin_sent = true;
        wsc_write(ws, f->fin_msg, 0, true);
    }
}

static void ws_closed(void *ud, struct wsc *ws, int status, const char *reason)
{
    struct fwd_conn *c = ud;
    struct forward *f = c->f;
    (void)ws;
    c->ws = NULL;
    c->ws_open = false;
    if (c->tcp_closed) { /* the local side went first; nothing left to tell anyone */
        free(c);
        return;
    }
    bool normal = status == 1000 || status == 1005;
    if (normal) {
        log_debug("connection to port %d finished", f->remote_port);
    } else if (status == 503) {
        log_error("workspace %s is offline", f->workspace);
    } else if (status == 401) {
        log_error("the relay refused the token (HTTP 401)");
    } else if (status == 404) {
        log_error("workspace %s not found, or the token may not reach it (HTTP 404)", f->workspace);
    } else if (status == 4000 + PROTO_CODE_CANCEL) {
        /* The target (or the agent's side) dropped the connection: routine for many apps. */
        log_info("forward to %s port %d: %s", f->workspace, f->remote_port, reason);
    } else if (status >= 4000 && status < 5000) {
        log_error("forward to %s port %d: %s", f->workspace, f->remote_port, reason);
    } else {
        log_error("forward to %s port %d: %s (status %d)", f->workspace, f->remote_port, reason,
                  status);
    }
    if (c->tcp_closing)
        return;
    /* A normal end keeps the socket until our last bytes reached it; failures reset. */
    if (normal && c->to_tcp > 0) {
        c->fin_received = true;
        return;
    }
    tcp_close(c, !normal);
}

static const struct wsc_events fwd_ws_events = {
    .established = ws_established,
    .receive = ws_receive,
    .writable = ws_writable,
    .closed = ws_closed,
};

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct forward *f = server->data;
    if (status < 0) {
        log_warn("accept failed: %s", uv_strerror(status));
        return;
    }
    struct fwd_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        /* Accept and drop it: a pending connection left unaccepted stalls the listener. */
        uv_tcp_t *t = malloc(sizeof(*t));
        if (t && uv_tcp_init(&f->rt.loop, t) == 0 && uv_accept(server, (uv_stream_t *)t) == 0)
            uv_close((uv_handle_t *)t, free_handle);
        else
            free(t);
        log_error("out of memory: connection refused");
        return;
    }
    c->f = f;
    uv_tcp_init(&f->rt.loop, &c->tcp);
    c->tcp.data = c;
    chunkq_init(&c->to_ws, WSC_PRE);
    f->active++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        tcp_close(c, false);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    struct wsc_params p = {
        .context = f->rt.ws.ctx,
        .vhost = f->rt.ws.client_vhost,
        .url = &f->cc.url,
        .path = f->path,
        .token = f->cc.token,
        .insecure = f->cc.insecure,
    };
    char err[256];
    c->ws = wsc_connect(&p, &fwd_ws_events, c, err, sizeof(err));
    if (!c->ws) {
        log_error("cannot reach the relay: %s", err);
        tcp_close(c, true);
    }
}

static void on_forward_signal(struct cli_runtime *rt, int signum)
{
    struct forward *f = rt->ud;
    (void)signum;
    uv_close((uv_handle_t *)&f->listener, NULL);
    cli_runtime_stop(rt);
}

static int parse_spec(const char *spec, char *bind, size_t bindlen, int *lport, int *rport)
{
    /* [BIND_ADDR:]LOCAL_PORT:REMOTE_PORT, BIND_ADDR may be [v6]. */
    const char *last = strrchr(spec, ':');
    if (!last)
        return -1;
    char *end;
    long r = strtol(last + 1, &end, 10);
    if (end == last + 1 || *end || r < 1 || r > 65535)
        return -1;
    *rport = (int)r;
    char head[300];
    size_t hl = (size_t)(last - spec);
    if (hl >= sizeof(head))
        return -1;
    memcpy(head, spec, hl);
    head[hl] = '\0';
    if (strchr(head, ':') || head[0] == '[')
        return cli_hostport(head, bind, bindlen, lport) < 0 || *lport < 0 ? -1 : 0;
    snprintf(bind, bindlen, "127.0.0.1");
    long l = strtol(head, &end, 10);
    if (end == head || *end || l < 0 || l > 65535)
        return -1;
    *lport = (int)l;
    return 0;
}

static int forward_run(struct forward *f, int argc, char **argv);

int cmd_forward(int argc, char **argv)
{
    struct forward *fp = calloc(1, sizeof(*fp));
    if (!fp) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    int rc = forward_run(fp, argc, argv);
    free(fp);
    return rc;
}

static int forward_run(struct forward *f, int argc, char **argv)
{
    static const struct option opts[] = {CLI_OPTS_CLIENT, CLI_OPTS_END};
    const struct cli_shared sh = {.command = "forward", .usage = forward_usage, .client = &f->cc};
    int rc;
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (argc - optind != 2) {
        cli_error("forward needs WORKSPACE and [BIND_ADDR:]LOCAL_PORT:REMOTE_PORT");
        return EXIT_USAGE;
    }
    f->workspace = argv[optind];
    char bind[256];
    int lport;
    if (parse_spec(argv[optind + 1], bind, sizeof(bind), &lport, &f->remote_port) < 0) {
        cli_error("bad port spec '%s': expected [BIND_ADDR:]LOCAL_PORT:REMOTE_PORT",
                  argv[optind + 1]);
        return EXIT_USAGE;
    }
    snprintf(f->path, sizeof(f->path), "/api/v1/workspaces/%s/tcp/%d", f->workspace,
             f->remote_port);
    rc = cli_client_resolve(&f->cc);
    if (rc != EXIT_OK) {
        cli_client_free(&f->cc);
        return rc;
    }
    struct wsctx_config wc = {.ca_file = f->cc.ca_file};
    f->rt.on_signal = on_forward_signal;
    f->rt.ud = f;
    if (cli_runtime_init(&f->rt, &wc) < 0) {
        cli_client_free(&f->cc);
        return EXIT_FAIL;
    }
    struct sockaddr_storage sa;
    if (uv_ip4_addr(bind, lport, (struct sockaddr_in *)&sa) != 0 &&
        uv_ip6_addr(bind, lport, (struct sockaddr_in6 *)&sa) != 0) {
        cli_error("bind address '%s' must be a numeric IPv4 or IPv6 address", bind);
        rc = EXIT_USAGE;
        goto out;
    }
    uv_tcp_init(&f->rt.loop, &f->listener);
    f->listener.data = f;
    int e = uv_tcp_bind(&f->listener, (struct sockaddr *)&sa, 0);
    if (e == 0)
        e = uv_listen((uv_stream_t *)&f->listener, 128, on_connection);
    if (e < 0) {
        cli_error("cannot listen on %s:%d: %s", bind, lport, uv_strerror(e));
        uv_close((uv_handle_t *)&f->listener, NULL);
        rc = EXIT_FAIL;
        goto out;
    }
    struct sockaddr_storage got;
    int glen = sizeof(got);
    uv_tcp_getsockname(&f->listener, (struct sockaddr *)&got, &glen);
    int actual = ntohs(((struct sockaddr_in *)&got)->sin_port);
    /* One line on stdout that scripts can wait for. */
    printf("forwarding %s:%d -> %s:%d\n", bind, actual, f->workspace, f->remote_port);
    fflush(stdout);
    uv_run(&f->rt.loop, UV_RUN_DEFAULT);
    rc = EXIT_OK;
    cli_runtime_finish(&f->rt);
    cli_client_free(&f->cc);
    return rc;
out:
    cli_runtime_stop(&f->rt);
    uv_run(&f->rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&f->rt);
    cli_client_free(&f->cc);
    return rc;
}
