#include "sftp.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "tunnel/chunkq.h"
#include "tunnel/log.h"

/* A resolved path: home, a slash and a client path; or a directory, a slash and a name. */
#define SFTP_PATH_BUF (2 * SFTP_WIRE_MAX_PATH + 2)
/* An `ls -l` line; longer ones (only with absurd user names) are cut. */
#define SFTP_LONGNAME_MAX 512u
/* One READDIR entry at most: name (NAME_MAX), longname, attributes. */
#define SFTP_READDIR_ENTRY_MAX (4 + 255 + 4 + SFTP_LONGNAME_MAX + 32)
#define SFTP_READDIR_REPLY_MAX (32 + SFTP_READDIR_BATCH * SFTP_READDIR_ENTRY_MAX)
/* A NAME reply with one path in both name and longname. */
#define SFTP_NAME1_REPLY_MAX (64 + 2 * SFTP_PATH_BUF)
/* Any STATUS reply (the message is a strerror text or a short literal). */
#define SFTP_STATUS_REPLY_MAX 256u
/* User and group names remembered per session for longnames. */
#define SFTP_NAME_CACHE 16u
/* Handles on the wire: slot and generation, 4 bytes each. */
#define SFTP_HANDLE_LEN 8u

struct sftp_handle {
    uint32_t gen;
    bool is_dir;
    bool append;    /* opened with SSH_FXF_APPEND: writes go to the end, in order */
    bool dots_sent; /* directories: "." and ".." were listed */
    uv_file fd;
    uv_dir_t *dir;
    uv_dirent_t dirents[SFTP_READDIR_BATCH]; /* what uv_fs_readdir fills (directories) */
    uv_fs_t fs; /* directories: readdir; any handle: the close at teardown */
    char *path; /* as opened (resolved) */
    struct sftp_server *s;
};

struct sftp_req;
/* The continuation of a request: called with the result of its filesystem call. */
typedef void (*sftp_step_fn)(struct sftp_req *req, ssize_t result);

enum sftp_par { PAR_NONE, PAR_READ, PAR_WRITE };

/* One client request, from its packet's arrival to its reply. */
struct sftp_req {
    struct sftp_req *prev, *next; /* in the server's arrival-ordered list */
    struct sftp_server *s;
    struct sftp_wire_request m; /* strings point into pkt */
    int decode_rc;              /* SFTP_WIRE_EINVAL: answer BAD_MESSAGE */
    char *p1, *p2;              /* resolved paths, or NULL */
    const char *path;           /* what path operations act on: p1 or a handle's path */
    size_t cost;                /* bytes counted against SFTP_MAX_REQUEST_BYTES */
    bool started;
    enum sftp_par par; /* set when started */
    uv_fs_t fs;
    uv_fs_t *inflight; /* the call in flight (&fs, or a directory handle's fs) */
    sftp_step_fn step;
    int phase;                 /* where a request of several calls is */
    struct sftp_handle *h;     /* borrowed: the handle a WRITE, READDIR or FSETSTAT uses */
    struct sftp_handle *owned; /* OPEN's new handle until stored; CLOSE's, until closed */
    uv_file tmpfd;             /* SETSTAT's truncate: closed before the request ends */
    int err;                   /* RENAME: the error to report after a cleanup call */
    uint8_t *buf;              /* READ: DATA header and data; READDIR: the NAME reply */
    struct sftp_wire_out out;
    size_t done;          /* WRITE: bytes written; READDIR: entries looked at */
    uint32_t count;       /* READDIR: entries in the batch; entries in the reply */
    bool answered;        /* the reply is ready; it leaves when every earlier one has */
    const uint8_t *reply; /* in small or buf */
    size_t reply_len;
    uint8_t small[SFTP_STATUS_REPLY_MAX]; /* replies other than DATA and NAME */
    uint32_t len;                         /* packet length */
    uint8_t pkt[];
};

struct name_cache {
    uint32_t id[SFTP_NAME_CACHE];
    char name[SFTP_NAME_CACHE][33];
    unsigned used;
    unsigned next; /* replaced next when full */
};

struct sftp_server {
    uv_loop_t *loop;
    struct sftp_server_events ev;
    void *ud;
    char *home;
    uv_idle_t idle; /* runs deferred work and events outside the caller's stack */

    /* Input: the length field, then the packet it announces. */
    uint8_t hdr[4];
    size_t hdr_have;
    struct sftp_req *cur;
    size_t cur_have;
    bool initialized;

    /* Requests in arrival order; the started ones form a prefix. */
    struct sftp_req *head, *tail;
    size_t nreqs;
    size_t cost;

    struct chunkq out;

    struct sftp_handle *handles[SFTP_MAX_HANDLES];
    uint32_t gens[SFTP_MAX_HANDLES];
    unsigned nhandles;

    struct name_cache users, groups;

    int error;
    bool failed_told;
    bool out_added;     /* want_write is owed */
    bool input_blocked; /* feed returned short: want_input is owed once it can take more */
    bool closing;
    bool handles_closing;
    unsigned closes_pending;
};

static void pump(struct sftp_server *s);
static void teardown(struct sftp_server *s);

/* ---- deferred work and events ---- */

static void after_event(struct sftp_server *s);

static void on_idle(uv_idle_t *idle)
{
    uv_idle_stop(idle);
    after_event(idle->data);
}

/* Runs after_event from the loop soon: API calls never call events themselves. */
static void defer(struct sftp_server *s)
{
    if (!uv_is_active((uv_handle_t *)&s->idle) && !uv_is_closing((uv_handle_t *)&s->idle))
        uv_idle_start(&s->idle, on_idle);
}

static bool can_admit(const struct sftp_server *s)
{
    return !s->error && !s->closing && s->nreqs < SFTP_MAX_REQUESTS &&
           s->cost < SFTP_MAX_REQUEST_BYTES && s->out.len < SFTP_MAX_OUTPUT;
}

/* Starts what can start, then tells the owner what changed. Each event may close s. */
static void after_event(struct sftp_server *s)
{
    if (s->closing) {
        teardown(s);
        return;
    }
    pump(s);
    if (s->error && !s->failed_told) {
        s->failed_told = true;
        if (s->ev.failed)
            s->ev.failed(s->ud);
        if (s->closing)
            return;
    }
    if (s->out_added) {
        s->out_added = false;
        s->ev.want_write(s->ud);
        if (s->closing)
            return;
    }
    if (s->input_blocked && can_admit(s)) {
        s->input_blocked = false;
        s->ev.want_input(s->ud);
    }
}

static void fail(struct sftp_server *s, int err)
{
    if (!s->error) {
        s->error = err;
        log_warn("sftp: session failed: %s", err == SFTP_E_MALFORMED  ? "malformed packet"
                                             : err == SFTP_E_PROTOCOL ? "protocol violation"
                                                                      : "out of memory");
    }
}

/* ---- output ---- */

static void out_append(struct sftp_server *s, const void *p, size_t n)
{
    if (s->closing)
        return;
    if (chunkq_append(&s->out, p, n) < 0) {
        fail(s, SFTP_E_NOMEM);
        return;
    }
    s->out_added = true;
}

/* Records the reply built in o (in req->small or req->buf); req_finish queues it. */
static void reply_out(struct sftp_req *req, struct sftp_wire_out *o, int rc)
{
    if (rc == 0) {
        req->reply = o->p;
        req->reply_len = o->len;
    } else { /* the buffers are sized for the largest reply: this is a bug */
        log_error("sftp: reply to request type %u does not fit", req->m.type);
    }
}

static void out_small(struct sftp_req *req, struct sftp_wire_out *o)
{
    sftp_wire_out_init(o, req->small, sizeof(req->small));
}

static void reply_status(struct sftp_req *req, uint32_t code, const char *msg)
{
    struct sftp_wire_out o;
    out_small(req, &o);
    reply_out(req, &o, sftp_wire_status(&o, req->m.id, code, msg));
}

/*
 * A status for a libuv result (UV_E* is -errno here). The message is OpenSSH's text for the
 * code, which clients print as they get it; only SSH_FX_FAILURE, which covers many errors,
 * says which one ("File exists", "Directory not empty").
 */
static void reply_uv(struct sftp_req *req, ssize_t result)
{
    uint32_t code = result >= 0 ? SSH_FX_OK : sftp_wire_status_from_errno((int)-result);
    reply_status(req, code, code == SSH_FX_FAILURE ? strerror((int)-result) : NULL);
}

/* A NAME reply with one entry and no attributes: REALPATH, READLINK, expand-path. */
static void reply_name1(struct sftp_req *req, const char *name)
{
    free(req->buf);
    if (!(req->buf = malloc(SFTP_NAME1_REPLY_MAX))) {
        reply_status(req, SSH_FX_FAILURE, "out of memory");
        return;
    }
    struct sftp_wire_out o;
    struct sftp_wire_attrs none = {0};
    sftp_wire_out_init(&o, req->buf, SFTP_NAME1_REPLY_MAX);
    sftp_wire_name_begin(&o, req->m.id);
    sftp_wire_name_add(&o, name, name, &none);
    reply_out(req, &o, sftp_wire_name_end(&o, 1));
}

static void attrs_from_stat(struct sftp_wire_attrs *a, const uv_stat_t *st)
{
    memset(a, 0, sizeof(*a));
    a->flags = SSH_FILEXFER_ATTR_SIZE | SSH_FILEXFER_ATTR_UIDGID | SSH_FILEXFER_ATTR_PERMISSIONS |
               SSH_FILEXFER_ATTR_ACMODTIME;
    a->size = st->st_size;
    a->uid = (uint32_t)st->st_uid;
    a->gid = (uint32_t)st->st_gid;
    a->perm = (uint32_t)st->st_mode;
    a->atime = (uint32_t)st->st_atim.tv_sec;
    a->mtime = (uint32_t)st->st_mtim.tv_sec;
}

const uint8_t *sftp_server_output(struct sftp_server *s, size_t *len)
{
    return chunkq_front(&s->out, len);
}

void sftp_server_consumed(struct sftp_server *s, size_t n)
{
    chunkq_consume(&s->out, n);
    if (s->input_blocked && can_admit(s))
        defer(s);
}

/* ---- handles ---- */

static struct sftp_handle *handle_get(struct sftp_server *s, struct sftp_wire_str hs)
{
    if (hs.len != SFTP_HANDLE_LEN)
        return NULL;
    const uint8_t *b = hs.p;
    uint32_t slot = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
    uint32_t gen = (uint32_t)b[4] << 24 | (uint32_t)b[5] << 16 | (uint32_t)b[6] << 8 | b[7];
    if (slot >= SFTP_MAX_HANDLES || !s->handles[slot] || s->handles[slot]->gen != gen)
        return NULL;
    return s->handles[slot];
}

/* A handle struct for OPEN or OPENDIR, made before the call so that storing it cannot fail
 * once the file is open. */
static struct sftp_handle *handle_alloc(const char *path, bool is_dir)
{
    struct sftp_handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    if (!(h->path = strdup(path))) {
        free(h);
        return NULL;
    }
    h->is_dir = is_dir;
    h->fd = -1;
    return h;
}

static void handle_free(struct sftp_handle *h)
{
    if (!h)
        return;
    uv_fs_req_cleanup(&h->fs);
    free(h->path);
    free(h);
}

/* Puts h in a free slot (the caller checked there is one) and writes its wire form. */
static void handle_insert(struct sftp_server *s, struct sftp_handle *h, uint8_t wire[8])
{
    uint32_t slot = 0;
    while (s->handles[slot])
        slot++;
    h->gen = ++s->gens[slot];
    s->handles[slot] = h;
    s->nhandles++;
    const uint32_t v[2] = {slot, h->gen};
    for (int i = 0; i < 2; i++) {
        wire[4 * i] = (uint8_t)(v[i] >> 24);
        wire[4 * i + 1] = (uint8_t)(v[i] >> 16);
        wire[4 * i + 2] = (uint8_t)(v[i] >> 8);
        wire[4 * i + 3] = (uint8_t)v[i];
    }
}

static void handle_remove(struct sftp_server *s, struct sftp_handle *h)
{
    for (uint32_t slot = 0; slot < SFTP_MAX_HANDLES; slot++)
        if (s->handles[slot] == h) {
            s->handles[slot] = NULL;
            s->nhandles--;
            return;
        }
}

/* ---- requests: lifecycle ---- */

static void req_unlink(struct sftp_server *s, struct sftp_req *req)
{
    if (req->prev)
        req->prev->next = req->next;
    else
        s->head = req->next;
    if (req->next)
        req->next->prev = req->prev;
    else
        s->tail = req->prev;
}

static void req_free(struct sftp_req *req)
{
    uv_fs_req_cleanup(&req->fs);
    handle_free(req->owned);
    free(req->p1);
    free(req->p2);
    free(req->buf);
    free(req);
}

static void finish_after_close(struct sftp_req *req, ssize_t result);

/* Submits a filesystem call made by the caller: rc is what uv_fs_* returned. A call that
 * failed at once is reported to step straight away, like a completion. */
static void go(struct sftp_req *req, uv_fs_t *fs, sftp_step_fn step, int rc)
{
    if (rc < 0) {
        step(req, rc);
        return;
    }
    req->inflight = fs;
    req->step = step;
}

/* Readies req->fs for the next call: frees what the previous one left in it. */
static uv_fs_t *prep(struct sftp_req *req)
{
    uv_fs_req_cleanup(&req->fs);
    req->fs.data = req;
    return &req->fs;
}

/* Events wait for the idle phase, so that completions the loop delivers together (a burst
 * of WRITE acks) reach the owner as one want_write. */
static void on_fs(uv_fs_t *fs)
{
    struct sftp_req *req = fs->data;
    struct sftp_server *s = req->s;
    req->inflight = NULL;
    req->step(req, fs->result);
    defer(s);
}

static void req_release(struct sftp_server *s, struct sftp_req *req)
{
    req_unlink(s, req);
    s->nreqs--;
    s->cost -= req->cost;
    req_free(req);
}

/*
 * The request is answered (a temporary descriptor is closed first). Replies leave in the
 * order requests came, whatever order they finish in: OpenSSH's clients (scp, sftp -a)
 * take an out-of-order WRITE or READ reply as a gap and truncate the file there.
 */
static void req_finish(struct sftp_req *req)
{
    struct sftp_server *s = req->s;
    if (req->tmpfd >= 0) {
        uv_file fd = req->tmpfd;
        req->tmpfd = -1;
        uv_fs_t *fs = prep(req);
        go(req, fs, finish_after_close, uv_fs_close(s->loop, fs, fd, on_fs));
        return;
    }
    req->answered = true;
    if (s->closing) {
        req_release(s, req);
        return;
    }
    while (s->head && s->head->answered) {
        struct sftp_req *first = s->head;
        out_append(s, first->reply, first->reply_len);
        req_release(s, first);
    }
}

static void finish_after_close(struct sftp_req *req, ssize_t result)
{
    (void)result;
    req_finish(req);
}

/* ---- path helpers ---- */

/* The client's path made absolute: "" is home, relative paths are under home. */
static char *resolve(const struct sftp_server *s, struct sftp_wire_str p)
{
    size_t hl = strlen(s->home);
    bool absolute = p.len > 0 && p.p[0] == '/';
    size_t n = absolute ? p.len : p.len ? hl + 1 + p.len : hl;
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    if (absolute) {
        memcpy(out, p.p, p.len);
    } else {
        memcpy(out, s->home, hl);
        if (p.len) {
            out[hl] = '/';
            memcpy(out + hl + 1, p.p, p.len);
        }
    }
    out[n] = '\0';
    return out;
}

/* expand-path@openssh.com: "~" and "~/..." mean home; the rest is as for REALPATH. */
static char *resolve_tilde(const struct sftp_server *s, struct sftp_wire_str p)
{
    if (p.len >= 1 && p.p[0] == '~' && (p.len == 1 || p.p[1] == '/')) {
        struct sftp_wire_str rest = {p.p + 1, p.len - 1};
        while (rest.len && rest.p[0] == '/')
            rest.p++, rest.len--;
        return resolve(s, rest);
    }
    return resolve(s, p);
}

static char *str_dup(struct sftp_wire_str p)
{
    char *out = malloc((size_t)p.len + 1);
    if (out) {
        memcpy(out, p.p, p.len);
        out[p.len] = '\0';
    }
    return out;
}

/* ---- requests: the operations ---- */

static void step_status(struct sftp_req *req, ssize_t result)
{
    reply_uv(req, result);
    req_finish(req);
}

static void step_attrs(struct sftp_req *req, ssize_t result)
{
    if (result < 0) {
        reply_uv(req, result);
    } else {
        struct sftp_wire_out o;
        struct sftp_wire_attrs a;
        attrs_from_stat(&a, &req->fs.statbuf);
        out_small(req, &o);
        reply_out(req, &o, sftp_wire_attrs_reply(&o, req->m.id, &a));
    }
    req_finish(req);
}

static void answer(struct sftp_req *req, uint32_t code, const char *msg)
{
    reply_status(req, code, msg);
    req_finish(req);
}

static int open_flags(uint32_t pflags)
{
    int flags;
    if ((pflags & SSH_FXF_READ) && (pflags & SSH_FXF_WRITE))
        flags = O_RDWR;
    else if (pflags & SSH_FXF_WRITE)
        flags = O_WRONLY;
    else
        flags = O_RDONLY;
    if (pflags & SSH_FXF_APPEND)
        flags |= O_APPEND;
    if (pflags & SSH_FXF_CREAT)
        flags |= O_CREAT;
    if (pflags & SSH_FXF_TRUNC)
        flags |= O_TRUNC;
    if (pflags & SSH_FXF_EXCL)
        flags |= O_EXCL;
    /* O_NONBLOCK: opening a FIFO (or a device) must not hold a pool thread, which the whole
     * process shares, until some writer comes; Linux ignores it for regular files. */
    return flags | O_NOCTTY | O_NONBLOCK;
}

/* OPEN and OPENDIR: the handle goes into the table and its wire form to the client. */
static void step_opened(struct sftp_req *req, ssize_t result)
{
    struct sftp_server *s = req->s;
    struct sftp_handle *h = req->owned;
    if (result < 0) {
        reply_uv(req, result);
        req_finish(req);
        return;
    }
    if (h->is_dir) {
        h->dir = req->fs.ptr;
        h->dir->dirents = h->dirents;
        h->dir->nentries = SFTP_READDIR_BATCH;
    } else {
        h->fd = (uv_file)result;
    }
    uint8_t wire[SFTP_HANDLE_LEN];
    handle_insert(s, h, wire);
    req->owned = NULL;
    struct sftp_wire_out o;
    out_small(req, &o);
    reply_out(req, &o, sftp_wire_handle(&o, req->m.id, wire, sizeof(wire)));
    req_finish(req);
}

static void op_open(struct sftp_req *req, bool dir)
{
    struct sftp_server *s = req->s;
    if (s->nhandles >= SFTP_MAX_HANDLES) {
        answer(req, SSH_FX_FAILURE, "too many open handles");
        return;
    }
    if (!(req->owned = handle_alloc(req->path, dir))) {
        answer(req, SSH_FX_FAILURE, "out of memory");
        return;
    }
    uv_fs_t *fs = prep(req);
    if (dir) {
        go(req, fs, step_opened, uv_fs_opendir(s->loop, fs, req->path, on_fs));
        return;
    }
    const struct sftp_wire_attrs *a = &req->m.attrs;
    int mode = a->flags & SSH_FILEXFER_ATTR_PERMISSIONS ? (int)(a->perm & 07777) : 0666;
    req->owned->append = req->m.pflags & SSH_FXF_APPEND;
    go(req, fs, step_opened,
       uv_fs_open(s->loop, fs, req->path, open_flags(req->m.pflags), mode, on_fs));
}

static void step_closed(struct sftp_req *req, ssize_t result)
{
    if (result == UV_ECANCELED) /* teardown never cancels closes; be safe anyway */
        result = 0;
    reply_uv(req, result);
    req_finish(req); /* frees the handle */
}

static void op_close(struct sftp_req *req, struct sftp_handle *h)
{
    struct sftp_server *s = req->s;
    /* Later requests see the handle gone at once; the close itself runs on the pool. */
    handle_remove(s, h);
    req->owned = h;
    uv_fs_t *fs = prep(req);
    if (h->is_dir) {
        uv_dir_t *dir = h->dir;
        h->dir = NULL;
        go(req, fs, step_closed, uv_fs_closedir(s->loop, fs, dir, on_fs));
    } else {
        uv_file fd = h->fd;
        h->fd = -1;
        go(req, fs, step_closed, uv_fs_close(s->loop, fs, fd, on_fs));
    }
}

static void step_read(struct sftp_req *req, ssize_t result)
{
    if (result < 0) {
        reply_uv(req, result);
    } else if (result == 0) {
        reply_status(req, SSH_FX_EOF, NULL);
    } else {
        sftp_wire_data_header(req->buf, req->m.id, (uint32_t)result);
        req->reply = req->buf;
        req->reply_len = SFTP_WIRE_DATA_HEADER + (size_t)result;
    }
    req_finish(req);
}

static void op_read(struct sftp_req *req, struct sftp_handle *h)
{
    if (req->m.offset > INT64_MAX) {
        answer(req, SSH_FX_BAD_MESSAGE, "offset out of range");
        return;
    }
    uint32_t n = req->m.len < SFTP_WIRE_MAX_READ ? req->m.len : SFTP_WIRE_MAX_READ;
    if (!(req->buf = malloc(SFTP_WIRE_DATA_HEADER + n))) {
        answer(req, SSH_FX_FAILURE, "out of memory");
        return;
    }
    uv_buf_t b = uv_buf_init((char *)req->buf + SFTP_WIRE_DATA_HEADER, n);
    uv_fs_t *fs = prep(req);
    go(req, fs, step_read,
       uv_fs_read(req->s->loop, fs, h->fd, &b, 1, (int64_t)req->m.offset, on_fs));
}

static void write_more(struct sftp_req *req);

static void step_write(struct sftp_req *req, ssize_t result)
{
    if (result <= 0) { /* a write of nothing would loop forever */
        reply_uv(req, result < 0 ? result : UV_EIO);
        req_finish(req);
        return;
    }
    req->done += (size_t)result;
    write_more(req);
}

static void write_more(struct sftp_req *req)
{
    if (req->done == req->m.data.len) {
        answer(req, SSH_FX_OK, NULL);
        return;
    }
    struct sftp_handle *h = req->h;
    uv_buf_t b =
        uv_buf_init((char *)req->m.data.p + req->done, (unsigned)(req->m.data.len - req->done));
    int64_t off = h->append ? -1 : (int64_t)(req->m.offset + req->done);
    uv_fs_t *fs = prep(req);
    go(req, fs, step_write, uv_fs_write(req->s->loop, fs, h->fd, &b, 1, off, on_fs));
}

static void op_write(struct sftp_req *req, struct sftp_handle *h)
{
    if (req->m.offset > (uint64_t)INT64_MAX - req->m.data.len) {
        answer(req, SSH_FX_BAD_MESSAGE, "offset out of range");
        return;
    }
    /* Borrowed: a CLOSE waits for every earlier request, so the handle outlives this. */
    req->h = h;
    write_more(req);
}

/* SETSTAT and FSETSTAT: size, permissions, times, then owner, as OpenSSH orders them. */
enum { SET_OPEN, SET_TRUNCATE, SET_CLOSE, SET_PERM, SET_TIMES, SET_OWNER, SET_DONE };

static void setstat_next(struct sftp_req *req);

static void step_setstat(struct sftp_req *req, ssize_t result)
{
    if (result < 0) {
        reply_uv(req, result);
        req_finish(req); /* closes tmpfd if the truncate failed */
        return;
    }
    if (req->phase == SET_TRUNCATE)
        req->tmpfd = (uv_file)result; /* the path was opened for truncating */
    setstat_next(req);
}

static void setstat_next(struct sftp_req *req)
{
    struct sftp_server *s = req->s;
    const struct sftp_wire_attrs *a = &req->m.attrs;
    /* File handles act on the descriptor; paths and directory handles on the path. */
    uv_file fd = req->h ? req->h->fd : -1;
    for (;;) {
        uv_fs_t *fs = prep(req);
        switch (req->phase++) {
        case SET_OPEN:
            /* libuv has no truncate(path): open for writing (without blocking on a FIFO),
             * ftruncate, close. Opening needs the write permission truncate needs. */
            if (!(a->flags & SSH_FILEXFER_ATTR_SIZE) || fd >= 0)
                continue;
            go(req, fs, step_setstat,
               uv_fs_open(s->loop, fs, req->path, O_WRONLY | O_NONBLOCK | O_NOCTTY, 0, on_fs));
            return;
        case SET_TRUNCATE:
            if (!(a->flags & SSH_FILEXFER_ATTR_SIZE))
                continue;
            if (a->size > INT64_MAX) {
                answer(req, SSH_FX_BAD_MESSAGE, "size out of range");
                return;
            }
            go(req, fs, step_setstat,
               uv_fs_ftruncate(s->loop, fs, fd >= 0 ? fd : req->tmpfd, (int64_t)a->size, on_fs));
            return;
        case SET_CLOSE:
            if (req->tmpfd < 0)
                continue;
            fd = req->tmpfd;
            req->tmpfd = -1;
            go(req, fs, step_setstat, uv_fs_close(s->loop, fs, fd, on_fs));
            return;
        case SET_PERM: {
            if (!(a->flags & SSH_FILEXFER_ATTR_PERMISSIONS))
                continue;
            int mode = (int)(a->perm & 07777);
            go(req, fs, step_setstat,
               fd >= 0 ? uv_fs_fchmod(s->loop, fs, fd, mode, on_fs)
                       : uv_fs_chmod(s->loop, fs, req->path, mode, on_fs));
            return;
        }
        case SET_TIMES:
            if (!(a->flags & SSH_FILEXFER_ATTR_ACMODTIME))
                continue;
            go(req, fs, step_setstat,
               fd >= 0 ? uv_fs_futime(s->loop, fs, fd, a->atime, a->mtime, on_fs)
                       : uv_fs_utime(s->loop, fs, req->path, a->atime, a->mtime, on_fs));
            return;
        case SET_OWNER:
            if (!(a->flags & SSH_FILEXFER_ATTR_UIDGID))
                continue;
            go(req, fs, step_setstat,
               fd >= 0 ? uv_fs_fchown(s->loop, fs, fd, a->uid, a->gid, on_fs)
                       : uv_fs_chown(s->loop, fs, req->path, a->uid, a->gid, on_fs));
            return;
        default:
            answer(req, SSH_FX_OK, NULL);
            return;
        }
    }
}

/* ---- READDIR ---- */

static const char *cached_name(struct name_cache *c, uint32_t id, bool group, char num[16])
{
    for (unsigned i = 0; i < c->used; i++)
        if (c->id[i] == id)
            return c->name[i];
    /* Looked up on the loop thread: NSS is local files in a workspace image. Misses are
     * remembered too (as the number), so each id costs one lookup per session. */
    char buf[16384]; /* a group entry lists its members */
    const char *name = NULL;
    if (group) {
        struct group gr, *gp = NULL;
        if (getgrgid_r((gid_t)id, &gr, buf, sizeof(buf), &gp) == 0 && gp)
            name = gp->gr_name;
    } else {
        struct passwd pw, *pp = NULL;
        if (getpwuid_r((uid_t)id, &pw, buf, sizeof(buf), &pp) == 0 && pp)
            name = pp->pw_name;
    }
    snprintf(num, 16, "%u", id);
    unsigned slot = c->used < SFTP_NAME_CACHE ? c->used++ : c->next++ % SFTP_NAME_CACHE;
    c->id[slot] = id;
    snprintf(c->name[slot], sizeof(c->name[slot]), "%s", name ? name : num);
    return c->name[slot];
}

static void readdir_next(struct sftp_req *req);
static void readdir_batch(struct sftp_req *req);

/* The name of entry i of the batch: "." and ".." first, in the first batch only. */
static const char *readdir_name(const struct sftp_req *req, size_t i)
{
    if (req->phase == 0)
        return i == 0 ? "." : "..";
    return req->h->dirents[i].name;
}

static void step_entry(struct sftp_req *req, ssize_t result)
{
    struct sftp_server *s = req->s;
    /* An entry that vanished or cannot be examined is left out, as OpenSSH does. */
    const char *name = readdir_name(req, req->done);
    size_t room = req->out.cap - req->out.len;
    if (result == 0 && room >= 4 + strlen(name) + 4 + SFTP_LONGNAME_MAX + 40) {
        const uv_stat_t *st = &req->fs.statbuf;
        char unum[16], gnum[16], longname[SFTP_LONGNAME_MAX];
        struct sftp_wire_lsinfo ls = {
            .mode = (uint32_t)st->st_mode,
            .nlink = st->st_nlink,
            .user = cached_name(&s->users, (uint32_t)st->st_uid, false, unum),
            .group = cached_name(&s->groups, (uint32_t)st->st_gid, true, gnum),
            .size = st->st_size,
            .mtime = st->st_mtim.tv_sec,
            .now = time(NULL),
        };
        struct sftp_wire_attrs a;
        attrs_from_stat(&a, st);
        sftp_wire_longname(longname, sizeof(longname), &ls, name);
        sftp_wire_name_add(&req->out, name, longname, &a);
        req->count++;
    }
    req->done++;
    readdir_next(req);
}

static void readdir_next(struct sftp_req *req)
{
    struct sftp_handle *h = req->h;
    size_t batch = req->phase == 0 ? 2 : (size_t)h->fs.result;
    if (req->s->closing) { /* nobody will read the reply */
        uv_fs_req_cleanup(&h->fs);
        req_finish(req);
        return;
    }
    if (req->done < batch) {
        char path[SFTP_PATH_BUF + 256];
        const char *name = readdir_name(req, req->done);
        snprintf(path, sizeof(path), "%s/%s", h->path, name);
        uv_fs_t *fs = prep(req);
        go(req, fs, step_entry, uv_fs_lstat(req->s->loop, fs, path, on_fs));
        return;
    }
    if (req->phase == 0)
        h->dots_sent = true;
    uv_fs_req_cleanup(&h->fs); /* frees the batch's names */
    if (req->count == 0) {     /* everything vanished: read on */
        readdir_batch(req);
        return;
    }
    reply_out(req, &req->out, sftp_wire_name_end(&req->out, req->count));
    req_finish(req);
}

static void step_readdir(struct sftp_req *req, ssize_t result)
{
    if (result <= 0) {
        uv_fs_req_cleanup(&req->h->fs);
        if (result == 0)
            reply_status(req, SSH_FX_EOF, NULL);
        else
            reply_uv(req, result);
        req_finish(req);
        return;
    }
    req->done = 0;
    readdir_next(req);
}

static void readdir_batch(struct sftp_req *req)
{
    struct sftp_handle *h = req->h;
    req->phase = 1;
    uv_fs_req_cleanup(&h->fs);
    h->fs.data = req;
    go(req, &h->fs, step_readdir, uv_fs_readdir(req->s->loop, &h->fs, h->dir, on_fs));
}

static void op_readdir(struct sftp_req *req, struct sftp_handle *h)
{
    if (!(req->buf = malloc(SFTP_READDIR_REPLY_MAX))) {
        answer(req, SSH_FX_FAILURE, "out of memory");
        return;
    }
    sftp_wire_out_init(&req->out, req->buf, SFTP_READDIR_REPLY_MAX);
    sftp_wire_name_begin(&req->out, req->m.id);
    req->count = 0;
    req->done = 0;
    /* READDIR borrows the handle (a CLOSE cannot overtake it); see op_write. */
    req->h = h;
    if (!h->dots_sent) {
        req->phase = 0;
        readdir_next(req);
    } else {
        readdir_batch(req);
    }
}

/* ---- REALPATH and expand-path ---- */

static void step_realpath(struct sftp_req *req, ssize_t result);

/* A missing last component is fine, as with OpenSSH: resolve the parent, append the name. */
static void step_realpath_parent(struct sftp_req *req, ssize_t result)
{
    if (result < 0) {
        reply_uv(req, result);
    } else {
        const char *parent = req->fs.ptr;
        char joined[SFTP_PATH_BUF + 8];
        snprintf(joined, sizeof(joined), "%s%s%s", parent, strcmp(parent, "/") ? "/" : "", req->p2);
        reply_name1(req, joined);
    }
    req_finish(req);
}

static void step_realpath(struct sftp_req *req, ssize_t result)
{
    struct sftp_server *s = req->s;
    if (result == 0) {
        reply_name1(req, req->fs.ptr);
        req_finish(req);
        return;
    }
    if (result != UV_ENOENT || req->p2) {
        reply_uv(req, result);
        req_finish(req);
        return;
    }
    /* Split p1 (absolute) into parent and last name, ignoring trailing slashes. */
    char *p = req->p1;
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        p[--n] = '\0';
    char *slash = strrchr(p, '/');
    const char *last = slash + 1;
    if (!*last || !strcmp(last, ".") || !strcmp(last, "..") || !(req->p2 = strdup(last))) {
        reply_uv(req, result);
        req_finish(req);
        return;
    }
    if (slash == p)
        slash[1] = '\0';
    else
        *slash = '\0';
    uv_fs_t *fs = prep(req);
    go(req, fs, step_realpath_parent, uv_fs_realpath(s->loop, fs, p, on_fs));
}

static void step_readlink(struct sftp_req *req, ssize_t result)
{
    if (result < 0)
        reply_uv(req, result);
    else
        reply_name1(req, req->fs.ptr);
    req_finish(req);
}

/* ---- RENAME (fails when the target exists, as version 3 says) ---- */

enum { REN_LSTAT_OLD, REN_LINK, REN_UNLINK_OLD, REN_UNDO_LINK, REN_LSTAT_NEW, REN_RENAME };

static void step_rename(struct sftp_req *req, ssize_t result);

static void rename_call(struct sftp_req *req, int phase)
{
    uv_loop_t *loop = req->s->loop;
    uv_fs_t *fs = prep(req);
    int rc;
    req->phase = phase;
    switch (phase) {
    case REN_LINK:
        rc = uv_fs_link(loop, fs, req->p1, req->p2, on_fs);
        break;
    case REN_UNLINK_OLD:
        rc = uv_fs_unlink(loop, fs, req->p1, on_fs);
        break;
    case REN_UNDO_LINK:
        rc = uv_fs_unlink(loop, fs, req->p2, on_fs);
        break;
    case REN_LSTAT_NEW:
        rc = uv_fs_lstat(loop, fs, req->p2, on_fs);
        break;
    case REN_RENAME:
        rc = uv_fs_rename(loop, fs, req->p1, req->p2, on_fs);
        break;
    default:
        rc = uv_fs_lstat(loop, fs, req->p1, on_fs);
        break;
    }
    go(req, fs, step_rename, rc);
}

/*
 * A regular file is linked under the new name and then unlinked under the old, so an
 * existing target makes link fail with EEXIST, atomically. Where links are not possible
 * (other file types, filesystems without hard links) the target is checked with lstat and
 * then renamed: racy, like OpenSSH's fallback.
 */
static void step_rename(struct sftp_req *req, ssize_t result)
{
    switch (req->phase) {
    case REN_LSTAT_OLD:
        if (result < 0)
            break;
        rename_call(req, S_ISREG(req->fs.statbuf.st_mode) ? REN_LINK : REN_LSTAT_NEW);
        return;
    case REN_LINK:
        if (result == 0) {
            rename_call(req, REN_UNLINK_OLD);
            return;
        }
        if (result == UV_EPERM || result == UV_EXDEV || result == UV_ENOTSUP ||
            result == UV_ENOSYS || result == UV_EMLINK) {
            rename_call(req, REN_LSTAT_NEW);
            return;
        }
        break;
    case REN_UNLINK_OLD:
        if (result < 0) { /* leave no second name behind */
            req->err = (int)result;
            rename_call(req, REN_UNDO_LINK);
            return;
        }
        break;
    case REN_UNDO_LINK:
        result = req->err;
        break;
    case REN_LSTAT_NEW:
        if (result == 0) {
            result = UV_EEXIST;
            break;
        }
        if (result == UV_ENOENT) {
            rename_call(req, REN_RENAME);
            return;
        }
        break;
    default:
        break;
    }
    reply_uv(req, result);
    req_finish(req);
}

/* ---- extensions ---- */

static void step_statvfs(struct sftp_req *req, ssize_t result)
{
    if (result < 0) {
        reply_uv(req, result);
    } else {
        /* libuv's statfs lacks the fragment size, fsid, flags and name length: use the
         * block size and Linux's NAME_MAX, as most filesystems report. */
        const uv_statfs_t *f = req->fs.ptr;
        struct sftp_wire_statvfs v = {
            .bsize = f->f_bsize,
            .frsize = f->f_bsize,
            .blocks = f->f_blocks,
            .bfree = f->f_bfree,
            .bavail = f->f_bavail,
            .files = f->f_files,
            .ffree = f->f_ffree,
            .favail = f->f_ffree,
            .namemax = 255,
        };
        struct sftp_wire_out o;
        out_small(req, &o);
        reply_out(req, &o, sftp_wire_statvfs_reply(&o, req->m.id, &v));
    }
    req_finish(req);
}

static void op_limits(struct sftp_req *req)
{
    struct sftp_wire_out o;
    out_small(req, &o);
    reply_out(req, &o, sftp_wire_limits_reply(&o, req->m.id, SFTP_MAX_HANDLES));
    req_finish(req);
}

/* ---- dispatch ---- */

/* Requests on a handle: look it up now, when every earlier request has finished. */
static void op_handle(struct sftp_req *req)
{
    struct sftp_server *s = req->s;
    struct sftp_handle *h = handle_get(s, req->m.handle);
    uint8_t t = req->m.type;
    bool want_file = t == SSH_FXP_READ || t == SSH_FXP_WRITE || req->m.ext == SFTP_EXT_FSYNC;
    if (!h || (want_file && h->is_dir) || (t == SSH_FXP_READDIR && !h->is_dir)) {
        answer(req, SSH_FX_FAILURE, "invalid handle");
        return;
    }
    uv_fs_t *fs = prep(req);
    switch (t) {
    case SSH_FXP_CLOSE:
        op_close(req, h);
        return;
    case SSH_FXP_READ:
        op_read(req, h);
        return;
    case SSH_FXP_WRITE:
        op_write(req, h);
        return;
    case SSH_FXP_READDIR:
        op_readdir(req, h);
        return;
    case SSH_FXP_FSTAT:
        go(req, fs, step_attrs,
           h->is_dir ? uv_fs_stat(s->loop, fs, h->path, on_fs)
                     : uv_fs_fstat(s->loop, fs, h->fd, on_fs));
        return;
    case SSH_FXP_FSETSTAT:
        /* Borrowed for the descriptor (files); directories go by path. */
        if (h->is_dir) {
            req->path = h->path;
        } else {
            req->h = h;
        }
        req->phase = SET_OPEN;
        setstat_next(req);
        return;
    default: /* fsync@openssh.com */
        go(req, fs, step_status, uv_fs_fsync(s->loop, fs, h->fd, on_fs));
        return;
    }
}

static void op_extended(struct sftp_req *req)
{
    struct sftp_server *s = req->s;
    uv_fs_t *fs = prep(req);
    switch (req->m.ext) {
    case SFTP_EXT_POSIX_RENAME:
        go(req, fs, step_status, uv_fs_rename(s->loop, fs, req->p1, req->p2, on_fs));
        return;
    case SFTP_EXT_HARDLINK:
        go(req, fs, step_status, uv_fs_link(s->loop, fs, req->p1, req->p2, on_fs));
        return;
    case SFTP_EXT_STATVFS:
        go(req, fs, step_statvfs, uv_fs_statfs(s->loop, fs, req->p1, on_fs));
        return;
    case SFTP_EXT_EXPAND_PATH:
        go(req, fs, step_realpath, uv_fs_realpath(s->loop, fs, req->p1, on_fs));
        return;
    case SFTP_EXT_LIMITS:
        op_limits(req);
        return;
    case SFTP_EXT_FSYNC:
        op_handle(req);
        return;
    default:
        answer(req, SSH_FX_OP_UNSUPPORTED, "unsupported extension");
        return;
    }
}

static void req_start(struct sftp_req *req)
{
    struct sftp_server *s = req->s;
    const struct sftp_wire_request *m = &req->m;
    req->started = true;
    if (req->decode_rc == SFTP_WIRE_EINVAL) {
        answer(req, SSH_FX_BAD_MESSAGE, "path too long or not a string");
        return;
    }
    uv_fs_t *fs = prep(req);
    switch (m->type) {
    case SSH_FXP_INIT: {
        struct sftp_wire_out o;
        out_small(req, &o);
        reply_out(req, &o, sftp_wire_version(&o));
        req_finish(req);
        return;
    }
    case SSH_FXP_OPEN:
        op_open(req, false);
        return;
    case SSH_FXP_OPENDIR:
        op_open(req, true);
        return;
    case SSH_FXP_CLOSE:
    case SSH_FXP_READ:
    case SSH_FXP_WRITE:
    case SSH_FXP_FSTAT:
    case SSH_FXP_FSETSTAT:
    case SSH_FXP_READDIR:
        op_handle(req);
        return;
    case SSH_FXP_LSTAT:
        go(req, fs, step_attrs, uv_fs_lstat(s->loop, fs, req->path, on_fs));
        return;
    case SSH_FXP_STAT:
        go(req, fs, step_attrs, uv_fs_stat(s->loop, fs, req->path, on_fs));
        return;
    case SSH_FXP_SETSTAT:
        req->phase = SET_OPEN;
        setstat_next(req);
        return;
    case SSH_FXP_REMOVE:
        go(req, fs, step_status, uv_fs_unlink(s->loop, fs, req->path, on_fs));
        return;
    case SSH_FXP_MKDIR: {
        const struct sftp_wire_attrs *a = &m->attrs;
        int mode = a->flags & SSH_FILEXFER_ATTR_PERMISSIONS ? (int)(a->perm & 07777) : 0777;
        go(req, fs, step_status, uv_fs_mkdir(s->loop, fs, req->path, mode, on_fs));
        return;
    }
    case SSH_FXP_RMDIR:
        go(req, fs, step_status, uv_fs_rmdir(s->loop, fs, req->path, on_fs));
        return;
    case SSH_FXP_REALPATH:
        go(req, fs, step_realpath, uv_fs_realpath(s->loop, fs, req->path, on_fs));
        return;
    case SSH_FXP_RENAME:
        rename_call(req, REN_LSTAT_OLD);
        return;
    case SSH_FXP_READLINK:
        go(req, fs, step_readlink, uv_fs_readlink(s->loop, fs, req->path, on_fs));
        return;
    case SSH_FXP_SYMLINK:
        /* OpenSSH's order: the target first (kept as given), then the link to create. */
        go(req, fs, step_status, uv_fs_symlink(s->loop, fs, req->p1, req->p2, 0, on_fs));
        return;
    case SSH_FXP_EXTENDED:
        op_extended(req);
        return;
    default:
        answer(req, SSH_FX_OP_UNSUPPORTED, "unsupported request");
        return;
    }
}

/* ---- scheduling ---- */

/* Which requests may run side by side: READs with READs, and WRITEs to one handle. */
static enum sftp_par req_par(struct sftp_server *s, const struct sftp_req *req)
{
    if (req->decode_rc != SFTP_WIRE_OK)
        return PAR_NONE;
    if (req->m.type == SSH_FXP_READ)
        return PAR_READ;
    if (req->m.type == SSH_FXP_WRITE) {
        /* Appending writes land in arrival order only if they run one at a time. */
        const struct sftp_handle *h = handle_get(s, req->m.handle);
        return h && !h->is_dir && !h->append ? PAR_WRITE : PAR_NONE;
    }
    return PAR_NONE;
}

static bool writes_overlap(const struct sftp_req *a, const struct sftp_req *b)
{
    uint64_t a0 = a->m.offset, a1 = a0 + a->m.data.len;
    uint64_t b0 = b->m.offset, b1 = b0 + b->m.data.len;
    if (a1 < a0 || b1 < b0) /* wrapped: op_write refuses it, but be conservative */
        return true;
    return a0 < b1 && b0 < a1;
}

/*
 * Whether req may start now. Requests start in arrival order, so everything before req
 * has started: req starts if it is first, or if it may run beside each of them.
 */
static bool can_start(struct sftp_server *s, const struct sftp_req *req)
{
    if (req == s->head)
        return true;
    enum sftp_par par = req_par(s, req);
    if (par == PAR_NONE)
        return false;
    for (const struct sftp_req *r = s->head; r != req; r = r->next) {
        if (r->par != par)
            return false;
        if (par == PAR_WRITE && (memcmp(r->m.handle.p, req->m.handle.p, SFTP_HANDLE_LEN) != 0 ||
                                 writes_overlap(r, req)))
            return false;
    }
    return true;
}

static void pump(struct sftp_server *s)
{
    struct sftp_req *req = s->head;
    while (req && req->started)
        req = req->next;
    while (req && !s->closing && can_start(s, req)) {
        struct sftp_req *next = req->next;
        req->par = req_par(s, req);
        req_start(req); /* may answer at once and free req */
        req = next;
    }
}

/* ---- input ---- */

static struct sftp_req *req_new(struct sftp_server *s, uint32_t len)
{
    /* Only the struct is zeroed: the packet bytes are about to be written. */
    struct sftp_req *req = malloc(sizeof(*req) + len);
    if (req) {
        memset(req, 0, sizeof(*req));
        req->s = s;
        req->len = len;
        req->tmpfd = -1;
    }
    return req;
}

/* Makes the request's paths absolute (SYMLINK's target stays as given). */
static int resolve_paths(struct sftp_server *s, struct sftp_req *req)
{
    const struct sftp_wire_request *m = &req->m;
    bool one = false, two = false;
    switch (m->type) {
    case SSH_FXP_OPEN:
    case SSH_FXP_LSTAT:
    case SSH_FXP_STAT:
    case SSH_FXP_OPENDIR:
    case SSH_FXP_REMOVE:
    case SSH_FXP_RMDIR:
    case SSH_FXP_REALPATH:
    case SSH_FXP_READLINK:
    case SSH_FXP_SETSTAT:
    case SSH_FXP_MKDIR:
        one = true;
        req->p1 = resolve(s, m->path);
        break;
    case SSH_FXP_RENAME:
    case SSH_FXP_SYMLINK:
        one = two = true;
        req->p1 = m->type == SSH_FXP_SYMLINK ? str_dup(m->path) : resolve(s, m->path);
        req->p2 = resolve(s, m->path2);
        break;
    case SSH_FXP_EXTENDED:
        if (m->ext == SFTP_EXT_POSIX_RENAME || m->ext == SFTP_EXT_HARDLINK) {
            one = two = true;
            req->p1 = resolve(s, m->path);
            req->p2 = resolve(s, m->path2);
        } else if (m->ext == SFTP_EXT_STATVFS || m->ext == SFTP_EXT_EXPAND_PATH) {
            one = true;
            req->p1 = m->ext == SFTP_EXT_STATVFS ? resolve(s, m->path) : resolve_tilde(s, m->path);
        }
        break;
    default:
        break;
    }
    req->path = req->p1;
    return (one && !req->p1) || (two && !req->p2) ? -1 : 0;
}

/* Bytes a request holds: itself, its packet, its paths, and its largest reply. */
static size_t req_cost(const struct sftp_req *req)
{
    size_t c = sizeof(*req) + req->len;
    c += req->p1 ? strlen(req->p1) + 1 : 0;
    c += req->p2 ? strlen(req->p2) + 1 : 0;
    switch (req->m.type) {
    case SSH_FXP_READ:
        c += SFTP_WIRE_DATA_HEADER +
             (req->m.len < SFTP_WIRE_MAX_READ ? req->m.len : SFTP_WIRE_MAX_READ);
        break;
    case SSH_FXP_READDIR:
        c += SFTP_READDIR_REPLY_MAX;
        break;
    case SSH_FXP_REALPATH:
    case SSH_FXP_READLINK:
    case SSH_FXP_EXTENDED:
        c += SFTP_NAME1_REPLY_MAX;
        break;
    default:
        break;
    }
    return c;
}

/* A whole packet arrived: decode it and queue it, or fail the session. */
static void packet_complete(struct sftp_server *s, struct sftp_req *req)
{
    int rc = sftp_wire_decode(req->pkt, req->len, &req->m, NULL);
    if (rc == SFTP_WIRE_EMALFORMED) {
        free(req);
        fail(s, SFTP_E_MALFORMED);
        return;
    }
    /* INIT comes first and only once. */
    if ((req->m.type == SSH_FXP_INIT) == s->initialized) {
        free(req);
        fail(s, SFTP_E_PROTOCOL);
        return;
    }
    s->initialized = true;
    req->decode_rc = rc;
    if (rc == SFTP_WIRE_OK && resolve_paths(s, req) < 0) {
        req_free(req);
        fail(s, SFTP_E_NOMEM);
        return;
    }
    req->cost = req_cost(req);
    req->prev = s->tail;
    if (s->tail)
        s->tail->next = req;
    else
        s->head = req;
    s->tail = req;
    s->nreqs++;
    s->cost += req->cost;
}

size_t sftp_server_feed(struct sftp_server *s, const uint8_t *data, size_t len)
{
    size_t off = 0;
    bool queued = false;
    while (off < len && !s->error && !s->closing) {
        if (!s->cur) {
            /* Admission is decided between packets: a started packet is always finished. */
            if (s->hdr_have == 0 && !can_admit(s)) {
                s->input_blocked = true;
                break;
            }
            size_t k = 4 - s->hdr_have < len - off ? 4 - s->hdr_have : len - off;
            memcpy(s->hdr + s->hdr_have, data + off, k);
            s->hdr_have += k;
            off += k;
            if (s->hdr_have < 4)
                break;
            s->hdr_have = 0;
            uint32_t plen;
            if (sftp_wire_frame_length(s->hdr, &plen) != SFTP_WIRE_OK) {
                fail(s, SFTP_E_MALFORMED);
                break;
            }
            if (!(s->cur = req_new(s, plen))) { /* plen is bounded: checked just above */
                fail(s, SFTP_E_NOMEM);
                break;
            }
            s->cur_have = 0;
        }
        size_t need = s->cur->len - s->cur_have;
        size_t k = need < len - off ? need : len - off;
        memcpy(s->cur->pkt + s->cur_have, data + off, k);
        s->cur_have += k;
        off += k;
        if (s->cur_have == s->cur->len) {
            struct sftp_req *req = s->cur;
            s->cur = NULL;
            packet_complete(s, req);
            queued = true;
        }
    }
    if (queued || s->error)
        defer(s);
    return off;
}

/* ---- life cycle ---- */

struct sftp_server *sftp_server_new(uv_loop_t *loop, const char *home,
                                    const struct sftp_server_events *ev, void *ud)
{
    size_t hl = home ? strlen(home) : 0;
    if (hl == 0 || hl > SFTP_WIRE_MAX_PATH || home[0] != '/')
        return NULL;
    struct sftp_server *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    if (!(s->home = strdup(home))) {
        free(s);
        return NULL;
    }
    s->loop = loop;
    s->ev = *ev;
    s->ud = ud;
    chunkq_init(&s->out, 0);
    uv_idle_init(loop, &s->idle);
    s->idle.data = s;
    return s;
}

size_t sftp_server_pending(const struct sftp_server *s)
{
    return s->nreqs;
}

int sftp_server_error(const struct sftp_server *s)
{
    return s->error;
}

static void on_idle_closed(uv_handle_t *handle)
{
    struct sftp_server *s = handle->data;
    void (*done)(void *) = s->ev.done;
    void *ud = s->ud;
    chunkq_free(&s->out);
    free(s->home);
    free(s);
    if (done)
        done(ud);
}

static void on_handle_closed(uv_fs_t *fs)
{
    struct sftp_handle *h = fs->data;
    struct sftp_server *s = h->s;
    handle_free(h);
    s->closes_pending--;
    teardown(s);
}

static void handle_close_async(struct sftp_server *s, struct sftp_handle *h)
{
    uv_fs_req_cleanup(&h->fs);
    h->s = s;
    h->fs.data = h;
    int rc = h->is_dir ? uv_fs_closedir(s->loop, &h->fs, h->dir, on_handle_closed)
                       : uv_fs_close(s->loop, &h->fs, h->fd, on_handle_closed);
    if (rc == 0) {
        s->closes_pending++;
        return;
    }
    /* Could not queue it: close here rather than leak the descriptor. */
    if (h->is_dir)
        uv_fs_closedir(s->loop, &h->fs, h->dir, NULL);
    else
        uv_fs_close(s->loop, &h->fs, h->fd, NULL);
    handle_free(h);
}

/* Closing, step by step: running requests end, then handles close, then the idle handle. */
static void teardown(struct sftp_server *s)
{
    if (s->nreqs > 0 || uv_is_closing((uv_handle_t *)&s->idle))
        return;
    if (!s->handles_closing) {
        s->handles_closing = true;
        for (uint32_t slot = 0; slot < SFTP_MAX_HANDLES; slot++) {
            struct sftp_handle *h = s->handles[slot];
            if (!h)
                continue;
            s->handles[slot] = NULL;
            s->nhandles--;
            handle_close_async(s, h);
        }
    }
    if (s->closes_pending > 0)
        return;
    uv_idle_stop(&s->idle);
    uv_close((uv_handle_t *)&s->idle, on_idle_closed);
}

void sftp_server_close(struct sftp_server *s)
{
    if (s->closing)
        return;
    s->closing = true;
    free(s->cur);
    s->cur = NULL;
    struct sftp_req *next;
    for (struct sftp_req *req = s->head; req; req = next) {
        next = req->next;
        if (!req->started || req->answered) {
            req_release(s, req);
        } else if (req->inflight && req->inflight->fs_type != UV_FS_CLOSE &&
                   req->inflight->fs_type != UV_FS_CLOSEDIR) {
            /* Not yet picked up by a pool thread: its step sees UV_ECANCELED. Closes are
             * never cancelled, so no descriptor is lost. */
            uv_cancel((uv_req_t *)req->inflight);
        }
    }
    uv_idle_start(&s->idle, on_idle);
}
