/*
 * Session channels of the agent's SSH server: shell, exec and subsystem requests run a
 * process on pipes or on a PTY; its output goes to the channel as the client's window
 * allows, the client's input goes to it as fast as it reads.
 *
 * Flow control, both ways, without unbounded buffers:
 *  - child to client: a child's descriptor is read only while the channel has window and
 *    libssh has no unsent output (SSH_WRITE_PENDING), one read of at most the window.
 *  - client to child: the data callback writes straight to the child; what the child does
 *    not take is declined (libssh keeps it and stops growing the window), and pulled later
 *    with ssh_channel_read_nonblocking once the child is writable. libssh offers its whole
 *    buffer on every call, so `leftover` is exactly what it holds, and a pull never finds
 *    the buffer empty (an empty buffer would make libssh process packets inside the call).
 */
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sshd_int.h"
#include "stream.h"
#include "tunnel/log.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* A PTY master and a socket carry both directions on one descriptor. */
static bool single_fd(const struct ssh_chan *ch)
{
    return ch->pty || ch->is_socket;
}

/* What the channel's bytes count as: forwards, SFTP, or SSH sessions. */
static enum activity_kind chan_kind(const struct ssh_chan *ch)
{
    return ch->is_socket ? ACTIVITY_FORWARD : ch->sftp ? ACTIVITY_SFTP : ACTIVITY_SSH;
}

static struct chan_fd *input_watch(struct ssh_chan *ch)
{
    return single_fd(ch) ? &ch->out : &ch->in;
}

static bool write_pending(const struct ssh_chan *ch)
{
    return (ssh_get_poll_flags(ch->conn->session) & SSH_WRITE_PENDING) != 0;
}

/* ---- descriptors on the loop ---- */

static void chan_release(struct ssh_chan *ch)
{
    struct ssh_conn *c = ch->conn;
    free(ch->in_buf);
    free(ch->reverse);
    for (unsigned i = 0; i < ch->nenv; i++)
        free(ch->env[i]);
    free(ch);
    ssh_conn_unref(c);
}

/* One of the channel's handles (a descriptor's poll, the sftp engine) is gone. */
static void release_handle(struct ssh_chan *ch)
{
    if (--ch->open_handles == 0 && ch->freeing)
        chan_release(ch);
}

static void on_fd_closed(uv_handle_t *h)
{
    struct chan_fd *w = h->data;
    release_handle(w->ch);
}

static void fd_close(struct chan_fd *w)
{
    if (w->fd < 0)
        return;
    /* The handle holds the number until it is closed; the descriptor goes now. */
    uv_close((uv_handle_t *)&w->poll, on_fd_closed);
    close(w->fd);
    w->fd = -1;
    w->events = 0;
}

static void fd_want(struct chan_fd *w, int events);

static void on_fd_ready(uv_poll_t *h, int status, int events);

static int fd_watch(struct ssh_chan *ch, struct chan_fd *w, int fd, bool is_stderr)
{
    w->ch = ch;
    w->fd = -1;
    w->events = 0;
    w->is_stderr = is_stderr;
    if (fd < 0)
        return 0;
    int rc = uv_poll_init(ch->conn->d->loop, &w->poll, fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    w->poll.data = w;
    w->fd = fd;
    ch->open_handles++;
    return 0;
}

static void fd_want(struct chan_fd *w, int events)
{
    if (w->fd < 0 || events == w->events)
        return;
    w->events = events;
    if (events)
        uv_poll_start(&w->poll, events, on_fd_ready);
    else
        uv_poll_stop(&w->poll);
}

/* ---- the process ---- */

static void hang_up(struct ssh_chan *ch)
{
    if (ch->pid > 0 && !ch->exited)
        kill(-ch->pid, SIGHUP);
}

static void on_exit_status(void *ud, pid_t pid, int status)
{
    struct ssh_chan *ch = ud;
    (void)pid;
    ch->exited = true;
    ch->wait_status = status;
    log_debug("ssh: process %d ended (status 0x%x)", (int)pid, (unsigned)status);
    ssh_conn_after_io(ch->conn);
}

/* Environment under construction: later settings of a name replace earlier ones. */
struct envb {
    char *v[SSHD_MAX_ENV + 32];
    unsigned n;
};

static void env_set(struct envb *e, const char *name, const char *value)
{
    size_t nl = strlen(name);
    char *s;
    if (asprintf(&s, "%s=%s", name, value) < 0)
        return;
    for (unsigned i = 0; i < e->n; i++)
        if (strncmp(e->v[i], name, nl) == 0 && e->v[i][nl] == '=') {
            free(e->v[i]);
            e->v[i] = s;
            return;
        }
    if (e->n + 1 >= sizeof(e->v) / sizeof(e->v[0])) {
        free(s);
        return;
    }
    e->v[e->n++] = s;
    e->v[e->n] = NULL;
}

static void env_put(struct envb *e, const char *pair)
{
    const char *eq = strchr(pair, '=');
    char name[SSHD_MAX_ENV_BYTES];
    size_t nl = (size_t)(eq - pair);
    if (!eq || nl >= sizeof(name))
        return;
    memcpy(name, pair, nl);
    name[nl] = '\0';
    env_set(e, name, eq + 1);
}

static void env_unset(struct envb *e, const char *name)
{
    size_t nl = strlen(name);
    for (unsigned i = 0; i < e->n; i++)
        if (strncmp(e->v[i], name, nl) == 0 && e->v[i][nl] == '=') {
            free(e->v[i]);
            memmove(&e->v[i], &e->v[i + 1], (e->n - i) * sizeof(e->v[0])); /* and the NULL */
            e->n--;
            return;
        }
}

static void env_free(struct envb *e)
{
    for (unsigned i = 0; i < e->n; i++)
        free(e->v[i]);
    e->n = 0;
}

/* What every session gets: the user, PATH, and the manifest's env (set last by callers). */
static void base_env(const struct sshd *d, struct envb *e)
{
    const char *path = getenv("PATH");
    e->n = 0;
    e->v[0] = NULL;
    env_set(e, "USER", d->user.name);
    env_set(e, "LOGNAME", d->user.name);
    env_set(e, "HOME", d->user.home);
    env_set(e, "SHELL", d->user.shell);
    env_set(e, "PATH", path && path[0] ? path : DEFAULT_PATH);
}

/* The manifest's env, then the extra env (devcontainer.json's remoteEnv) over it. */
static void manifest_env(const struct sshd *d, struct envb *e)
{
    json_t *menv = json_object_get(d->manifest, "env");
    const char *k;
    json_t *v;
    json_object_foreach(menv, k, v) if (json_is_string(v)) env_set(e, k, json_string_value(v));
    for (char *const *p = d->extra_env; p && *p; p++) {
        if (strchr(*p, '='))
            env_put(e, *p);
        else
            env_unset(e, *p);
    }
}

static void build_env(struct ssh_chan *ch, const char *tty, struct envb *e)
{
    struct sshd *d = ch->conn->d;
    base_env(d, e);
    /* A tunnel stream has no client address of its own; the relay is the peer. */
    env_set(e, "SSH_CONNECTION", "127.0.0.1 0 127.0.0.1 0");
    env_set(e, "SSH_CLIENT", "127.0.0.1 0 0");
    if (tty)
        env_set(e, "SSH_TTY", tty);
    if (ch->conn->agent_sock)
        env_set(e, "SSH_AUTH_SOCK", ch->conn->agent_sock);
    if (ch->pty)
        env_set(e, "TERM", ch->term[0] ? ch->term : "xterm");
    manifest_env(d, e);
    for (unsigned i = 0; i < ch->nenv; i++)
        env_put(e, ch->env[i]);
}

static const char *env_value(const struct ssh_chan *ch, const char *name)
{
    size_t nl = strlen(name);
    for (unsigned i = 0; i < ch->nenv; i++)
        if (strncmp(ch->env[i], name, nl) == 0 && ch->env[i][nl] == '=')
            return ch->env[i] + nl + 1;
    return NULL;
}

static enum sshd_session_type session_type(const struct ssh_chan *ch, const char *command)
{
    const char *t = env_value(ch, "TETHER_SESSION_TYPE");
    if (t && strcmp(t, "vscode") == 0)
        return SSHD_TYPE_VSCODE;
    if (t && strcmp(t, "jetbrains") == 0)
        return SSHD_TYPE_JETBRAINS;
    if (command && (strstr(command, ".vscode-server") || strstr(command, "vscode-server")))
        return SSHD_TYPE_VSCODE;
    if (command && (strstr(command, "remote-dev-server") || strstr(command, "JetBrains")))
        return SSHD_TYPE_JETBRAINS;
    return SSHD_TYPE_SSH;
}

/* Where sessions start: the manifest's directory, else the configured one, else home. */
static const char *session_dir(const struct sshd *d)
{
    const char *dir = json_string_value(json_object_get(d->manifest, "directory"));
    if (dir && dir[0] == '/')
        return dir;
    return d->cfg->workdir ? d->cfg->workdir : d->user.home;
}

/* Starts the session's process: argv[0..] run through path. Returns 0 or -1. */
static int start_process(struct ssh_chan *ch, const char *path, char *const *argv,
                         const char *command)
{
    struct sshd *d = ch->conn->d;
    struct proc_io io;
    struct envb env;
    char tty[64] = "";
    struct proc_spec spec = {
        .path = path,
        .argv = argv,
        .cwd = session_dir(d),
        .use_pty = ch->pty,
        .pty_master = -1,
        .pty_slave = -1,
        .nice = SSHD_CHILD_NICE_DELTA,
        .oom_score_adj = d->child_oom_adj,
    };
    int rc = 0;
    if (ch->pty)
        rc = proc_pty_open(ch->rows, ch->cols, ch->xpixels, ch->ypixels, &spec.pty_master,
                           &spec.pty_slave, tty, sizeof(tty));
    if (rc == 0) {
        build_env(ch, ch->pty ? tty : NULL, &env);
        spec.envp = env.v;
        rc = proc_spawn(&spec, &io);
        env_free(&env);
    }
    if (rc < 0) {
        log_warn("ssh: cannot start %s: %s", path,
                 stream_out_of_fds(rc) ? STREAM_OUT_OF_FDS : strerror(-rc));
        return -1;
    }
    ch->pid = io.pid;
    if (proc_reaper_watch(&d->reaper, io.pid, on_exit_status, ch) < 0) {
        kill(-io.pid, SIGKILL);
        proc_io_close(&io);
        proc_reaper_watch(&d->reaper, io.pid, NULL, NULL);
        return -1;
    }
    if (fd_watch(ch, &ch->out, ch->pty ? io.pty_master : io.stdout_fd, false) < 0 ||
        fd_watch(ch, &ch->err, io.stderr_fd, true) < 0 ||
        fd_watch(ch, &ch->in, io.stdin_fd, false) < 0) {
        hang_up(ch);
        return -1;
    }
    ch->type = session_type(ch, command);
    d->sessions[ch->type]++;
    ch->counted = true;
    activity_touch(d->activity); /* starting a shell or a command is someone at work */
    gate_session_started(d->gate);
    /* The command may hold secrets: only at debug level. */
    log_debug("ssh: started pid %d%s: %s", (int)io.pid, ch->pty ? " on a pty" : "",
              command ? command : argv[0]);
    ch->state = CHAN_RUNNING;
    return 0;
}

/* ---- output: child to client ---- */

static bool can_send(struct ssh_chan *ch)
{
    return ch->channel && !ch->closed_by_client && !write_pending(ch) &&
           ssh_channel_window_size(ch->channel) > 0;
}

/* One read of the child's output into the channel. Returns true if it filled its buffer
 * (more may be waiting). */
static bool read_output(struct ssh_chan *ch, struct chan_fd *w)
{
    uint8_t buf[SSHD_READ_MAX];
    if (w->fd < 0 || !can_send(ch))
        return false;
    size_t want = ssh_channel_window_size(ch->channel);
    if (want > sizeof(buf))
        want = sizeof(buf);
    ssize_t n = read(w->fd, buf, want);
    if (n > 0) {
        int rc = w->is_stderr ? ssh_channel_write_stderr(ch->channel, buf, (uint32_t)n)
                              : ssh_channel_write(ch->channel, buf, (uint32_t)n);
        if (rc < 0)
            ch->conn->dead = true;
        /* Output alone is activity only for forwards (traffic either way counts there). */
        activity_note(ch->conn->d->activity, chan_kind(ch), 0, (size_t)n, ch->is_socket);
        return rc >= 0 && (size_t)n == want;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        /* A PTY whose shell has exited: what was left is read, the rest belongs to orphans. */
        if (ch->pty && ch->exited)
            fd_close(w);
        return false;
    }
    if (ch->is_socket) {
        if (n == 0 && !ch->eof_sent) { /* half close: the client may still send */
            ch->eof_sent = true;
            ssh_channel_send_eof(ch->channel);
            return false;
        }
        ch->state = CHAN_DONE; /* reset or error: the forward is over */
        ssh_channel_close(ch->channel);
        return false;
    }
    fd_close(w); /* end of file (or EIO: a PTY with no process left on it) */
    return false;
}

/*
 * Up to SSHD_READ_BURST reads of output per wake-up, with one libssh poll of its socket after
 * each. libssh asks to be told the socket is writable again after every write it makes
 * (SSH_WRITE_PENDING, which can_send waits out); the poll tells it at once when the socket
 * took everything, where one read per loop iteration cost a trip through the loop, four
 * epoll_ctl calls and an epoll_wait per 32 KiB of output.
 */
static void read_output_burst(struct ssh_chan *ch, struct chan_fd *w)
{
    struct ssh_conn *c = ch->conn;
    /* A channel exists only once the key exchange is done, so c->event does too. */
    for (int i = 0; i < SSHD_READ_BURST && read_output(ch, w) && !c->dead; i++) {
        if (ssh_event_dopoll(c->event, 0) == SSH_ERROR) {
            c->dead = true;
            return;
        }
    }
}

/* Converts bare newlines for a terminal in raw mode. */
static size_t crlf(const char *in, size_t len, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 2 <= cap; i++) {
        if (in[i] == '\n' && (i == 0 || in[i - 1] != '\r'))
            out[o++] = '\r';
        out[o++] = in[i];
    }
    return o;
}

/*
 * A login shell shows /etc/motd and then the manifest's motd first, unless ~/.hushlogin
 * exists (as login(1) does). Both together are cut to SSHD_MOTD_MAX bytes.
 */
static void send_motd(struct ssh_chan *ch)
{
    struct sshd *d = ch->conn->d;
    char path[4096], text[SSHD_MOTD_MAX], out[2 * SSHD_MOTD_MAX];
    size_t len = 0;
    ch->motd_pending = false;
    snprintf(path, sizeof(path), "%s/.hushlogin", d->user.home);
    if (access(path, F_OK) == 0)
        return;
    int fd = open("/etc/motd", O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) {
        ssize_t n = read(fd, text, sizeof(text));
        len = n > 0 ? (size_t)n : 0;
        close(fd);
    }
    const char *extra = json_string_value(json_object_get(d->manifest, "motd"));
    if (extra && extra[0]) {
        size_t el = strlen(extra);
        if (el > sizeof(text) - len - 1)
            el = sizeof(text) - len - 1;
        memcpy(text + len, extra, el);
        len += el;
        if (el > 0 && text[len - 1] != '\n')
            text[len++] = '\n'; /* room was kept for it */
    }
    if (len == 0)
        return;
    const char *p = text;
    if (ch->pty) { /* the client's terminal is raw: it needs \r\n */
        len = crlf(text, len, out, sizeof(out));
        p = out;
    }
    if (len <= ssh_channel_window_size(ch->channel))
        ssh_channel_write(ch->channel, p, (uint32_t)len);
}

/* ---- input: client to child ---- */

static int input_fd(struct ssh_chan *ch)
{
    return input_watch(ch)->fd;
}

static void maybe_close_stdin(struct ssh_chan *ch)
{
    if (!ch->eof_from_client || ch->pty || ch->in_len > 0 || ch->leftover > 0)
        return;
    if (ch->is_socket) {
        if (ch->out.fd >= 0 && ch->state == CHAN_RUNNING)
            shutdown(ch->out.fd, SHUT_WR); /* the target reads end of file */
        return;
    }
    fd_close(&ch->in); /* the child reads end of file */
}

/* Writes what we hold, then pulls what libssh holds, until the child stops taking it. */
/*
 * Gives the client's bytes to whatever consumes them: the child's input, the forward's
 * socket, or the sftp engine. Returns the count taken, or -1 when it will never take more.
 */
static ssize_t sink_write(struct ssh_chan *ch, const void *data, size_t len)
{
    if (ch->sftp)
        return (ssize_t)sftp_server_feed(ch->sftp, data, len);
    int fd = input_fd(ch);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, data, len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    return n;
}

static bool has_sink(struct ssh_chan *ch)
{
    return ch->sftp || input_fd(ch) >= 0;
}

/*
 * Writes what we hold, then pulls what libssh holds, until the sink stops taking it.
 *
 * libssh grows the client's window back to 1,280,000 bytes on every read, without counting
 * what it still buffers. Pulled piecemeal, each small read would let the client send
 * another megabyte and the backlog would grow as long as the upload outruns the reader.
 * So we pull only when our own buffer is empty, and then everything libssh holds: both
 * buffers stay bounded by the window.
 */
static void flush_input(struct ssh_chan *ch)
{
    while (has_sink(ch) && ch->channel) {
        if (ch->in_len > 0) {
            ssize_t n = sink_write(ch, ch->in_buf + ch->in_off, ch->in_len);
            if (n == 0)
                return;
            if (n < 0) { /* the child closed its input: what it never reads is dropped */
                ch->in_len = 0;
                ch->leftover = 0;
                break;
            }
            ch->in_off += (size_t)n;
            ch->in_len -= (size_t)n;
            if (ch->in_len > 0)
                return;
        }
        ch->in_off = 0;
        if (ch->leftover == 0)
            break;
        size_t want = ch->leftover < SSHD_STDIN_MAX ? ch->leftover : SSHD_STDIN_MAX;
        if (ch->in_cap < want) {
            uint8_t *b = realloc(ch->in_buf, want);
            if (!b) {
                log_warn("ssh: out of memory for a session's input");
                ch->conn->dead = true;
                return;
            }
            ch->in_buf = b;
            ch->in_cap = want;
        }
        int r = ssh_channel_read_nonblocking(ch->channel, ch->in_buf, (uint32_t)want, 0);
        if (r <= 0) {
            ch->leftover = 0;
            break;
        }
        ch->leftover -= (size_t)r;
        ch->in_len = (size_t)r;
        activity_note(ch->conn->d->activity, chan_kind(ch), (size_t)r, 0, 1);
    }
    if (ch->in_len == 0) { /* idle sessions keep no buffer */
        free(ch->in_buf);
        ch->in_buf = NULL;
        ch->in_cap = 0;
    }
    maybe_close_stdin(ch);
}

/* ---- the watches, recomputed after every I/O ---- */

static void update_watches(struct ssh_chan *ch)
{
    bool out_ok = can_send(ch) && !ch->eof_sent;
    bool in_wait = ch->in_len > 0 || ch->leftover > 0;
    if (ch->state == CHAN_CONNECTING) {
        fd_want(&ch->out, UV_WRITABLE);
        return;
    }
    if (ch->state == CHAN_OPENING) {
        fd_want(&ch->out, 0);
        return;
    }
    if (single_fd(ch)) {
        fd_want(&ch->out, (out_ok ? UV_READABLE : 0) | (in_wait ? UV_WRITABLE : 0));
        return;
    }
    fd_want(&ch->out, out_ok ? UV_READABLE : 0);
    fd_want(&ch->err, out_ok ? UV_READABLE : 0);
    fd_want(&ch->in, in_wait ? UV_WRITABLE : 0);
}

/* A socket channel's connect finished: go on, or close the channel. */
static void connect_done(struct ssh_chan *ch)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(ch->out.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == EINPROGRESS || err == EALREADY)
        return;
    if (err != 0) {
        log_info("ssh: forward failed: %s", strerror(err));
        ch->state = CHAN_DONE;
        ssh_channel_close(ch->channel);
        return;
    }
    ch->state = CHAN_RUNNING;
}

static void on_fd_ready(uv_poll_t *h, int status, int events)
{
    struct chan_fd *w = h->data;
    struct ssh_chan *ch = w->ch;
    struct ssh_conn *c = ch->conn;
    if (ch->freeing)
        return;
    c->in_io++;
    if (status < 0)
        events = UV_READABLE | UV_WRITABLE; /* let read/write report the error */
    if (ch->state == CHAN_CONNECTING) {
        connect_done(ch);
        events = 0;
    }
    if ((events & UV_WRITABLE) && w == input_watch(ch))
        flush_input(ch);
    if ((events & UV_READABLE) && w != &ch->in)
        read_output_burst(ch, w);
    c->in_io--;
    ssh_conn_after_io(c);
}

static void finish(struct ssh_chan *ch)
{
    if (!ch->channel)
        return;
    ssh_channel_send_eof(ch->channel);
    if (WIFSIGNALED(ch->wait_status)) {
        const char *name = proc_signal_name(WTERMSIG(ch->wait_status));
        ssh_channel_request_send_exit_signal(ch->channel, name ? name : "KILL",
                                             WCOREDUMP(ch->wait_status), "", "");
    } else {
        ssh_channel_request_send_exit_status(ch->channel, WEXITSTATUS(ch->wait_status));
    }
    ssh_channel_close(ch->channel);
    ch->state = CHAN_DONE;
}

static void finish(struct ssh_chan *ch);

/* Sends the sftp engine's replies as far as the window allows. */
static void sftp_send(struct ssh_chan *ch)
{
    while (can_send(ch)) {
        size_t len;
        const uint8_t *out = sftp_server_output(ch->sftp, &len);
        if (!out || len == 0)
            return;
        uint32_t win = ssh_channel_window_size(ch->channel);
        if (len > win)
            len = win;
        if (len > SSHD_READ_MAX)
            len = SSHD_READ_MAX;
        int rc = ssh_channel_write(ch->channel, out, (uint32_t)len);
        if (rc <= 0) {
            if (rc < 0)
                ch->conn->dead = true;
            return;
        }
        sftp_server_consumed(ch->sftp, (size_t)rc);
        activity_note(ch->conn->d->activity, ACTIVITY_SFTP, 0, (size_t)rc, 0);
    }
}

static void sftp_service(struct ssh_chan *ch)
{
    if (ch->in_len > 0 || ch->leftover > 0)
        flush_input(ch);
    sftp_send(ch);
    size_t queued = 0;
    sftp_server_output(ch->sftp, &queued);
    bool idle = sftp_server_pending(ch->sftp) == 0 && queued == 0;
    /* The client finished (EOF) and every answer is out, or the session broke. */
    if ((ch->eof_from_client && idle && ch->in_len == 0 && ch->leftover == 0) ||
        sftp_server_error(ch->sftp) < 0) {
        if (sftp_server_error(ch->sftp) < 0)
            log_info("ssh: sftp session ended: malformed request");
        ch->wait_status = sftp_server_error(ch->sftp) < 0 ? 1 << 8 : 0;
        finish(ch);
    }
}

/* A channel we asked the client for: confirmed, refused, or still waiting. */
static void open_step(struct ssh_chan *ch)
{
    struct ssh_reverse *r = ch->reverse;
    int rc = r->is_agent ? ssh_channel_open_auth_agent(ch->channel)
                         : ssh_channel_open_reverse_forward(ch->channel, r->addr, r->port,
                                                            r->origin, r->origin_port);
    if (rc == SSH_AGAIN)
        return;
    bool is_agent = r->is_agent;
    free(ch->reverse);
    ch->reverse = NULL;
    if (rc != SSH_OK) {
        log_info("ssh: the client refused a %s channel", is_agent ? "agent" : "forwarded");
        ch->state = CHAN_DONE;
        return;
    }
    ch->state = CHAN_RUNNING;
}

void ssh_chan_service(struct ssh_chan *ch)
{
    if (ch->state == CHAN_WAITING) {
        const char *notice = ch->conn->d->gate ? ch->conn->d->gate->notice : NULL;
        if (ch->notice_pending && notice && ch->channel &&
            ssh_channel_window_size(ch->channel) >= strlen(notice)) {
            ssh_channel_write(ch->channel, notice, (uint32_t)strlen(notice));
            ch->notice_pending = false;
        }
        return;
    }
    if (ch->state == CHAN_OPENING && ch->channel)
        open_step(ch);
    if (ch->state == CHAN_CONNECTING || ch->state == CHAN_OPENING) {
        update_watches(ch);
        return;
    }
    if (ch->state != CHAN_RUNNING || !ch->channel)
        return;
    if (ch->sftp) {
        sftp_service(ch);
        return;
    }
    if (ch->is_socket) {
        if (ch->in_len > 0 || ch->leftover > 0)
            flush_input(ch);
        if (ch->closed_by_client) {
            if (ch->in_len == 0 && ch->leftover == 0)
                ch->state = CHAN_DONE; /* delivered: the socket closes with the channel */
            else
                update_watches(ch);
            return;
        }
        /* Both ends said they are done, and what the target sent is on its way. */
        if (ch->eof_sent && ch->eof_from_client && ch->in_len == 0 && ch->leftover == 0 &&
            !write_pending(ch)) {
            ssh_channel_close(ch->channel);
            ch->state = CHAN_DONE;
            return;
        }
        update_watches(ch);
        return;
    }
    if (ch->motd_pending)
        send_motd(ch);
    if (ch->in_len > 0 || ch->leftover > 0)
        flush_input(ch);
    /* A PTY holds what the shell wrote before it exited: drain it, then end. */
    if (ch->pty && ch->exited && ch->out.fd >= 0)
        read_output(ch, &ch->out);
    if (ch->exited && ch->out.fd < 0 && ch->err.fd < 0 && !write_pending(ch)) {
        finish(ch);
        return;
    }
    update_watches(ch);
}

bool ssh_chan_finished(const struct ssh_chan *ch)
{
    return ch->state == CHAN_DONE;
}

/* ---- libssh callbacks: only state changes, never frees ---- */

static int on_data(ssh_session s, ssh_channel channel, void *data, uint32_t len, int is_stderr,
                   void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (is_stderr || ch->state == CHAN_DONE)
        return (int)len; /* nothing reads it: discard */
    if (ch->state == CHAN_SETUP || ch->state == CHAN_WAITING || ch->state == CHAN_CONNECTING ||
        ch->state == CHAN_OPENING || ch->in_len > 0) {
        ch->leftover = len; /* keep the order: what we hold goes first */
        return 0;
    }
    ssize_t n = sink_write(ch, data, len);
    if (n < 0)
        return (int)len; /* the child's input is closed: nothing will read it */
    ch->leftover = len - (size_t)n;
    /* Counted when taken: libssh offers what it keeps again with the next packet. */
    activity_note(ch->conn->d->activity, chan_kind(ch), (size_t)n, 0, 1);
    return (int)n;
}

static void on_eof(ssh_session s, ssh_channel channel, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    ch->eof_from_client = true;
    maybe_close_stdin(ch);
}

static void on_close(ssh_session s, ssh_channel channel, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (ch->is_socket && (ch->state == CHAN_RUNNING || ch->state == CHAN_OPENING)) {
        /* A close means the client had confirmed our open, maybe in the same batch of
         * packets. What it sent before closing still goes to the socket. */
        if (ch->state == CHAN_OPENING) {
            free(ch->reverse);
            ch->reverse = NULL;
            ch->state = CHAN_RUNNING;
        }
        ch->closed_by_client = true;
        ch->eof_from_client = true;
        return;
    }
    hang_up(ch);
    ch->state = CHAN_DONE;
}

static void on_signal(ssh_session s, ssh_channel channel, const char *signal, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    int signum = proc_signal_number(signal);
    if (signum && ch->pid > 0 && !ch->exited)
        kill(-ch->pid, signum);
}

static int on_pty_request(ssh_session s, ssh_channel channel, const char *term, int cols, int rows,
                          int px_width, int px_height, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (ch->state != CHAN_SETUP || ch->pty)
        return -1;
    ch->pty = true;
    snprintf(ch->term, sizeof(ch->term), "%s", term ? term : "");
    ch->cols = (unsigned short)(cols > 0 && cols < 10000 ? cols : 80);
    ch->rows = (unsigned short)(rows > 0 && rows < 10000 ? rows : 24);
    ch->xpixels = (unsigned short)(px_width > 0 && px_width < 65536 ? px_width : 0);
    ch->ypixels = (unsigned short)(px_height > 0 && px_height < 65536 ? px_height : 0);
    return 0;
}

static int on_window_change(ssh_session s, ssh_channel channel, int cols, int rows, int px_width,
                            int px_height, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (!ch->pty || cols <= 0 || rows <= 0 || cols >= 10000 || rows >= 10000)
        return -1;
    ch->cols = (unsigned short)cols;
    ch->rows = (unsigned short)rows;
    ch->xpixels = (unsigned short)(px_width > 0 && px_width < 65536 ? px_width : 0);
    ch->ypixels = (unsigned short)(px_height > 0 && px_height < 65536 ? px_height : 0);
    if (ch->out.fd >= 0)
        proc_pty_resize(ch->out.fd, ch->rows, ch->cols, ch->xpixels, ch->ypixels);
    return 0;
}

static bool env_allowed(const struct sshd *d, const char *name)
{
    for (const char *const *p = d->env_allow; *p; p++)
        if (fnmatch(*p, name, 0) == 0)
            return true;
    return false;
}

static int on_env(ssh_session s, ssh_channel channel, const char *name, const char *value, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (ch->state != CHAN_SETUP || !env_allowed(ch->conn->d, name) || ch->nenv >= SSHD_MAX_ENV ||
        strlen(name) + strlen(value) + 2 > SSHD_MAX_ENV_BYTES) {
        log_debug("ssh: environment variable %s refused", name);
        return -1;
    }
    if (asprintf(&ch->env[ch->nenv], "%s=%s", name, value) < 0)
        return -1;
    ch->nenv++;
    return 0;
}

static void on_agent_request(ssh_session s, ssh_channel channel, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    /* libssh answers success regardless; without a socket the session has no SSH_AUTH_SOCK. */
    if (ssh_forward_agent(ch->conn) < 0)
        log_warn("ssh: cannot create the agent forwarding socket: %s", strerror(errno));
}

/*
 * A login-blocking startup script runs: the request is accepted now (clients give up on a
 * refused one) and its process starts when the gate opens; an interactive session is told
 * why nothing happens yet. Input meanwhile stays with libssh, in order.
 */
static void on_gate_open(struct gate_waiter *w);

static int defer_start(struct ssh_chan *ch, int what, const char *command)
{
    if (command && !(ch->deferred_command = strdup(command)))
        return -1;
    ch->deferred = what;
    ch->state = CHAN_WAITING;
    ch->notice_pending = ch->pty;
    gate_wait(ch->conn->d->gate, &ch->wait, on_gate_open);
    log_info("ssh: a session waits for the startup script");
    return 0;
}

static int start_shell(struct ssh_chan *ch);
static int start_exec(struct ssh_chan *ch, const char *command);
static int start_subsystem(struct ssh_chan *ch);

static void on_gate_open(struct gate_waiter *w)
{
    struct ssh_chan *ch = (struct ssh_chan *)((char *)w - offsetof(struct ssh_chan, wait));
    int rc;
    ch->state = CHAN_SETUP;
    ch->notice_pending = false;
    if (ch->deferred == DEFER_SHELL)
        rc = start_shell(ch);
    else if (ch->deferred == DEFER_EXEC)
        rc = start_exec(ch, ch->deferred_command);
    else
        rc = start_subsystem(ch);
    free(ch->deferred_command);
    ch->deferred_command = NULL;
    if (rc < 0 && ch->channel) { /* the request was accepted: end it as a failed command */
        static const char msg[] = "tether: cannot start the session\r\n";
        ssh_channel_write_stderr(ch->channel, msg, sizeof(msg) - 1);
        ssh_channel_request_send_exit_status(ch->channel, 127);
        ssh_channel_send_eof(ch->channel);
        ssh_channel_close(ch->channel);
        ch->state = CHAN_DONE;
    }
    ssh_conn_after_io(ch->conn);
}

static int on_shell(ssh_session s, ssh_channel channel, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (ch->state != CHAN_SETUP)
        return -1;
    if (gate_closed(ch->conn->d->gate))
        return defer_start(ch, DEFER_SHELL, NULL);
    return start_shell(ch);
}

static int start_shell(struct ssh_chan *ch)
{
    const char *shell = ch->conn->d->user.shell;
    char login_name[256];
    /* A login shell: argv[0] starts with '-'. */
    snprintf(login_name, sizeof(login_name), "-%s", proc_basename(shell));
    char *argv[] = {login_name, NULL};
    if (start_process(ch, shell, argv, NULL) < 0)
        return -1;
    ch->motd_pending = true;
    return 0;
}

static int on_exec(ssh_session s, ssh_channel channel, const char *command, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (ch->state != CHAN_SETUP)
        return -1;
    if (gate_closed(ch->conn->d->gate))
        return defer_start(ch, DEFER_EXEC, command);
    return start_exec(ch, command);
}

static int start_exec(struct ssh_chan *ch, const char *command)
{
    const char *shell = ch->conn->d->user.shell;
    char *argv[] = {(char *)proc_basename(shell), "-c", (char *)command, NULL};
    return start_process(ch, shell, argv, command);
}

static void sftp_event(void *ud)
{
    struct ssh_chan *ch = ud;
    if (ch->freeing)
        return;
    ssh_conn_after_io(ch->conn); /* services every channel, this one's sftp included */
}

static void sftp_done(void *ud)
{
    struct ssh_chan *ch = ud;
    ch->sftp = NULL;
    release_handle(ch);
}

/* The built-in SFTP server, for images without sftp-server. */
static int start_sftp(struct ssh_chan *ch)
{
    static const struct sftp_server_events ev = {
        .want_write = sftp_event,
        .want_input = sftp_event,
        .failed = sftp_event,
        .done = sftp_done,
    };
    struct sshd *d = ch->conn->d;
    ch->sftp = sftp_server_new(d->loop, session_dir(d), &ev, ch);
    if (!ch->sftp)
        return -1;
    ch->open_handles++; /* the engine: released by sftp_done */
    ch->state = CHAN_RUNNING;
    ch->type = SSHD_TYPE_SFTP;
    d->sessions[ch->type]++;
    ch->counted = true;
    activity_touch(d->activity);
    return 0;
}

static int on_subsystem(ssh_session s, ssh_channel channel, const char *subsystem, void *ud)
{
    struct ssh_chan *ch = ud;
    (void)s;
    (void)channel;
    if (ch->state != CHAN_SETUP || strcmp(subsystem, "sftp") != 0)
        return -1;
    if (gate_closed(ch->conn->d->gate))
        return defer_start(ch, DEFER_SUBSYSTEM, NULL);
    return start_subsystem(ch);
}

static int start_subsystem(struct ssh_chan *ch)
{
    const char *server = ch->conn->d->cfg->sftp_server;
    if (server) {
        char *argv[] = {(char *)server, NULL};
        if (start_process(ch, server, argv, NULL) < 0)
            return -1;
        ch->conn->d->sessions[ch->type]--; /* counted as sftp, whatever runs it */
        ch->type = SSHD_TYPE_SFTP;
        ch->conn->d->sessions[ch->type]++;
        return 0;
    }
    return start_sftp(ch);
}

static struct ssh_chan *chan_new(struct ssh_conn *c, ssh_channel channel)
{
    if (c->nchans >= SSHD_MAX_CHANNELS || c->closing || c->d->freeing)
        return NULL;
    struct ssh_chan *ch = calloc(1, sizeof(*ch));
    if (!ch)
        return NULL;
    ch->channel = channel;
    ch->conn = c;
    ch->out.fd = ch->err.fd = ch->in.fd = -1;
    ch->cb.userdata = ch;
    ch->cb.channel_data_function = on_data;
    ch->cb.channel_eof_function = on_eof;
    ch->cb.channel_close_function = on_close;
    ch->cb.channel_signal_function = on_signal;
    ch->cb.channel_pty_request_function = on_pty_request;
    ch->cb.channel_pty_window_change_function = on_window_change;
    ch->cb.channel_env_request_function = on_env;
    ch->cb.channel_shell_request_function = on_shell;
    ch->cb.channel_exec_request_function = on_exec;
    ch->cb.channel_subsystem_request_function = on_subsystem;
    ch->cb.channel_auth_agent_req_function = on_agent_request;
    ssh_callbacks_init(&ch->cb);
    ssh_set_channel_callbacks(ch->channel, &ch->cb);
    ch->next = c->chans;
    c->chans = ch;
    c->nchans++;
    c->refs++;
    return ch;
}

ssh_channel ssh_chan_open(struct ssh_conn *c)
{
    ssh_channel channel = ssh_channel_new(c->session);
    if (!channel)
        return NULL;
    if (!chan_new(c, channel)) {
        ssh_channel_free(channel);
        return NULL;
    }
    return channel;
}

int ssh_chan_open_reverse(struct ssh_conn *c, int fd, const struct ssh_reverse *r)
{
    ssh_channel channel = ssh_channel_new(c->session);
    struct ssh_chan *ch = channel ? chan_new(c, channel) : NULL;
    struct ssh_reverse *copy = malloc(sizeof(*copy));
    if (!ch || !copy) {
        free(copy);
        if (ch)
            ch->state = CHAN_DONE; /* freed after this I/O, with its channel */
        else if (channel)
            ssh_channel_free(channel);
        close(fd);
        return -1;
    }
    *copy = *r;
    ch->reverse = copy;
    ch->is_socket = true;
    ch->state = CHAN_OPENING;
    if (fd_watch(ch, &ch->out, fd, false) < 0) {
        ch->state = CHAN_DONE;
        return -1;
    }
    open_step(ch); /* sends the open; the answer comes with a later pump */
    return 0;
}

int ssh_chan_attach_socket(struct ssh_conn *c, ssh_channel channel, int fd, bool connecting)
{
    struct ssh_chan *ch = chan_new(c, channel);
    if (!ch) {
        close(fd);
        return -1;
    }
    ch->is_socket = true;
    ch->state = connecting ? CHAN_CONNECTING : CHAN_RUNNING;
    if (fd_watch(ch, &ch->out, fd, false) < 0) {
        ch->state = CHAN_DONE; /* freed after this pump, which closes the channel */
        return -1;
    }
    return 0;
}

void ssh_chan_free(struct ssh_chan *ch)
{
    struct ssh_conn *c = ch->conn;
    if (ch->freeing)
        return;
    ch->freeing = true;
    for (struct ssh_chan **pp = &c->chans; *pp; pp = &(*pp)->next)
        if (*pp == ch) {
            *pp = ch->next;
            break;
        }
    c->nchans--;
    gate_cancel(&ch->wait);
    free(ch->deferred_command);
    ch->deferred_command = NULL;
    hang_up(ch);
    if (ch->pid > 0)
        proc_reaper_forget(&c->d->reaper, ch->pid);
    if (ch->counted)
        c->d->sessions[ch->type]--;
    if (ch->channel) {
        ssh_remove_channel_callbacks(ch->channel, &ch->cb);
        ssh_channel_free(ch->channel);
        ch->channel = NULL;
    }
    fd_close(&ch->out);
    fd_close(&ch->err);
    fd_close(&ch->in);
    if (ch->sftp)
        sftp_server_close(ch->sftp); /* sftp_done follows from the loop */
    if (ch->open_handles == 0)
        chan_release(ch);
}

char **sshd_session_env(const struct sshd *d, const char *term, const char *type)
{
    struct envb *e = malloc(sizeof(*e));
    if (!e)
        return NULL;
    base_env(d, e);
    env_set(e, "TERM", term);
    env_set(e, "TETHER_SESSION_TYPE", type);
    manifest_env(d, e);
    char **v = calloc(e->n + 1, sizeof(char *));
    if (v)
        memcpy(v, e->v, e->n * sizeof(char *));
    else
        env_free(e);
    free(e);
    return v;
}

void sshd_session_env_free(char **env)
{
    proc_env_free(env);
}

const char *sshd_shell(const struct sshd *d)
{
    return d->user.shell;
}

const char *sshd_session_dir(const struct sshd *d)
{
    return session_dir(d);
}

int sshd_child_oom_adj(const struct sshd *d)
{
    return d->child_oom_adj;
}
