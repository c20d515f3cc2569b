/*
 * tether ssh-proxy: joins its stdin and stdout to the relay's websocket
 * /api/v1/workspaces/NAME/ssh (PROTOCOL.md §14.6), for OpenSSH's ProxyCommand:
 *
 *     ssh -o 'ProxyCommand tether ssh-proxy --url URL --token-file FILE NAME' NAME
 *
 * ssh gives the command pipes or a socketpair; anything else (a terminal, a file) is refused
 * with a clear line, because this is no interactive tool. stdout carries nothing but the
 * SSH server's bytes; everything else goes to stderr, which ssh shows to its user, so the
 * default log level is warn and a failure is one "tether:" line.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "commands.h"
#include "wsbridge.h"
#include "proto/proto.h"
#include "tunnel/log.h"
#include "tunnel/tokens.h"

static const char ssh_proxy_usage[] =
    "usage: tether ssh-proxy --url URL --token-file FILE WORKSPACE\n"
    "\n"
    "Joins stdin and stdout to the SSH server of WORKSPACE, through the relay. It is meant\n"
    "for ssh's ProxyCommand (see 'tether config-ssh'), e.g.\n"
    "  ssh -o 'ProxyCommand tether ssh-proxy --url URL --token-file FILE ws' ws\n"
    "\n"
    "  --url URL           the relay (or set TETHER_URL)\n"
    "  --token-file FILE   a user token (or TETHER_TOKEN_FILE, or TETHER_TOKEN)\n"
    "  --ca-file FILE      trust these CAs for wss:// instead of the system's\n"
    "  --insecure          do not check the relay's certificate (development only)\n"
    "  --log-level LEVEL   error, warn (default), info or debug; logs go to stderr\n"
    "  -h, --help          this text\n";

struct ssh_proxy {
    struct cli_runtime rt;
    struct cli_client cc;
    const char *workspace;
    char path[128];
    uv_pipe_t in;  /* stdin, moved off fd 0 (take_stdio) */
    uv_pipe_t out; /* stdout, moved off fd 1 */
    bool interrupted;
    bool reported; /* the one error line is out */
    int exit_code;
};

/* The one line for an end that was not ok; 4007 gets words of its own. */
static void report_end(struct ssh_proxy *p, const struct wsbridge_end *e)
{
    if (e->status == 4000 + PROTO_CODE_UNSUPPORTED) {
        cli_error("workspace %s serves no SSH: its agent runs without an SSH server (%s)",
                  p->workspace, e->reason);
        return;
    }
    if (e->local_first && e->local_error) {
        cli_error("ssh to %s: ssh's end of stdin/stdout failed: %s", p->workspace,
                  uv_strerror(e->local_error));
        return;
    }
    char what[128], line[512];
    snprintf(what, sizeof(what), "ssh to %s", p->workspace);
    wsbridge_end_text(e, p->workspace, what, line, sizeof(line));
    cli_error("%s", line);
}

/*
 * The websocket ended: a failure is reported now, before stdout closes, because ssh kills
 * its ProxyCommand as soon as it sees the end of the stream.
 */
static void proxy_ended(void *ud, const struct wsbridge_end *e)
{
    struct ssh_proxy *p = ud;
    if (!wsbridge_end_ok(e) && !p->interrupted && !p->reported) {
        p->reported = true;
        report_end(p, e);
    }
}

static void proxy_done(void *ud, const struct wsbridge_end *e)
{
    struct ssh_proxy *p = ud;
    if (wsbridge_end_ok(e)) {
        log_debug("ssh to %s finished", p->workspace);
        p->exit_code = EXIT_OK;
    } else {
        proxy_ended(p, e); /* the local side failed first */
    }
    if (!p->interrupted)
        cli_runtime_stop(&p->rt);
}

static const struct wsbridge_events proxy_events = {.ended = proxy_ended, .done = proxy_done};

/* A signal (ssh going away, Ctrl-C): the relay gets a close, which cancels the stream. */
static void on_proxy_signal(struct cli_runtime *rt, int signum)
{
    struct ssh_proxy *p = rt->ud;
    (void)signum;
    p->interrupted = true;
    cli_runtime_stop(rt);
}

/* ssh hands the command pipes or a socketpair; libuv's pipe handle serves both. */
static int check_stdio(int fd, const char *name)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        cli_error("ssh-proxy needs %s: it is closed", name);
        return EXIT_USAGE;
    }
    if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))
        return EXIT_OK;
    cli_error("ssh-proxy talks SSH on stdin and stdout and is meant for ssh's ProxyCommand; "
              "%s is %s (see 'tether config-ssh')",
              name,
              isatty(fd)            ? "a terminal"
              : S_ISREG(st.st_mode) ? "a file"
                                    : "neither a pipe nor a socket");
    return EXIT_USAGE;
}

/*
 * Moves fd (stdin or stdout) to a new descriptor and puts /dev/null in its place. libuv
 * never closes descriptors 0 to 2, but closing stdout is how ssh learns that the server's
 * side ended; and nothing else in this process can then write to the SSH stream by mistake.
 */
static int take_stdio(int fd)
{
    int moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (moved < 0)
        return uv_translate_sys_error(errno);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, fd) < 0) {
        int err = uv_translate_sys_error(errno);
        if (null >= 0)
            close(null);
        close(moved);
        return err;
    }
    close(null);
    return moved;
}

static int open_stdio(struct ssh_proxy *p)
{
    int in_fd = take_stdio(0);
    int out_fd = in_fd < 0 ? in_fd : take_stdio(1);
    int rc = out_fd < 0 ? out_fd : 0;
    uv_pipe_init(&p->rt.loop, &p->in, 0);
    uv_pipe_init(&p->rt.loop, &p->out, 0);
    if (rc == 0 && (rc = uv_pipe_open(&p->in, in_fd)) == 0)
        in_fd = -1; /* the handle closes it */
    if (rc == 0 && (rc = uv_pipe_open(&p->out, out_fd)) == 0)
        out_fd = -1;
    if (rc == 0)
        return EXIT_OK;
    cli_error("cannot use stdin and stdout: %s", uv_strerror(rc));
    if (in_fd >= 0)
        close(in_fd);
    if (out_fd >= 0)
        close(out_fd);
    uv_close((uv_handle_t *)&p->in, NULL);
    uv_close((uv_handle_t *)&p->out, NULL);
    return EXIT_FAIL;
}

static int ssh_proxy_run(struct ssh_proxy *p, int argc, char **argv)
{
    static const struct option opts[] = {CLI_OPTS_CLIENT, CLI_OPTS_END};
    const struct cli_shared sh = {
        .command = "ssh-proxy", .usage = ssh_proxy_usage, .client = &p->cc};
    int rc, c;
    /* ssh shows this process's stderr to its user: only what needs attention by default. */
    tether_log_level = LOG_WARN;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (argc - optind != 1) {
        cli_error("ssh-proxy needs exactly one WORKSPACE");
        return EXIT_USAGE;
    }
    p->workspace = argv[optind];
    if (!tokens_name_valid(p->workspace)) {
        cli_error("'%s' is not a workspace name", p->workspace);
        return EXIT_USAGE;
    }
    snprintf(p->path, sizeof(p->path), "/api/v1/workspaces/%s/ssh", p->workspace);
    if ((rc = check_stdio(0, "stdin")) != EXIT_OK || (rc = check_stdio(1, "stdout")) != EXIT_OK)
        return rc;
    if ((rc = cli_client_resolve(&p->cc)) != EXIT_OK)
        return rc;
    struct wsctx_config wc = {
        .ca_file = p->cc.ca_file, .tls = p->cc.url.tls, .max_connections = WSCTX_FEW_CONNECTIONS};
    p->rt.on_signal = on_proxy_signal;
    p->rt.ud = p;
    if (cli_runtime_init(&p->rt, &wc) < 0)
        return EXIT_FAIL;
    p->exit_code = EXIT_FAIL;
    if (open_stdio(p) == EXIT_OK) {
        struct wsc_params wp = {
            .context = p->rt.ws.ctx,
            .vhost = p->rt.ws.client_vhost,
            .loop = &p->rt.loop,
            .url = &p->cc.url,
            .path = p->path,
            .token = p->cc.token,
            .insecure = p->cc.insecure,
        };
        struct wsbridge_params bp = {
            .ws = &wp, .in = (uv_stream_t *)&p->in, .out = (uv_stream_t *)&p->out};
        if (wsbridge_start(&bp, &proxy_events, p) < 0) {
            cli_error("out of memory");
            uv_close((uv_handle_t *)&p->in, NULL);
            uv_close((uv_handle_t *)&p->out, NULL);
            cli_runtime_stop(&p->rt);
        }
    } else {
        cli_runtime_stop(&p->rt);
    }
    uv_run(&p->rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&p->rt);
    return p->exit_code;
}

int cmd_ssh_proxy(int argc, char **argv)
{
    struct ssh_proxy *p = calloc(1, sizeof(*p));
    if (!p) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    int rc = ssh_proxy_run(p, argc, argv);
    cli_client_free(&p->cc);
    free(p);
    return rc;
}
