#include "rpty.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

struct rpty_attachment {
    struct rpty_attachment *next;
    struct rpty *s;
    const struct rpty_client_ops *ops;
    void *ud;
    bool wants_input; /* rpty_input took less than offered: call input_ready later */
};

struct rpty {
    struct rpty *next;
    struct rpty_registry *reg;
    uint8_t id[RPTY_ID_SIZE];
    pid_t pid;
    bool exited;      /* the process was collected */
    bool output_done; /* the PTY gave its last output */
    bool ended;       /* removed from the registry; freed once its handles are closed */
    int wait_status;
    int master;
    uv_poll_t poll;
    int poll_events;
    uv_timer_t ttl;
    unsigned open_handles;
    struct ring ring;
    uint8_t *in; /* queued input, RPTY_INPUT_MAX bytes once needed */
    size_t in_len;
    struct rpty_attachment *clients;
};

void rpty_config_default(struct rpty_config *cfg)
{
    cfg->ring_size = RING_DEFAULT_CAP;
    cfg->ttl_ms = RPTY_DEFAULT_TTL_MS;
    cfg->max_sessions = RPTY_DEFAULT_MAX;
}

void rpty_registry_init(struct rpty_registry *r, uv_loop_t *loop, struct proc_reaper *reaper,
                        const struct rpty_config *cfg)
{
    memset(r, 0, sizeof(*r));
    r->loop = loop;
    r->reaper = reaper;
    r->cfg = *cfg;
}

static unsigned clamp(unsigned v, unsigned max)
{
    return v < RPTY_MIN_SIZE ? RPTY_MIN_SIZE : v > max ? max : v;
}

/* ---- ending a session ---- */

static void on_handle_closed(uv_handle_t *h)
{
    struct rpty *s = h->data;
    if (--s->open_handles == 0) {
        ring_free(&s->ring);
        free(s->in);
        free(s);
    }
}

/* Removes the session: the process group gets SIGHUP, the PTY closes, memory follows. */
static void session_end(struct rpty *s)
{
    if (s->ended)
        return;
    s->ended = true;
    struct rpty_registry *r = s->reg;
    for (struct rpty **pp = &r->sessions; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    r->count--;
    while (s->clients) { /* only when the registry closes: clients go without a word */
        struct rpty_attachment *a = s->clients;
        s->clients = a->next;
        free(a);
    }
    if (!s->exited) {
        kill(-s->pid, SIGHUP);
        proc_reaper_forget(r->reaper, s->pid); /* still collected, nobody told */
    }
    uv_close((uv_handle_t *)&s->poll, on_handle_closed);
    close(s->master);
    s->master = -1;
    uv_close((uv_handle_t *)&s->ttl, on_handle_closed);
}

static void exit_code(const struct rpty *s, int *how, int *value)
{
    if (WIFSIGNALED(s->wait_status)) {
        *how = 1;
        *value = WTERMSIG(s->wait_status);
    } else {
        *how = 0;
        *value = WEXITSTATUS(s->wait_status);
    }
}

/* The process is gone and its output read: tell the clients, or wait for the next one. */
static void maybe_finish(struct rpty *s)
{
    if (!s->exited || !s->output_done || s->ended || !s->clients)
        return;
    int how, value;
    exit_code(s, &how, &value);
    while (s->clients) {
        struct rpty_attachment *a = s->clients;
        s->clients = a->next;
        a->ops->exited(a->ud, how, value);
        free(a);
    }
    session_end(s);
}

/* ---- the PTY on the loop ---- */

static void on_pty_ready(uv_poll_t *h, int status, int events);

static void update_poll(struct rpty *s)
{
    if (s->ended)
        return;
    int want = (s->output_done ? 0 : UV_READABLE) | (s->in_len > 0 ? UV_WRITABLE : 0);
    if (want == s->poll_events)
        return;
    s->poll_events = want;
    if (want)
        uv_poll_start(&s->poll, want, on_pty_ready);
    else
        uv_poll_stop(&s->poll);
}

static void read_output(struct rpty *s)
{
    uint8_t buf[RPTY_READ_MAX];
    ssize_t n = read(s->master, buf, sizeof(buf));
    if (n > 0) {
        ring_write(&s->ring, buf, (size_t)n); /* out of memory: no replay, live output goes on */
        for (struct rpty_attachment *a = s->clients, *next; a; a = next) {
            next = a->next; /* a client may detach itself from inside output */
            a->ops->output(a->ud, buf, (size_t)n);
        }
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        /* The process is gone and nothing is left: what orphans write later is lost. */
        if (s->exited)
            s->output_done = true;
        return;
    }
    s->output_done = true; /* EIO: no process holds the terminal any more */
}

static void write_input(struct rpty *s)
{
    if (s->in_len == 0)
        return;
    ssize_t n = write(s->master, s->in, s->in_len);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            s->in_len = 0; /* the terminal is gone: what it never read is dropped */
        return;
    }
    memmove(s->in, s->in + n, s->in_len - (size_t)n);
    s->in_len -= (size_t)n;
    if (s->in_len > 0)
        return;
    for (struct rpty_attachment *a = s->clients, *next; a; a = next) {
        next = a->next;
        if (a->wants_input) {
            a->wants_input = false;
            a->ops->input_ready(a->ud);
        }
    }
}

static void on_pty_ready(uv_poll_t *h, int status, int events)
{
    struct rpty *s = h->data;
    if (status < 0)
        events = UV_READABLE | UV_WRITABLE; /* let read and write say what is wrong */
    if (events & UV_WRITABLE)
        write_input(s);
    if ((events & UV_READABLE) && !s->ended)
        read_output(s);
    if (!s->ended) {
        update_poll(s);
        maybe_finish(s);
    }
}

static void on_exit_status(void *ud, pid_t pid, int status)
{
    struct rpty *s = ud;
    (void)pid;
    s->exited = true;
    s->wait_status = status;
    /* Read what is left now; the poll sees EAGAIN only if asked. */
    while (!s->output_done && !s->ended)
        read_output(s);
    update_poll(s);
    maybe_finish(s);
}

static void on_ttl(uv_timer_t *t)
{
    struct rpty *s = t->data;
    session_end(s);
}

static void start_ttl(struct rpty *s)
{
    uv_timer_start(&s->ttl, on_ttl, s->reg->cfg.ttl_ms, 0);
}

/* ---- sessions ---- */

static struct rpty *find(struct rpty_registry *r, const uint8_t id[RPTY_ID_SIZE])
{
    for (struct rpty *s = r->sessions; s; s = s->next)
        if (memcmp(s->id, id, RPTY_ID_SIZE) == 0)
            return s;
    return NULL;
}

static int session_start(struct rpty_registry *r, const uint8_t id[RPTY_ID_SIZE], unsigned rows,
                         unsigned cols, const struct proc_spec *tmpl, struct rpty **out)
{
    if (r->count >= r->cfg.max_sessions)
        return -EAGAIN;
    struct rpty *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    struct proc_spec spec = *tmpl;
    spec.use_pty = true;
    int rc = proc_pty_open((unsigned short)rows, (unsigned short)cols, 0, 0, &spec.pty_master,
                           &spec.pty_slave, NULL, 0);
    struct proc_io io;
    if (rc == 0)
        rc = proc_spawn(&spec, &io);
    if (rc < 0) {
        free(s);
        return rc;
    }
    s->reg = r;
    memcpy(s->id, id, RPTY_ID_SIZE);
    s->pid = io.pid;
    s->master = io.pty_master;
    ring_init(&s->ring, r->cfg.ring_size);
    if (proc_reaper_watch(r->reaper, s->pid, on_exit_status, s) < 0 ||
        uv_poll_init(r->loop, &s->poll, s->master) < 0) {
        kill(-s->pid, SIGKILL);
        proc_reaper_watch(r->reaper, s->pid, NULL, NULL);
        close(s->master);
        free(s);
        return -ENOMEM;
    }
    uv_timer_init(r->loop, &s->ttl);
    s->poll.data = s->ttl.data = s;
    s->open_handles = 2;
    s->next = r->sessions;
    r->sessions = s;
    r->count++;
    update_poll(s);
    *out = s;
    return 0;
}

int rpty_attach(struct rpty_registry *r, const uint8_t id[RPTY_ID_SIZE], unsigned rows,
                unsigned cols, const struct proc_spec *spec, const struct rpty_client_ops *ops,
                void *ud, struct rpty_attachment **out)
{
    rows = clamp(rows, RPTY_MAX_ROWS);
    cols = clamp(cols, RPTY_MAX_COLS);
    *out = NULL;
    struct rpty *s = find(r, id);
    if (!s) {
        int rc = session_start(r, id, rows, cols, spec, &s);
        if (rc < 0)
            return rc;
    }
    struct rpty_attachment *a = calloc(1, sizeof(*a));
    if (!a) {
        if (!s->clients && !uv_is_active((uv_handle_t *)&s->ttl))
            start_ttl(s);
        return -ENOMEM;
    }
    a->s = s;
    a->ops = ops;
    a->ud = ud;
    a->next = s->clients;
    s->clients = a;
    uv_timer_stop(&s->ttl);
    const uint8_t *piece[2];
    size_t len[2];
    int k = ring_pieces(&s->ring, piece, len);
    for (int i = 0; i < k; i++)
        ops->output(ud, piece[i], len[i]);
    if (s->exited && s->output_done) {
        maybe_finish(s); /* tells a, frees it and the session */
        return 0;
    }
    proc_pty_resize(s->master, (unsigned short)rows, (unsigned short)cols, 0, 0);
    *out = a;
    return 0;
}

size_t rpty_input(struct rpty_attachment *a, const uint8_t *data, size_t len)
{
    struct rpty *s = a->s;
    size_t taken = 0;
    if (s->in_len == 0) { /* straight to the terminal when nothing waits before it */
        ssize_t n = write(s->master, data, len);
        if (n > 0)
            taken = (size_t)n;
        else if (n < 0 && errno != EAGAIN && errno != EINTR)
            return len; /* the terminal is gone */
    }
    if (taken < len) {
        if (!s->in && !(s->in = malloc(RPTY_INPUT_MAX)))
            return taken;
        size_t room = RPTY_INPUT_MAX - s->in_len;
        size_t n = len - taken < room ? len - taken : room;
        memcpy(s->in + s->in_len, data + taken, n);
        s->in_len += n;
        taken += n;
        if (taken < len)
            a->wants_input = true;
        update_poll(s);
    }
    return taken;
}

void rpty_resize(struct rpty_attachment *a, unsigned rows, unsigned cols)
{
    proc_pty_resize(a->s->master, (unsigned short)clamp(rows, RPTY_MAX_ROWS),
                    (unsigned short)clamp(cols, RPTY_MAX_COLS), 0, 0);
}

void rpty_detach(struct rpty_attachment *a)
{
    struct rpty *s = a->s;
    for (struct rpty_attachment **pp = &s->clients; *pp; pp = &(*pp)->next)
        if (*pp == a) {
            *pp = a->next;
            break;
        }
    free(a);
    if (!s->clients)
        start_ttl(s);
}

void rpty_registry_close(struct rpty_registry *r)
{
    while (r->sessions)
        session_end(r->sessions);
}

bool rpty_exists(struct rpty_registry *r, const uint8_t id[RPTY_ID_SIZE])
{
    return find(r, id) != NULL;
}
