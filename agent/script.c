#include "script.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tunnel/log.h"

#define SCRIPT_READ_CHUNK (16u * 1024) /* bytes per read(2), on the stack */
#define SCRIPT_READ_MAX (64u * 1024)   /* bytes read per poll callback, so no flood starves */
#define SCRIPT_MARKER_MAX 128u         /* bytes of one "[tether: ...]" marker line */
#define SCRIPT_CAPTURE_INITIAL 4096u   /* first allocation of a capture buffer */
#define SCRIPT_NS_PER_MS 1000000u

struct script;

/* One of the child's output pipes. */
struct script_pipe {
    struct script *s;
    uv_poll_t poll;
    int fd;       /* -1 once closed */
    bool polling; /* poll is initialised and must be closed */
    bool capture; /* stdout with capture_stdout: into s->capture, not to on_line */
    char line[SCRIPT_LINE_MAX];
    size_t line_len;
};

struct script {
    uv_loop_t *loop;
    struct proc_reaper *reaper;
    struct script_callbacks cb;
    void *ud;
    char *source;

    pid_t pid;       /* -1: nothing ran */
    int spawn_error; /* negative errno when nothing ran */
    bool collected;
    int wait_status;
    bool timed_out;
    bool drained; /* SCRIPT_DRAIN_MS passed since the collection */
    bool exit_reported;
    bool freed;
    uint64_t start_ns, end_ns;

    struct script_pipe out, err;
    uv_timer_t timeout; /* the script's timeout */
    uv_timer_t drain;   /* the drain after the exit, or the deferred spawn-failure report */
    int open_handles;   /* handles not closed yet; the memory goes with the last */

    /* Lines passed to on_line (both pipes, or stderr alone with capture_stdout). */
    size_t cap;
    size_t passed;
    bool cut;
    /* capture_stdout: stdout kept for on_exit, at most cap bytes. */
    char *capture;
    size_t capture_len, capture_size;
    size_t capture_discarded;  /* stdout bytes past the capture's cap: only in the result */
    size_t discarded;          /* bytes of lines past the cap: told in marker lines */
    size_t discarded_reported; /* of those, already told */
};

static void handle_closed(struct script *s)
{
    if (--s->open_handles > 0)
        return; /* the timers close only in script_free: 0 means freed */
    free(s->capture);
    free(s->source);
    free(s);
}

static void timer_closed(uv_handle_t *h)
{
    handle_closed(h->data);
}

static void poll_closed(uv_handle_t *h)
{
    struct script_pipe *p = h->data;
    handle_closed(p->s);
}

static void close_handle(uv_handle_t *h, uv_close_cb cb)
{
    if (!uv_is_closing(h))
        uv_close(h, cb);
}

/* ---- handing lines over ---- */

/* Passes one line to on_line. Returns false when the script was freed from inside. */
static bool emit(struct script *s, const char *text, size_t len)
{
    if (s->freed)
        return false;
    if (s->cb.on_line)
        s->cb.on_line(s->ud, s->source, text, len);
    return !s->freed;
}

static bool emit_marker(struct script *s, const char *fmt, size_t n)
{
    char text[SCRIPT_MARKER_MAX];
    int len = snprintf(text, sizeof(text), fmt, n);
    return emit(s, text, (size_t)len);
}

/*
 * Where a full line buffer is cut into a piece: before an incomplete UTF-8 sequence at its
 * end, so a character is not split across two pieces (invalid bytes are cut anywhere).
 */
static size_t piece_len(const char *line, size_t len)
{
    for (size_t back = 1; back <= 3 && back <= len; back++) {
        unsigned char c = (unsigned char)line[len - back];
        if ((c & 0xC0) == 0x80)
            continue; /* a continuation byte: look further back for the lead */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back && c >= 0xC0 ? len - back : len;
    }
    return len;
}

static bool emit_piece(struct script_pipe *p)
{
    size_t n = piece_len(p->line, p->line_len);
    if (n == 0)
        n = p->line_len;
    if (!emit(p->s, p->line, n))
        return false;
    p->line_len -= n; /* the at most 3 bytes of a character that goes on in the next piece */
    memmove(p->line, p->line + n, p->line_len);
    return true;
}

static bool flush_partial(struct script_pipe *p)
{
    if (p->line_len == 0)
        return true;
    size_t n = p->line_len;
    p->line_len = 0;
    return emit(p->s, p->line, n);
}

/* Splits data into lines of at most SCRIPT_LINE_MAX. False when freed from inside. */
static bool feed_lines(struct script_pipe *p, const char *data, size_t n)
{
    while (n > 0) {
        const char *nl = memchr(data, '\n', n);
        size_t seg = nl ? (size_t)(nl - data) : n;
        if (nl && p->line_len == 0 && seg <= SCRIPT_LINE_MAX) {
            if (!emit(p->s, data, seg)) /* a whole line in the chunk: no copy */
                return false;
            data += seg + 1;
            n -= seg + 1;
            continue;
        }
        while (seg > 0) {
            /* A piece goes out only when more of its line follows, so a line of exactly
             * SCRIPT_LINE_MAX bytes stays one line. */
            if (p->line_len == SCRIPT_LINE_MAX && !emit_piece(p))
                return false;
            size_t take = SCRIPT_LINE_MAX - p->line_len;
            if (take > seg)
                take = seg;
            memcpy(p->line + p->line_len, data, take);
            p->line_len += take;
            data += take;
            seg -= take;
            n -= take;
        }
        if (nl) {
            size_t len = p->line_len;
            p->line_len = 0;
            if (!emit(p->s, p->line, len))
                return false;
            data++;
            n--;
        }
    }
    return true;
}

static void capture(struct script *s, const char *data, size_t n)
{
    size_t room = s->cap - s->capture_len;
    if (n > room) {
        s->capture_discarded += n - room;
        n = room;
    }
    if (n == 0)
        return;
    if (s->capture_len + n > s->capture_size) {
        size_t size = s->capture_size ? s->capture_size : SCRIPT_CAPTURE_INITIAL;
        while (size < s->capture_len + n)
            size *= 2;
        if (size > s->cap)
            size = s->cap;
        char *b = realloc(s->capture, size);
        if (!b) {
            s->capture_discarded += n;
            return;
        }
        s->capture = b;
        s->capture_size = size;
    }
    memcpy(s->capture + s->capture_len, data, n);
    s->capture_len += n;
}

/* Output of one pipe, within the cap. False when the script was freed from inside. */
static bool take_output(struct script_pipe *p, const char *data, size_t n)
{
    struct script *s = p->s;
    if (p->capture) {
        capture(s, data, n);
        return true;
    }
    size_t room = s->cap - s->passed;
    if (n <= room) {
        s->passed += n;
        return feed_lines(p, data, n);
    }
    s->discarded += n - room;
    s->passed = s->cap;
    if (s->cut)
        return true;
    s->cut = true;
    if (!feed_lines(p, data, room))
        return false;
    /* Neither pipe's unfinished line will be completed now: pass both on as they are. */
    if (!flush_partial(&s->out) || !flush_partial(&s->err))
        return false;
    return emit_marker(s, "[tether: output cut after %zu bytes; the rest is discarded]", s->cap);
}

/* ---- the exit ---- */

static bool emit_discarded(struct script *s)
{
    size_t n = s->discarded - s->discarded_reported;
    if (n == 0)
        return true;
    s->discarded_reported = s->discarded;
    return emit_marker(s, "[tether: %zu more bytes discarded]", n);
}

static void report_exit(struct script *s)
{
    struct script_result r = {0};
    if (s->pid < 0) {
        r.end = SCRIPT_SPAWN_FAILED;
        r.status = s->spawn_error;
    } else if (WIFEXITED(s->wait_status)) {
        r.end = SCRIPT_EXITED;
        r.status = WEXITSTATUS(s->wait_status);
    } else {
        /* Killed at the timeout, unless it had exited by itself just before. */
        r.end = s->timed_out ? SCRIPT_TIMED_OUT : SCRIPT_SIGNALED;
        r.status = WIFSIGNALED(s->wait_status) ? WTERMSIG(s->wait_status) : 0;
    }
    r.elapsed_ms = (s->end_ns - s->start_ns) / SCRIPT_NS_PER_MS;
    if (!emit_discarded(s))
        return;
    if (s->out.capture) {
        r.output = s->capture ? s->capture : ""; /* printed nothing: empty, not NULL */
        r.output_len = s->capture_len;
    }
    r.discarded = s->discarded + s->capture_discarded;
    s->exit_reported = true;
    if (s->cb.on_exit)
        s->cb.on_exit(s->ud, &r);
}

/* Reports the exit once the child was collected and its pipes are done with (or drained). */
static void check_done(struct script *s)
{
    if (s->freed)
        return;
    bool pipes_closed = s->out.fd < 0 && s->err.fd < 0;
    if (!s->exit_reported) {
        if (s->pid >= 0 && !(s->collected && (pipes_closed || s->drained)))
            return;
        uv_timer_stop(&s->drain);
        report_exit(s);
        if (s->freed)
            return;
    }
    /* Bytes discarded after the exit was reported (a background process kept writing). */
    if (pipes_closed)
        emit_discarded(s);
}

static void on_drain(uv_timer_t *t)
{
    struct script *s = t->data;
    s->drained = true;
    check_done(s);
}

static void on_collected(void *ud, pid_t pid, int wait_status)
{
    (void)pid;
    struct script *s = ud;
    s->collected = true;
    s->wait_status = wait_status;
    s->end_ns = uv_hrtime();
    uv_timer_stop(&s->timeout);
    /* This may run inside script_start (proc_reaper_watch reaps at once): never report
     * from here, only from the loop. With the pipes closed already, nothing is left to
     * wait for. */
    bool pipes_closed = s->out.fd < 0 && s->err.fd < 0;
    uv_timer_start(&s->drain, on_drain, pipes_closed ? 0 : SCRIPT_DRAIN_MS, 0);
}

/*
 * SIGKILL to the child's process group; to the child alone too when the group does not
 * exist yet (a child that has not reached setsid). Only for a child not collected yet:
 * until then its pid cannot be anyone else's.
 */
static void kill_child(pid_t pid)
{
    if (kill(-pid, SIGKILL) < 0 && errno == ESRCH)
        kill(pid, SIGKILL);
}

static void on_timeout(uv_timer_t *t)
{
    struct script *s = t->data;
    if (s->pid > 0 && !s->collected) {
        s->timed_out = true;
        kill_child(s->pid);
    }
}

/* ---- reading ---- */

static void pipe_close(struct script_pipe *p)
{
    if (p->polling) {
        p->polling = false;
        close_handle((uv_handle_t *)&p->poll, poll_closed);
    }
    if (p->fd >= 0) {
        close(p->fd);
        p->fd = -1;
    }
}

static void on_readable(uv_poll_t *h, int status, int events)
{
    (void)events;
    struct script_pipe *p = h->data;
    struct script *s = p->s;
    char buf[SCRIPT_READ_CHUNK];
    size_t total = 0;
    while (total < SCRIPT_READ_MAX) {
        ssize_t r = read(p->fd, buf, sizeof(buf));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && status == 0)
            return;
        if (r <= 0)
            break; /* end of file, or an error that ends this pipe all the same */
        total += (size_t)r;
        if (!take_output(p, buf, (size_t)r))
            return;
    }
    if (total >= SCRIPT_READ_MAX)
        return;                           /* more next time round the loop */
    if (!p->capture && !flush_partial(p)) /* a last line without LF */
        return;
    pipe_close(p);
    check_done(s);
}

static void pipe_open(struct script_pipe *p, struct script *s, int fd, bool capture)
{
    p->s = s;
    p->fd = fd;
    p->capture = capture;
    p->poll.data = p;
    if (fd < 0)
        return;
    int rc = uv_poll_init(s->loop, &p->poll, fd);
    if (rc == 0) {
        p->polling = true;
        s->open_handles++;
        rc = uv_poll_start(&p->poll, UV_READABLE, on_readable);
    }
    if (rc < 0) {
        /* Not expected for a pipe; the output is lost, not the script's exit. */
        log_warn("%s: cannot watch the script's output: %s", s->source, uv_strerror(rc));
        pipe_close(p);
    }
}

/* ---- the API ---- */

static char *const empty_env[] = {NULL};

/* Starts the child and watches its pipes, then its exit. 0 or a negative errno. */
static int spawn(struct script *s, const struct script_spec *spec)
{
    struct proc_spec ps = {
        .path = spec->argv[0],
        .argv = spec->argv,
        .envp = spec->envp ? spec->envp : empty_env,
        .cwd = spec->cwd,
        .oom_score_adj = PROC_OOM_KEEP,
    };
    struct proc_io io;
    int rc = proc_spawn(&ps, &io);
    if (rc < 0)
        return rc;
    /* stdin is /dev/null in effect: the child reads end of file at once. */
    close(io.stdin_fd);
    /* The pipes first: proc_reaper_watch may collect a quick child at once, and the exit
     * must then wait for what it wrote. */
    pipe_open(&s->out, s, io.stdout_fd, spec->capture_stdout);
    pipe_open(&s->err, s, io.stderr_fd, false);
    s->pid = io.pid;
    rc = proc_reaper_watch(s->reaper, io.pid, on_collected, s);
    if (rc < 0) {
        /* Unwatched, nobody would collect it: end it here (SIGKILL is not refused). */
        kill_child(io.pid);
        waitpid(io.pid, NULL, 0);
        pipe_close(&s->out);
        pipe_close(&s->err);
        s->pid = -1;
    }
    return rc;
}

struct script *script_start(uv_loop_t *loop, struct proc_reaper *reaper,
                            const struct script_spec *spec, const struct script_callbacks *cb,
                            void *ud)
{
    struct script *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->source = strdup(spec->source ? spec->source : "script");
    if (!s->source) {
        free(s);
        return NULL;
    }
    s->loop = loop;
    s->reaper = reaper;
    s->cb = *cb;
    s->ud = ud;
    s->cap = spec->output_cap ? spec->output_cap : SCRIPT_OUTPUT_CAP_DEFAULT;
    s->pid = -1;
    s->out.fd = s->err.fd = -1;
    uv_timer_init(loop, &s->timeout);
    uv_timer_init(loop, &s->drain);
    s->timeout.data = s->drain.data = s;
    s->open_handles = 2;
    s->start_ns = s->end_ns = uv_hrtime();

    int rc = spec->argv && spec->argv[0] ? spawn(s, spec) : -EINVAL;
    if (rc < 0) {
        s->spawn_error = rc;
        uv_timer_start(&s->drain, on_drain, 0, 0); /* reported from the loop, not from here */
        return s;
    }
    if (spec->timeout_ms && !s->collected)
        uv_timer_start(&s->timeout, on_timeout, spec->timeout_ms, 0);
    return s;
}

void script_kill(struct script *s)
{
    if (s->pid > 0 && !s->collected)
        kill_child(s->pid);
}

void script_free(struct script *s)
{
    if (!s || s->freed)
        return;
    s->freed = true;
    if (s->pid > 0 && !s->collected) {
        /* Only while the pid is ours: once collected it may belong to someone else. */
        kill_child(s->pid);
        proc_reaper_forget(s->reaper, s->pid);
    }
    pipe_close(&s->out);
    pipe_close(&s->err);
    /* The memory stays until the last handle is closed, which libuv never does from inside
     * a callback: a caller in on_line or on_exit returns into a live struct that says
     * freed. */
    close_handle((uv_handle_t *)&s->timeout, timer_closed);
    close_handle((uv_handle_t *)&s->drain, timer_closed);
}

void script_shell_argv(const char *text, char *argv[4])
{
    argv[0] = "/bin/sh";
    argv[1] = "-c";
    argv[2] = (char *)text;
    argv[3] = NULL;
}
