/*
 * tether sftp-server: SFTP version 3 on stdin and stdout, like OpenSSH's sftp-server, for
 * images that lack one (`sftp -D`, a Subsystem line, or `sftp -s` over some other ssh).
 * It drives the sftp engine from two uv pipes on a plain loop.
 */
#include <fcntl.h>
#include <getopt.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "cli.h"
#include "commands.h"
#include "sftp.h"
#include "tunnel/log.h"

static const char sftp_server_usage[] =
    "usage: tether sftp-server [--home DIR]\n"
    "\n"
    "Serves SFTP (version 3, with OpenSSH's extensions) on stdin and stdout, as OpenSSH's\n"
    "sftp-server does, for a client started with `sftp -D` or an SSH server's subsystem.\n"
    "Relative paths are taken from DIR, by default $HOME or the user's home directory.\n"
    "Exits 0 when the client closes its end. Arguments after -- are ignored (scp -D\n"
    "passes some).\n"
    "\n"
    "  --home DIR          the directory relative paths start from\n"
    "  --log-level LEVEL   error, warn (default) or info, debug\n"
    "  -h, --help          this text\n";

/* Bytes read from stdin in one go; what the engine does not take waits here. */
#define SFTPD_READ_BUF (64u * 1024)

struct sftpd {
    uv_loop_t loop;
    uv_pipe_t in, out;
    struct sftp_server *srv;
    uv_write_t wreq;
    size_t writing; /* bytes in the write in flight, 0 when none */
    uint8_t rbuf[SFTPD_READ_BUF];
    size_t rlen, roff; /* rbuf[roff..rlen) is read but not yet taken by the engine */
    bool pipes;        /* in and out are initialized */
    bool reading;
    bool eof;
    bool closing;
    int exit_code;
    int stdio_flags[2]; /* as found, restored before the descriptors are closed */
};

static void on_pipe_closed(uv_handle_t *h)
{
    (void)h;
}

/* uv_pipe_open made the descriptors non-blocking; a terminal or a pipe may be shared with
 * the parent, so put them back as found before closing them. */
static void close_stdio(struct sftpd *d)
{
    if (!d->pipes || uv_is_closing((uv_handle_t *)&d->in))
        return;
    for (int fd = 0; fd < 2; fd++)
        if (d->stdio_flags[fd] >= 0)
            fcntl(fd, F_SETFL, d->stdio_flags[fd]);
    uv_close((uv_handle_t *)&d->in, on_pipe_closed);
    uv_close((uv_handle_t *)&d->out, on_pipe_closed);
}

static void on_engine_done(void *ud)
{
    struct sftpd *d = ud;
    d->srv = NULL;
    close_stdio(d);
}

static void finish(struct sftpd *d, int exit_code)
{
    if (d->closing)
        return;
    d->closing = true;
    if (exit_code > d->exit_code)
        d->exit_code = exit_code;
    if (d->reading)
        uv_read_stop((uv_stream_t *)&d->in);
    d->reading = false;
    sftp_server_close(d->srv);
}

/* After end of input: done once every request is answered and every reply written. */
static void maybe_done(struct sftpd *d)
{
    size_t n;
    if (d->eof && !d->writing && d->rlen == 0 && sftp_server_pending(d->srv) == 0 &&
        !sftp_server_output(d->srv, &n))
        finish(d, 0);
}

static void flush(struct sftpd *d);
static void write_failed(struct sftpd *d, int err);

static void on_written(uv_write_t *w, int status)
{
    struct sftpd *d = w->data;
    size_t n = d->writing;
    d->writing = 0;
    if (d->closing)
        return;
    if (status < 0) {
        write_failed(d, status);
        return;
    }
    sftp_server_consumed(d->srv, n);
    flush(d);
}

static void write_failed(struct sftpd *d, int err)
{
    log_warn("sftp-server: writing to stdout: %s", uv_strerror(err));
    finish(d, EXIT_FAIL);
}

/* Writes what the engine has queued: at once while the pipe takes it, then by uv_write. */
static void flush(struct sftpd *d)
{
    if (d->writing || d->closing)
        return;
    for (;;) {
        size_t n;
        const uint8_t *p = sftp_server_output(d->srv, &n);
        if (!p) {
            maybe_done(d);
            return;
        }
        uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
        int rc = uv_try_write((uv_stream_t *)&d->out, &b, 1);
        if (rc > 0) {
            sftp_server_consumed(d->srv, (size_t)rc);
            continue;
        }
        if (rc != UV_EAGAIN) {
            write_failed(d, rc);
            return;
        }
        /* The engine keeps these bytes in place until sftp_server_consumed. */
        d->wreq.data = d;
        if ((rc = uv_write(&d->wreq, (uv_stream_t *)&d->out, &b, 1, on_written)) < 0) {
            write_failed(d, rc);
            return;
        }
        d->writing = n;
        return;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct sftpd *d = h->data;
    (void)suggested;
    *buf = uv_buf_init((char *)d->rbuf, sizeof(d->rbuf));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

/* Offers the engine what is buffered; reads on only when it took everything. */
static void feed_buffered(struct sftpd *d)
{
    if (d->rlen > 0) {
        d->roff += sftp_server_feed(d->srv, d->rbuf + d->roff, d->rlen - d->roff);
        if (d->roff == d->rlen)
            d->rlen = d->roff = 0;
    }
    bool want = d->rlen == 0 && !d->eof && !d->closing;
    if (want && !d->reading && uv_read_start((uv_stream_t *)&d->in, on_alloc, on_read) == 0)
        d->reading = true;
    else if (!want && d->reading) {
        uv_read_stop((uv_stream_t *)&d->in);
        d->reading = false;
    }
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct sftpd *d = st->data;
    (void)buf;
    if (nread == 0 || d->closing)
        return;
    if (nread < 0) {
        if (nread != UV_EOF)
            log_warn("sftp-server: reading stdin: %s", uv_strerror((int)nread));
        d->eof = true;
        feed_buffered(d); /* stops reading */
        maybe_done(d);
        return;
    }
    d->rlen = (size_t)nread;
    d->roff = 0;
    feed_buffered(d);
}

static void on_want_write(void *ud)
{
    flush(ud);
}

static void on_want_input(void *ud)
{
    struct sftpd *d = ud;
    feed_buffered(d);
    maybe_done(d);
}

static void on_failed(void *ud)
{
    struct sftpd *d = ud;
    log_error("sftp-server: the client broke the protocol (error %d)", sftp_server_error(d->srv));
    finish(d, EXIT_FAIL);
}

/* A home directory: $HOME, the passwd entry, or /etc/passwd read directly (a static
 * binary's getpwuid may find no NSS). */
static const char *home_dir(char *buf, size_t cap)
{
    const char *env = getenv("HOME");
    if (env && env[0] == '/')
        return env;
    struct passwd pw, *pp = NULL;
    char pwbuf[4096];
    if (getpwuid_r(getuid(), &pw, pwbuf, sizeof(pwbuf), &pp) == 0 && pp && pp->pw_dir[0] == '/') {
        snprintf(buf, cap, "%s", pp->pw_dir);
        return buf;
    }
    FILE *f = fopen("/etc/passwd", "r");
    char line[1024];
    while (f && fgets(line, sizeof(line), f)) {
        /* name:password:uid:gid:gecos:dir:shell */
        char *field[7] = {0}, *p = line;
        int n = 0;
        while (n < 7 && (field[n++] = strsep(&p, ":\n")))
            ;
        if (n == 7 && field[5] && field[5][0] == '/' && strtoul(field[2], NULL, 10) == getuid()) {
            snprintf(buf, cap, "%s", field[5]);
            fclose(f);
            return buf;
        }
    }
    if (f)
        fclose(f);
    return "/";
}

static int open_stdio(struct sftpd *d)
{
    uv_handle_type t0 = uv_guess_handle(0), t1 = uv_guess_handle(1);
    if (t0 == UV_FILE || t0 == UV_UNKNOWN_HANDLE || t1 == UV_FILE || t1 == UV_UNKNOWN_HANDLE) {
        cli_error("stdin and stdout must be pipes, sockets or a terminal");
        return -1;
    }
    d->stdio_flags[0] = fcntl(0, F_GETFL);
    d->stdio_flags[1] = fcntl(1, F_GETFL);
    uv_pipe_init(&d->loop, &d->in, 0);
    uv_pipe_init(&d->loop, &d->out, 0);
    d->pipes = true;
    d->in.data = d->out.data = d;
    int rc = uv_pipe_open(&d->in, 0);
    if (rc == 0)
        rc = uv_pipe_open(&d->out, 1);
    if (rc < 0) {
        cli_error("cannot use stdin and stdout: %s", uv_strerror(rc));
        return -1;
    }
    return 0;
}

int cmd_sftp_server(int argc, char **argv)
{
    static const struct option opts[] = {{"home", required_argument, NULL, 'd'}, CLI_OPTS_END};
    const struct cli_shared sh = {.command = "sftp-server", .usage = sftp_server_usage};
    const char *home = NULL;
    /* stderr may be the client's terminal: only problems are worth a line there. */
    tether_log_level = LOG_WARN;
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        if (c == 'd') {
            home = optarg;
            continue;
        }
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    /* scp -D runs its program with "-- HOST sftp", which OpenSSH's server ignores too. */
    if (optind < argc && strcmp(argv[optind - 1], "--") != 0) {
        cli_error("unexpected argument '%s' (see 'tether sftp-server --help')", argv[optind]);
        return EXIT_USAGE;
    }
    char homebuf[SFTP_WIRE_MAX_PATH + 1];
    if (!home)
        home = home_dir(homebuf, sizeof(homebuf));
    if (home[0] != '/' || strlen(home) > SFTP_WIRE_MAX_PATH) {
        cli_error("--home must be an absolute path of at most %u bytes", SFTP_WIRE_MAX_PATH);
        return EXIT_USAGE;
    }

    struct sftpd *d = calloc(1, sizeof(*d));
    if (!d || uv_loop_init(&d->loop) < 0) {
        cli_error("out of memory");
        free(d);
        return EXIT_FAIL;
    }
    int exit_code = EXIT_FAIL;
    if (open_stdio(d) < 0)
        goto out;
    const struct sftp_server_events ev = {on_want_write, on_want_input, on_failed, on_engine_done};
    if (!(d->srv = sftp_server_new(&d->loop, home, &ev, d))) {
        cli_error("out of memory");
        goto out;
    }
    feed_buffered(d);
    uv_run(&d->loop, UV_RUN_DEFAULT);
    exit_code = d->exit_code;
out:
    close_stdio(d);
    uv_run(&d->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&d->loop) != 0)
        log_warn("sftp-server: loop still busy at exit");
    free(d);
    return exit_code;
}
