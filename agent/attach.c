/*
 * tether attach: this terminal on a reconnecting PTY in a workspace, through the relay's
 * websocket /api/v1/workspaces/NAME/pty?id=ID&rows=R&cols=C[&command=CMD] (PROTOCOL.md
 * §14.7). The PTY is named by a UUID (--id, or a random one); it outlives the connection,
 * so a dropped connection is dialed again by itself and a detached session can be attached
 * again with the same id.
 *
 * Decisions, each one something a user notices:
 * - Raw mode starts when the first connection is open, right after the line that names the
 *   session; until then Ctrl-C interrupts as usual. It is cfmakeraw's mode (output
 *   processing off too: the remote PTY already turns "\n" into "\r\n"), and it is undone on
 *   every way out: the normal end, errors, SIGTERM/SIGHUP/SIGINT (handled on the loop),
 *   and, as a safety net, an atexit handler and handlers for the signals that would kill
 *   the process outright.
 * - Detach is ssh's escape: Enter, '~', '.'. "~~" after Enter sends one '~'; '~' and any
 *   other byte after Enter pass through unchanged. The escape is also recognised at the
 *   very start, as ssh does.
 * - Input is sent as text {"data": "..."} while it is valid UTF-8; bytes that are not
 *   (and NUL, which JSON parsers refuse) go as binary messages, which the relay takes as raw
 *   input. Order is kept either way.
 * - The relay replays the PTY's buffer on every attach. On a reconnection, and on a first
 *   attach with --id (the session may already exist), the screen is cleared (ESC [H ESC [2J)
 *   before the connection's first output, so the replay redraws it instead of repeating
 *   what is already there. A first attach to a new random id keeps the screen as it is.
 * - A drop after the session was established is retried (backoff 100 ms .. 5 s with full
 *   jitter) until ATTACH_GIVE_UP_MS have passed since the drop, with one status line per
 *   drop. Refusals that retrying cannot fix (HTTP 400/401/403/404, 4xxx closes other than
 *   the transient ones) end the command, as does any failure of the very first connection
 *   (a mistyped URL should not spin).
 * - Detach and errors after raw mode put back the terminal modes a full-screen program may
 *   have left on (attributes, cursor, keypad, mouse, bracketed paste); the remote program's
 *   own exit is trusted to have done that.
 * - Exit status: the remote process's status when it ended, 0 on detach, 1 on errors (one
 *   "tether:" line, with the id when the session may still be running), 2 on usage errors.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "commands.h"
#include "wsbridge.h"
#include "proto/proto.h"
#include "tunnel/chunkq.h"
#include "tunnel/log.h"
#include "tunnel/tokens.h"
#include "tunnel/wsc.h"

/* Input bytes read from the terminal and not yet sent: reading pauses above this. */
#define ATTACH_INPUT_MAX (64u * 1024)
/* Bytes asked for per read of the terminal. */
#define ATTACH_READ_SIZE 4096u
/* Input bytes carried by one message. */
#define ATTACH_MSG_INPUT_MAX 4096u
/* A text message: {"data":"..."} with every input byte escaped as \u00XX at worst. */
#define ATTACH_TEXT_MAX (ATTACH_MSG_INPUT_MAX * 6u + 64u)
/* Output bytes waiting for the terminal: the websocket is paused above this. */
#define ATTACH_OUTPUT_MAX (256u * 1024)
/* The relay's text messages ({"exit": N}) are short; longer ones are skipped. */
#define ATTACH_CONTROL_MAX 4096u
/* Reconnection: exponential backoff with full jitter between these delays. */
#define ATTACH_BACKOFF_MIN_MS 100u
#define ATTACH_BACKOFF_MAX_MS 5000u
/* A connection that lived this long starts the next backoff afresh. */
#define ATTACH_STABLE_MS 10000u
/* Reconnecting stops this long after a drop: the agent's PTY TTL (5 minutes by default),
 * after which an attach with the same id would start a new process. */
#define ATTACH_GIVE_UP_MS (5u * 60 * 1000)
/* On the way out: how long pending output (the end of a program's output before its exit
 * status) and the websocket's close may take before they are cut short. */
#define ATTACH_DRAIN_MS 5000u
/* wsc_connect's path buffer (the URL's prefix included); the command must fit in it. */
#define ATTACH_PATH_MAX WSC_MAX_PATH
/* A UUID in its text form, 8-4-4-4-12 hex digits. */
#define ATTACH_ID_LEN 36u

/* Written before a reconnection's first output: cursor home, clear the screen. */
static const char attach_clear[] = "\x1b[H\x1b[2J";
/* Written on detach: attributes, cursor shown, cursor keys and keypad normal, mouse
 * reporting and bracketed paste off. (The alternate screen is left alone: leaving it when
 * not in it would move the cursor to a stale saved position.) */
static const char attach_term_reset[] = "\x1b[0m\x1b[?25h\x1b[?1l\x1b>\x1b[?1000l\x1b[?1002l"
                                        "\x1b[?1003l\x1b[?1006l\x1b[?2004l";

static const char attach_usage[] =
    "usage: tether attach --url URL --token-file FILE WORKSPACE [--id ID] [-- COMMAND...]\n"
    "\n"
    "Attaches this terminal to a reconnecting PTY in WORKSPACE, through the relay. The PTY\n"
    "is named by ID (a UUID; a new random one if not given) and starts with COMMAND (joined\n"
    "with spaces, as ssh does) or the login shell. It keeps running when the connection\n"
    "drops (tether reconnects by itself) or when you detach with Enter ~ . (then attach\n"
    "again with --id ID). ~~ after Enter sends one ~.\n"
    "Exit status: the process's own when it ends, 0 on detach, 1 on errors.\n"
    "\n"
    "  --url URL           the relay (or set TETHER_URL)\n"
    "  --token-file FILE   a user token (or TETHER_TOKEN_FILE, or TETHER_TOKEN)\n"
    "  --id ID             the PTY's id, 8-4-4-4-12 hex digits\n"
    "  --ca-file FILE      trust these CAs for wss:// instead of the system's\n"
    "  --insecure          do not check the relay's certificate (development only)\n"
    "  --log-level LEVEL   error, warn (default), info or debug; logs go to stderr\n"
    "  -h, --help          this text\n";

/* ---- the terminal's modes ---- */

/*
 * The terminal's settings from before raw mode. It is the one piece of process-wide state
 * in this file, because the safety net (an atexit handler and fatal-signal handlers) takes
 * no argument; `raw` says whether a restore is due. Up to two devices: stdin's, and
 * stdout's when it is another terminal.
 */
static struct attach_term {
    int fd[2];
    struct termios saved[2];
    int n;
    volatile sig_atomic_t raw;
    bool safety_net;
} attach_term;

/* Signals whose default action ends the process without passing through the loop. */
static const int attach_fatal_signals[] = {SIGQUIT, SIGILL,  SIGABRT, SIGFPE,    SIGSEGV,
                                           SIGBUS,  SIGSYS,  SIGTRAP, SIGXCPU,   SIGXFSZ,
                                           SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF};

/* Async-signal-safe: tcsetattr only. */
static void term_restore(void)
{
    if (!attach_term.raw)
        return;
    attach_term.raw = 0;
    for (int i = 0; i < attach_term.n; i++)
        tcsetattr(attach_term.fd[i], TCSADRAIN, &attach_term.saved[i]);
}

static void term_atexit(void)
{
    term_restore();
}

/* Restores the terminal, then dies of the signal as it would have (SA_RESETHAND). */
static void term_fatal_signal(int sig)
{
    int saved_errno = errno;
    term_restore();
    raise(sig); /* blocked until the handler returns, then the default action */
    errno = saved_errno;
}

static void term_install_safety_net(void)
{
    if (attach_term.safety_net)
        return;
    attach_term.safety_net = true;
    atexit(term_atexit);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = term_fatal_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof(attach_fatal_signals) / sizeof(attach_fatal_signals[0]); i++) {
        struct sigaction old;
        /* A signal someone chose to ignore stays ignored. */
        if (sigaction(attach_fatal_signals[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            continue;
        sigaction(attach_fatal_signals[i], &sa, NULL);
    }
}

/* Notes the terminal devices of stdin and stdout and their settings. */
static int term_save(void)
{
    struct stat st0, st1;
    if (fstat(0, &st0) < 0 || fstat(1, &st1) < 0)
        return uv_translate_sys_error(errno);
    attach_term.n = 0;
    attach_term.fd[attach_term.n++] = 0;
    if (st0.st_rdev != st1.st_rdev)
        attach_term.fd[attach_term.n++] = 1;
    for (int i = 0; i < attach_term.n; i++)
        if (tcgetattr(attach_term.fd[i], &attach_term.saved[i]) < 0)
            return uv_translate_sys_error(errno);
    return 0;
}

/* Raw mode (again, after SIGCONT: a shell may have put its own modes back meanwhile). */
static int term_raw(void)
{
    term_install_safety_net();
    for (int i = 0; i < attach_term.n; i++) {
        struct termios t = attach_term.saved[i];
        cfmakeraw(&t);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        attach_term.raw = 1; /* set first: a signal in between still restores */
        if (tcsetattr(attach_term.fd[i], TCSADRAIN, &t) < 0) {
            int err = uv_translate_sys_error(errno);
            term_restore();
            return err;
        }
    }
    return 0;
}

/* ---- the session ---- */

struct attach {
    struct cli_runtime rt;
    struct cli_client cc;
    const char *workspace;
    char id[ATTACH_ID_LEN + 1];
    bool id_given;
    char *command_query; /* "&command=..." percent-encoded, or ""; malloc'd */
    char path[ATTACH_PATH_MAX];
    uv_tty_t in;  /* stdin, read only once in raw mode */
    uv_tty_t out; /* stdout: the PTY's output */
    bool handles_ready;
    uv_signal_t sigwinch;
    uv_signal_t sighup;
    uv_signal_t sigcont;
    uv_timer_t retry_timer;
    uv_timer_t drain_timer;

    struct wsc *ws;     /* the current connection, or NULL */
    bool ws_open;       /* ... and it is established */
    bool ever_open;     /* some connection was established: the session exists */
    bool clear_pending; /* clear the screen before this connection's first output */
    uint64_t opened_at; /* uv_now when ws opened */
    uint64_t lost_at;   /* uv_now of the drop that reconnecting started from */
    unsigned attempt;   /* reconnections since the last stable connection */
    char last_error[256];

    /* input */
    bool reading;
    bool line_start;    /* the last byte passed was Enter (or nothing was typed yet) */
    bool tilde;         /* a '~' after Enter is held back: the escape may follow */
    bool input_dropped; /* input was dropped while disconnected (said once) */
    struct chunkq to_ws;
    int rows, cols;           /* the terminal's size now */
    int sent_rows, sent_cols; /* the size the relay was last told */
    bool resize_pending;

    /* output */
    size_t to_out;       /* bytes in uv_write requests */
    bool out_line_start; /* the last byte written was '\n' */
    bool wrote_output;   /* the remote program has written to this terminal */
    bool rx_paused;
    bool rx_in_message;
    bool rx_text; /* the message being received is a text message */
    char ctl[ATTACH_CONTROL_MAX + 1];
    size_t ctl_len;
    bool ctl_skip;

    /* the end */
    bool ending;
    bool drain_expired;
    bool finished;
    int exit_code;
    char end_msg[512];

    uint8_t msg[WSC_PRE + ATTACH_TEXT_MAX]; /* a text message is built here */
    uint8_t rbuf[ATTACH_READ_SIZE];
};

struct attach_write {
    uv_write_t req;
    struct attach *a;
    size_t len;
    uint8_t data[];
};

/* A line on stderr from within raw mode: "\r\n" for line ends, starting on a fresh line. */
static void say_raw(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say_raw(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "%stether: %s%s", attach_term.raw ? "\r\n" : "", line,
            attach_term.raw ? "\r\n" : "\n");
}

static void on_handle_closed(uv_handle_t *h)
{
    (void)h;
}

static void close_handle(uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, on_handle_closed);
}

/* Everything is over once the websocket is gone and the output is out (or took too long). */
static void maybe_finish(struct attach *a)
{
    if (!a->ending || a->finished || a->ws || (a->to_out > 0 && !a->drain_expired))
        return;
    a->finished = true;
    term_restore();
    if (a->handles_ready) {
        close_handle((uv_handle_t *)&a->in);
        close_handle((uv_handle_t *)&a->out);
        close_handle((uv_handle_t *)&a->sigwinch);
        close_handle((uv_handle_t *)&a->sighup);
        close_handle((uv_handle_t *)&a->sigcont);
        close_handle((uv_handle_t *)&a->retry_timer);
        close_handle((uv_handle_t *)&a->drain_timer);
    }
    cli_runtime_stop(&a->rt);
}

static void stop_reading(struct attach *a)
{
    if (a->reading) {
        uv_read_stop((uv_stream_t *)&a->in);
        a->reading = false;
    }
}

static void write_out(struct attach *a, const void *data, size_t len);

static void on_drain_timeout(uv_timer_t *t)
{
    struct attach *a = t->data;
    a->drain_expired = true;
    if (a->ws)
        wsc_abort(a->ws, "closing"); /* `closed` runs before this returns */
    maybe_finish(a);
}

/* How attach_end leaves. */
enum {
    ATTACH_END_RESET = 1, /* put back the terminal modes a program may have left on */
    ATTACH_END_FLUSH = 2, /* send the input still queued before closing (a detach) */
    ATTACH_END_GONE = 4,  /* the terminal is gone: write nothing more to it */
};

/*
 * Ends the command with exit status `code` and a->end_msg (set by the caller, may be empty)
 * as its last line: pending output is written, the websocket is closed with 1000 (which
 * the relay takes as a detach), then the terminal's modes are restored.
 */
static void attach_end(struct attach *a, int code, unsigned how)
{
    if (a->ending)
        return;
    a->ending = true;
    a->exit_code = code;
    stop_reading(a);
    if (a->handles_ready) {
        uv_timer_stop(&a->retry_timer);
        uv_timer_start(&a->drain_timer, on_drain_timeout, ATTACH_DRAIN_MS, 0);
    }
    if ((how & ATTACH_END_RESET) && attach_term.raw && a->wrote_output)
        write_out(a, attach_term_reset, sizeof(attach_term_reset) - 1);
    /* The last line, printed after raw mode, starts on a line of its own. */
    if (!(how & ATTACH_END_GONE) && attach_term.raw && !a->out_line_start)
        write_out(a, "\r\n", 2);
    if (a->ws) {
        if (a->rx_paused) /* the relay's close frame must get through */
            wsc_pause_rx(a->ws, false);
        a->rx_paused = false;
        if ((how & ATTACH_END_FLUSH) && a->ws_open && a->to_ws.len > 0)
            wsc_want_write(a->ws); /* ws_writable sends the rest, then closes */
        else
            wsc_close(a->ws, LWS_CLOSE_STATUS_NORMAL, "client leaving");
    }
    maybe_finish(a);
}

/* Ends with EXIT_FAIL and one line; after raw mode, the terminal's modes are put back
 * unless the terminal is gone. */
static void end_fail(struct attach *a, bool terminal_gone, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void end_fail(struct attach *a, bool terminal_gone, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->end_msg, sizeof(a->end_msg), fmt, ap);
    va_end(ap);
    attach_end(a, EXIT_FAIL, terminal_gone ? ATTACH_END_GONE : ATTACH_END_RESET);
}

/* ---- output: relay -> terminal ---- */

static void on_write(uv_write_t *req, int status)
{
    struct attach_write *w = (struct attach_write *)req;
    struct attach *a = w->a;
    a->to_out -= w->len;
    free(w);
    if (status < 0 && status != UV_ECANCELED && !a->ending) {
        end_fail(a, true, "cannot write to the terminal: %s; session %s keeps running",
                 uv_strerror(status), a->id);
        return;
    }
    if (a->rx_paused && a->to_out < ATTACH_OUTPUT_MAX / 2) {
        a->rx_paused = false;
        if (a->ws)
            wsc_pause_rx(a->ws, false);
    }
    maybe_finish(a);
}

/* Writes to the terminal; what it does not take at once is queued (copied). */
static void write_out(struct attach *a, const void *data, size_t len)
{
    size_t done = 0;
    if (a->finished || uv_is_closing((uv_handle_t *)&a->out))
        return;
    if (a->to_out == 0) {
        uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
        int n = uv_try_write((uv_stream_t *)&a->out, &buf, 1);
        if (n > 0)
            done = (size_t)n;
        else if (n < 0 && n != UV_EAGAIN && n != UV_ENOSYS) {
            if (!a->ending)
                end_fail(a, true, "cannot write to the terminal: %s; session %s keeps running",
                         uv_strerror(n), a->id);
            return;
        }
    }
    if (len > 0)
        a->out_line_start = ((const uint8_t *)data)[len - 1] == '\n';
    if (done == len)
        return;
    struct attach_write *w = malloc(sizeof(*w) + len - done);
    int rc = UV_ENOMEM;
    if (w) {
        w->a = a;
        w->len = len - done;
        memcpy(w->data, (const uint8_t *)data + done, w->len);
        uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)w->len);
        rc = uv_write(&w->req, (uv_stream_t *)&a->out, &buf, 1, on_write);
    }
    if (rc < 0) {
        free(w);
        if (!a->ending)
            end_fail(a, true, "cannot write to the terminal: %s", uv_strerror(rc));
        return;
    }
    a->to_out += w->len;
    if (a->to_out >= ATTACH_OUTPUT_MAX && !a->rx_paused && a->ws && !a->ending) {
        a->rx_paused = true;
        wsc_pause_rx(a->ws, true);
    }
}

/* The relay's text message: {"exit": STATUS} ends the command; others are ignored. */
static void handle_control(struct attach *a)
{
    json_error_t err;
    json_t *msg = json_loadb(a->ctl, a->ctl_len, 0, &err);
    json_t *exit_status = json_is_object(msg) ? json_object_get(msg, "exit") : NULL;
    if (json_is_integer(exit_status)) {
        json_int_t st = json_integer_value(exit_status);
        int code = st >= 0 && st <= 255 ? (int)st : EXIT_FAIL;
        snprintf(a->end_msg, sizeof(a->end_msg), "session %s ended (exit status %lld)", a->id,
                 (long long)st);
        attach_end(a, code, 0);
    } else {
        log_debug("ignoring a text message from the relay");
    }
    json_decref(msg);
}

static void ws_receive(void *ud, struct wsc *ws, const uint8_t *data, size_t len, bool binary,
                       bool final)
{
    struct attach *a = ud;
    (void)ws;
    if (!a->rx_in_message) {
        a->rx_text = !binary;
        a->ctl_len = 0;
        a->ctl_skip = false;
    }
    a->rx_in_message = !final;
    if (a->ending)
        return;
    if (a->rx_text) {
        if (a->ctl_len + len > ATTACH_CONTROL_MAX)
            a->ctl_skip = true;
        else {
            memcpy(a->ctl + a->ctl_len, data, len);
            a->ctl_len += len;
        }
        if (final && !a->ctl_skip)
            handle_control(a);
        return;
    }
    if (len == 0)
        return;
    if (a->clear_pending) {
        a->clear_pending = false;
        write_out(a, attach_clear, sizeof(attach_clear) - 1);
    }
    a->wrote_output = true;
    write_out(a, data, len);
}

/* ---- input: terminal -> relay ---- */

/* The length of the UTF-8 character at p (1..4), or 0 if it is not a valid one or is cut
 * off at n. Overlong forms, surrogates and code points above U+10FFFF are not valid. */
static size_t utf8_char_len(const uint8_t *p, size_t n)
{
    uint8_t c = p[0];
    size_t len;
    uint32_t cp, min;
    if (c < 0x80)
        return 1;
    if ((c & 0xe0) == 0xc0) {
        len = 2, cp = c & 0x1fu, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, cp = c & 0x0fu, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        len = 4, cp = c & 0x07u, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (p[i] & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* How many bytes at p can go in a JSON string: whole valid UTF-8 characters, no NUL. */
static size_t text_prefix(const uint8_t *p, size_t n)
{
    size_t i = 0, l;
    while (i < n && p[i] != 0 && (l = utf8_char_len(p + i, n - i)) > 0)
        i += l;
    return i;
}

/* How many bytes at p cannot: up to where a character that can begins. At least 1. */
static size_t binary_run(const uint8_t *p, size_t n)
{
    size_t i = 1;
    while (i < n && (p[i] == 0 || utf8_char_len(p + i, n - i) == 0))
        i++;
    return i;
}

/* Builds {"data":"..."} from valid UTF-8 without NUL; returns the message's length. */
static size_t build_data_message(uint8_t *out, const uint8_t *p, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    memcpy(out, "{\"data\":\"", 9);
    o = 9;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = c;
        } else if (c == '\r') {
            out[o++] = '\\';
            out[o++] = 'r';
        } else if (c == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else if (c < 0x20) {
            memcpy(out + o, "\\u00", 4);
            out[o + 4] = (uint8_t)hex[c >> 4];
            out[o + 5] = (uint8_t)hex[c & 15];
            o += 6;
        } else {
            out[o++] = c;
        }
    }
    memcpy(out + o, "\"}", 2);
    return o + 2;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct attach *a = h->data;
    (void)suggested;
    *buf = uv_buf_init((char *)a->rbuf, sizeof(a->rbuf));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

static void start_reading(struct attach *a)
{
    /* While connected, a full queue pauses reading: the relay sets the pace. */
    if (a->reading || a->ending || !attach_term.raw ||
        (a->to_ws.len >= ATTACH_INPUT_MAX && a->ws_open))
        return;
    int rc = uv_read_start((uv_stream_t *)&a->in, on_alloc, on_read);
    if (rc == 0)
        a->reading = true;
    else
        end_fail(a, false, "cannot read the terminal: %s; session %s keeps running",
                 uv_strerror(rc), a->id);
}

/*
 * Passes input through the detach escape into out (room for n + 1 bytes: a held '~' may
 * come out in front). Returns true when Enter ~ . was typed; bytes after it are dropped.
 */
static bool escape_filter(struct attach *a, const uint8_t *in, size_t n, uint8_t *out,
                          size_t *outlen)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = in[i];
        if (a->tilde) {
            a->tilde = false;
            if (c == '.') {
                *outlen = o;
                return true;
            }
            if (c == '~') { /* "~~": one literal '~' */
                out[o++] = '~';
                a->line_start = false;
                continue;
            }
            out[o++] = '~'; /* any other "~X" passes unchanged */
        } else if (a->line_start && c == '~') {
            a->tilde = true;
            continue;
        }
        out[o++] = c;
        a->line_start = c == '\r' || c == '\n';
    }
    *outlen = o;
    return false;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct attach *a = s->data;
    if (n == 0)
        return;
    if (n < 0) { /* the terminal went away (hangup) */
        end_fail(a, true, "the terminal closed (%s); session %s keeps running", uv_strerror((int)n),
                 a->id);
        return;
    }
    uint8_t passed[ATTACH_READ_SIZE + 1];
    size_t len;
    bool detach = escape_filter(a, (const uint8_t *)buf->base, (size_t)n, passed, &len);
    if (len > 0 && a->to_ws.len >= ATTACH_INPUT_MAX) {
        /* Disconnected with a full queue: reading goes on so that the escape still works. */
        if (!a->input_dropped)
            say_raw("input typed while disconnected is being dropped");
        a->input_dropped = true;
    } else if (len > 0 && chunkq_append(&a->to_ws, passed, len) < 0) {
        end_fail(a, false, "out of memory; session %s keeps running", a->id);
        return;
    }
    if (a->to_ws.len >= ATTACH_INPUT_MAX && a->ws_open)
        stop_reading(a);
    if (a->ws_open && a->to_ws.len > 0)
        wsc_want_write(a->ws);
    if (detach) {
        snprintf(a->end_msg, sizeof(a->end_msg),
                 "detached; session %s keeps running (attach again with --id %s)", a->id, a->id);
        attach_end(a, EXIT_OK, ATTACH_END_RESET | ATTACH_END_FLUSH);
    }
}

/* Sends one message of queued input: text while it is valid UTF-8, else binary. */
static int send_input(struct attach *a, struct wsc *ws)
{
    size_t n;
    uint8_t *front = chunkq_front(&a->to_ws, &n);
    if (n > ATTACH_MSG_INPUT_MAX)
        n = ATTACH_MSG_INPUT_MAX;
    size_t t = text_prefix(front, n);
    if (t > 0) {
        size_t len = build_data_message(a->msg + WSC_PRE, front, t);
        if (wsc_write(ws, a->msg, len, false) < 0)
            return -1;
        chunkq_consume(&a->to_ws, t);
        return 0;
    }
    size_t b = binary_run(front, n);
    /* Framed and masked where the bytes lie: the block keeps WSC_PRE bytes in front. */
    if (wsc_write(ws, front - WSC_PRE, b, true) < 0)
        return -1;
    chunkq_consume(&a->to_ws, b);
    return 0;
}

static int send_resize(struct attach *a, struct wsc *ws)
{
    int len = snprintf((char *)a->msg + WSC_PRE, ATTACH_TEXT_MAX, "{\"rows\":%d,\"cols\":%d}",
                       a->rows, a->cols);
    if (wsc_write(ws, a->msg, (size_t)len, false) < 0)
        return -1;
    a->sent_rows = a->rows;
    a->sent_cols = a->cols;
    a->resize_pending = false;
    return 0;
}

static void ws_writable(void *ud, struct wsc *ws)
{
    struct attach *a = ud;
    int rc = 0;
    if (a->resize_pending && !a->ending)
        rc = send_resize(a, ws);
    else if (a->to_ws.len > 0)
        rc = send_input(a, ws);
    if (rc < 0)
        return;      /* the connection is failing: `closed` follows */
    if (a->ending) { /* a detach: the last input is out, or going */
        if (a->to_ws.len > 0)
            wsc_want_write(ws);
        else
            wsc_close(ws, LWS_CLOSE_STATUS_NORMAL, "detached");
        return;
    }
    if (a->resize_pending || a->to_ws.len > 0)
        wsc_want_write(ws);
    start_reading(a);
}

/* ---- the connection ---- */

static void update_size(struct attach *a)
{
    int cols = 0, rows = 0;
    if (uv_tty_get_winsize(&a->out, &cols, &rows) == 0) {
        a->rows = rows;
        a->cols = cols;
    }
}

static void on_sigwinch(uv_signal_t *s, int signum)
{
    struct attach *a = s->data;
    (void)signum;
    update_size(a);
    if (a->rows == a->sent_rows && a->cols == a->sent_cols)
        return;
    a->resize_pending = true;
    if (a->ws_open)
        wsc_want_write(a->ws);
}

static void ws_established(void *ud, struct wsc *ws)
{
    struct attach *a = ud;
    a->ws_open = true;
    a->opened_at = uv_now(&a->rt.loop);
    a->clear_pending = a->ever_open || a->id_given;
    if (!a->ever_open) {
        a->ever_open = true;
        fprintf(stderr, "tether: attached to %s (detach: Enter ~ .)\n", a->id);
        int rc = term_raw();
        if (rc < 0) {
            end_fail(a, false, "cannot put the terminal in raw mode: %s", uv_strerror(rc));
            return;
        }
    } else {
        log_info("reconnected to session %s", a->id);
    }
    a->last_error[0] = '\0';
    a->input_dropped = false;
    if (a->rx_paused)
        wsc_pause_rx(ws, true);
    /* The size in the URL may be stale: a SIGWINCH may have come while connecting. */
    update_size(a);
    if (a->rows != a->sent_rows || a->cols != a->sent_cols)
        a->resize_pending = true;
    start_reading(a);
    wsc_want_write(ws);
}

static void ws_closed(void *ud, struct wsc *ws, int status, const char *reason);

static const struct wsc_events attach_ws_events = {
    .established = ws_established,
    .receive = ws_receive,
    .writable = ws_writable,
    .closed = ws_closed,
};

static void connect_now(struct attach *a)
{
    char err[256];
    update_size(a);
    int n = snprintf(a->path, sizeof(a->path), "/api/v1/workspaces/%s/pty?id=%s&rows=%d&cols=%d%s",
                     a->workspace, a->id, a->rows, a->cols, a->command_query);
    if (n < 0 || (size_t)n >= sizeof(a->path)) {
        end_fail(a, false, "the request's path is too long");
        return;
    }
    struct wsc_params wp = {
        .context = a->rt.ws.ctx,
        .vhost = a->rt.ws.client_vhost,
        .loop = &a->rt.loop,
        .url = &a->cc.url,
        .path = a->path,
        .token = a->cc.token,
        .insecure = a->cc.insecure,
    };
    a->sent_rows = a->rows;
    a->sent_cols = a->cols;
    a->resize_pending = false;
    a->rx_in_message = false;
    a->ws = wsc_connect(&wp, &attach_ws_events, a, err, sizeof(err));
    if (!a->ws) {
        /* Treated like a failed connection: the same retry rules apply. */
        ws_closed(a, NULL, 0, err);
    }
}

static void on_retry(uv_timer_t *t)
{
    struct attach *a = t->data;
    if (!a->ending && !a->ws)
        connect_now(a);
}

static uint32_t backoff_delay(struct attach *a)
{
    /* Exponential with full jitter above the minimum: min + rand[0, cap - min]. */
    uint64_t cap = ATTACH_BACKOFF_MIN_MS;
    for (unsigned i = 0; i < a->attempt && cap < ATTACH_BACKOFF_MAX_MS; i++)
        cap *= 2;
    if (cap > ATTACH_BACKOFF_MAX_MS)
        cap = ATTACH_BACKOFF_MAX_MS;
    uint32_t r = 0;
    if (getrandom(&r, sizeof(r), GRND_NONBLOCK) != sizeof(r))
        r = (uint32_t)uv_hrtime();
    uint64_t span = cap - ATTACH_BACKOFF_MIN_MS;
    return (uint32_t)(ATTACH_BACKOFF_MIN_MS + (span ? r % (span + 1) : 0));
}

/*
 * Can a later attempt succeed where this one failed? Connection failures, an offline
 * workspace, a relay or agent going away, a busy relay, a dropped slow reader: yes.
 * A bad request, a refused token, an unknown workspace, an agent without PTYs, too many
 * PTYs: no.
 */
static bool retryable(int status)
{
    if (status == 0 || status == 502 || status == 503 || status == 504 || status == 1001 ||
        status == 1005 || status == 1006 || status == 1011 || status == 1012 || status == 1013)
        return true;
    switch (status - 4000) {
    case PROTO_CODE_FLOW:     /* dropped as too slow a reader: attach again */
    case PROTO_CODE_TIMEOUT:  /* the tunnel's keepalive */
    case PROTO_CODE_INTERNAL: /* out of memory or fds, for now */
    case PROTO_CODE_CANCEL:   /* the agent's tunnel went away (4010) */
    case PROTO_CODE_SHUTDOWN:
    case PROTO_CODE_REPLACED:
        return true;
    default:
        return false;
    }
}

/* One line about a failed connection, for a person. */
static void failure_text(struct attach *a, int status, const char *reason, bool established,
                         char *buf, size_t len)
{
    char what[128];
    snprintf(what, sizeof(what), "terminal in %s", a->workspace);
    if (status == 4000 + PROTO_CODE_UNSUPPORTED) {
        snprintf(buf, len, "workspace %s serves no terminals: its agent runs no PTYs (%s)",
                 a->workspace, reason);
    } else if (status == 400) {
        snprintf(buf, len, "the relay refused the request (HTTP 400): bad id, size or command");
    } else if (status == 4000 + PROTO_CODE_STREAM_LIMIT) {
        snprintf(buf, len, "workspace %s has too many terminals (%s)", a->workspace, reason);
    } else if (status == LWS_CLOSE_STATUS_NORMAL) {
        snprintf(buf, len, "the relay ended the session without an exit status");
    } else if (status == 0 && established) {
        snprintf(buf, len, "the connection to the relay dropped: %s", reason);
    } else {
        struct wsbridge_end e = {.status = status, .reason = reason, .established = established};
        wsbridge_end_text(&e, a->workspace, what, buf, len);
    }
}

static void ws_closed(void *ud, struct wsc *ws, int status, const char *reason)
{
    struct attach *a = ud;
    bool was_open = a->ws_open;
    (void)ws;
    a->ws = NULL;
    a->ws_open = false;
    if (a->ending) {
        maybe_finish(a);
        return;
    }
    uint64_t now = uv_now(&a->rt.loop);
    failure_text(a, status, reason, was_open, a->last_error, sizeof(a->last_error));
    if (!a->ever_open) {
        end_fail(a, false, "%s", a->last_error);
        return;
    }
    if (!retryable(status)) {
        end_fail(a, false, "%s; session %s", a->last_error, a->id);
        return;
    }
    if (was_open) {
        if (now - a->opened_at >= ATTACH_STABLE_MS)
            a->attempt = 0;
        a->lost_at = now;
        say_raw("connection lost, reconnecting... (%s)", a->last_error);
    } else if (now - a->lost_at >= ATTACH_GIVE_UP_MS) {
        end_fail(a, false, "could not reconnect for %u s (%s); session %s may still be running",
                 ATTACH_GIVE_UP_MS / 1000, a->last_error, a->id);
        return;
    }
    /* Input typed meanwhile waits in the queue (bounded) for the next connection; reading
     * goes on so that the escape works while disconnected. */
    start_reading(a);
    uint32_t delay = backoff_delay(a);
    a->attempt++;
    log_debug("reconnecting in %u ms", delay);
    uv_timer_start(&a->retry_timer, on_retry, delay, 0);
}

/* ---- signals ---- */

/* SIGINT (before raw mode, or from kill), SIGTERM, SIGHUP: leave, the session stays. */
static void on_stop_signal(struct attach *a, int signum)
{
    if (a->ever_open)
        end_fail(a, signum == SIGHUP, "interrupted by signal %d; session %s keeps running", signum,
                 a->id);
    else
        end_fail(a, false, "interrupted");
}

static void on_runtime_signal(struct cli_runtime *rt, int signum)
{
    on_stop_signal(rt->ud, signum);
}

static void on_sighup(uv_signal_t *s, int signum)
{
    on_stop_signal(s->data, signum);
}

static void on_sigcont(uv_signal_t *s, int signum)
{
    struct attach *a = s->data;
    (void)signum;
    if (attach_term.raw && !a->ending)
        term_raw();
}

/* ---- setup ---- */

static bool id_valid(const char *id)
{
    if (strlen(id) != ATTACH_ID_LEN)
        return false;
    bool nonzero = false;
    for (size_t i = 0; i < ATTACH_ID_LEN; i++) {
        char c = id[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return false;
        } else if (c != '0') {
            nonzero = true;
        }
    }
    return nonzero; /* the all-zero id is malformed (PROTOCOL.md §3.2) */
}

/* A random UUID, version 4. */
static int id_generate(char *out)
{
    uint8_t b[16];
    if (getrandom(b, sizeof(b), 0) != (ssize_t)sizeof(b))
        return -1;
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(out, ATTACH_ID_LEN + 1,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
             b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
             b[15]);
    return 0;
}

/* "&command=" and the words joined with spaces, percent-encoded; "" without words. */
static int command_query(struct attach *a, char **words, int n)
{
    size_t raw = 0;
    for (int i = 0; i < n; i++)
        raw += strlen(words[i]) + 1;
    a->command_query = malloc(raw * 3 + 16);
    if (!a->command_query) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    char *q = a->command_query;
    *q = '\0';
    if (n == 0)
        return EXIT_OK;
    if (raw - 1 > PROTO_MAX_PTY_COMMAND) {
        cli_error("the command is longer than %u bytes", PROTO_MAX_PTY_COMMAND);
        return EXIT_USAGE;
    }
    static const char hex[] = "0123456789ABCDEF";
    q += sprintf(q, "&command=");
    for (int i = 0; i < n; i++) {
        const uint8_t *w = (const uint8_t *)words[i];
        size_t wl = strlen(words[i]);
        if (text_prefix(w, wl) != wl) {
            cli_error("the command is not valid UTF-8");
            return EXIT_USAGE;
        }
        if (i > 0)
            q += sprintf(q, "%%20");
        for (; *w; w++) {
            if ((*w >= 'A' && *w <= 'Z') || (*w >= 'a' && *w <= 'z') || (*w >= '0' && *w <= '9') ||
                *w == '-' || *w == '.' || *w == '_' || *w == '~') {
                *q++ = (char)*w;
            } else {
                *q++ = '%';
                *q++ = hex[*w >> 4];
                *q++ = hex[*w & 15];
            }
        }
    }
    *q = '\0';
    return EXIT_OK;
}

/* The longest path this attach may ask for must fit wsc_connect's buffer. */
static int check_path_fits(struct attach *a)
{
    int n = snprintf(NULL, 0, "%s/api/v1/workspaces/%s/pty?id=%s&rows=65535&cols=65535%s",
                     a->cc.url.prefix, a->workspace, a->id, a->command_query);
    if (n >= 0 && (size_t)n < ATTACH_PATH_MAX)
        return EXIT_OK;
    cli_error("the command is too long: percent-encoded, it makes the request's path %d bytes "
              "(at most %u)",
              n, ATTACH_PATH_MAX - 1);
    return EXIT_USAGE;
}

static int check_terminal(void)
{
    const char *which = !isatty(0) ? "stdin" : !isatty(1) ? "stdout" : NULL;
    if (!which)
        return EXIT_OK;
    cli_error("attach needs a terminal on stdin and stdout; %s is not one (for a byte pipe "
              "use 'tether ssh-proxy' or 'tether forward')",
              which);
    return EXIT_USAGE;
}

/* Returns CLI_NEXT to go on, or the exit status to return now. */
static int parse_args(struct attach *a, int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_OPTS_CLIENT, {"id", required_argument, NULL, 'd'}, CLI_OPTS_END};
    const struct cli_shared sh = {.command = "attach", .usage = attach_usage, .client = &a->cc};
    int rc, c;
    const char *id = NULL;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        if (c == 'd') {
            id = optarg;
            continue;
        }
        rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (argc - optind < 1) {
        cli_error("attach needs a WORKSPACE (see 'tether attach --help')");
        return EXIT_USAGE;
    }
    a->workspace = argv[optind];
    if (!tokens_name_valid(a->workspace)) {
        cli_error("'%s' is not a workspace name", a->workspace);
        return EXIT_USAGE;
    }
    if (id && !id_valid(id)) {
        cli_error("bad --id '%s': a UUID is 8-4-4-4-12 hex digits, not all zero", id);
        return EXIT_USAGE;
    }
    if (id) {
        snprintf(a->id, sizeof(a->id), "%s", id);
        a->id_given = true;
    }
    rc = command_query(a, argv + optind + 1, argc - optind - 1);
    return rc == EXIT_OK ? CLI_NEXT : rc;
}

/* stdin and stdout as uv ttys (libuv reopens the device, so the shell's file description
 * never turns non-blocking), and the signals and timers of the session. */
static int open_handles(struct attach *a)
{
    uv_loop_t *loop = &a->rt.loop;
    int rc = uv_tty_init(loop, &a->in, 0, 1);
    if (rc < 0)
        return rc;
    rc = uv_tty_init(loop, &a->out, 1, 0);
    if (rc < 0) {
        uv_close((uv_handle_t *)&a->in, NULL);
        return rc;
    }
    uv_signal_init(loop, &a->sigwinch);
    uv_signal_init(loop, &a->sighup);
    uv_signal_init(loop, &a->sigcont);
    uv_timer_init(loop, &a->retry_timer);
    uv_timer_init(loop, &a->drain_timer);
    a->in.data = a->out.data = a->sigwinch.data = a->sighup.data = a->sigcont.data = a;
    a->retry_timer.data = a->drain_timer.data = a;
    uv_signal_start(&a->sigwinch, on_sigwinch, SIGWINCH);
    uv_signal_start(&a->sighup, on_sighup, SIGHUP);
    uv_signal_start(&a->sigcont, on_sigcont, SIGCONT);
    a->handles_ready = true;
    return 0;
}

static int attach_run(struct attach *a, int argc, char **argv)
{
    /* stderr is the terminal the session runs on: only what needs attention by default. */
    tether_log_level = LOG_WARN;
    int rc = parse_args(a, argc, argv);
    if (rc != CLI_NEXT) /* --help, or a usage error */
        return rc;
    if ((rc = check_terminal()) != EXIT_OK)
        return rc;
    if ((rc = cli_client_resolve(&a->cc)) != EXIT_OK)
        return rc;
    if ((rc = check_path_fits(a)) != EXIT_OK)
        return rc;
    if (!a->id_given && id_generate(a->id) < 0) {
        cli_error("cannot draw a random id: %s", strerror(errno));
        return EXIT_FAIL;
    }
    int err = term_save();
    if (err < 0) {
        cli_error("cannot read the terminal's settings: %s", uv_strerror(err));
        return EXIT_FAIL;
    }
    struct wsctx_config wc = {
        .ca_file = a->cc.ca_file, .tls = a->cc.url.tls, .max_connections = WSCTX_FEW_CONNECTIONS};
    a->rt.on_signal = on_runtime_signal;
    a->rt.ud = a;
    if (cli_runtime_init(&a->rt, &wc) < 0)
        return EXIT_FAIL;
    chunkq_init(&a->to_ws, WSC_PRE);
    a->line_start = true;
    a->out_line_start = true;
    a->exit_code = EXIT_FAIL;
    if ((err = open_handles(a)) < 0) {
        cli_error("cannot use the terminal: %s", uv_strerror(err));
        cli_runtime_stop(&a->rt);
    } else {
        connect_now(a);
    }
    uv_run(&a->rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&a->rt);
    term_restore();
    chunkq_free(&a->to_ws);
    if (a->end_msg[0])
        cli_error("%s", a->end_msg);
    return a->exit_code;
}

int cmd_attach(int argc, char **argv)
{
    struct attach *a = calloc(1, sizeof(*a));
    if (!a) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    int rc = attach_run(a, argc, argv);
    cli_client_free(&a->cc);
    free(a->command_query);
    free(a);
    return rc;
}
