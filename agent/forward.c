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
#include "commands.h"
#include "wsbridge.h"
#include "proto/proto.h"
#include "tunnel/log.h"
#include "tunnel/wsc.h"

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
    size_t active; /* connections whose bridge has not finished */
};

/* One accepted connection: its socket, joined to one websocket by a wsbridge. */
struct fwd_conn {
    struct forward *f;
    uv_tcp_t tcp;
};

static void conn_done(void *ud, const struct wsbridge_end *e)
{
    struct fwd_conn *c = ud;
    struct forward *f = c->f;
    f->active--;
    free(c);
    if (e->local_first) /* the local side went first; nothing to tell anyone */
        return;
    if (wsbridge_end_ok(e)) {
        log_debug("connection to port %d finished", f->remote_port);
        return;
    }
    char what[128], line[512];
    snprintf(what, sizeof(what), "forward to %s port %d", f->workspace, f->remote_port);
    wsbridge_end_text(e, f->workspace, what, line, sizeof(line));
    /* The target (or the agent's side) dropped the connection: routine for many apps. */
    if (e->status == 4000 + PROTO_CODE_CANCEL)
        log_info("%s", line);
    else
        log_error("%s", line);
}

static const struct wsbridge_events conn_events = {.done = conn_done};

static void free_handle(uv_handle_t *h)
{
    free(h);
}

/* For a connection that never got its bridge: data points to the fwd_conn. */
static void free_conn_handle(uv_handle_t *h)
{
    free(h->data);
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
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        uv_close((uv_handle_t *)&c->tcp, free_conn_handle);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    struct wsc_params wp = {
        .context = f->rt.ws.ctx,
        .vhost = f->rt.ws.client_vhost,
        .loop = &f->rt.loop,
        .url = &f->cc.url,
        .path = f->path,
        .token = f->cc.token,
        .insecure = f->cc.insecure,
    };
    struct wsbridge_params bp = {
        .ws = &wp, .in = (uv_stream_t *)&c->tcp, .out = (uv_stream_t *)&c->tcp};
    if (wsbridge_start(&bp, &conn_events, c) < 0) {
        log_error("out of memory: connection refused");
        if (uv_tcp_close_reset(&c->tcp, free_conn_handle) < 0)
            uv_close((uv_handle_t *)&c->tcp, free_conn_handle);
        return;
    }
    f->active++;
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
    struct wsctx_config wc = {.ca_file = f->cc.ca_file, .tls = f->cc.url.tls};
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
