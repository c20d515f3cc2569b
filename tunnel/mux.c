/*
 * mux.c: the tunnel's stream multiplexer (the contract is in mux.h).
 *
 * State at a glance:
 *  - Streams live in a chained hash table keyed by id. Ids are chosen by the peer and may
 *    jump, so the table uses a multiplicative hash rather than the low bits.
 *  - Streams that have DATA or a FIN to send sit on a round-robin "ready" list.
 *  - Control frames wait fully encoded on a FIFO. CREDIT is the exception: its entry only
 *    names the stream, and the frame is built from the stream's current limit when it is
 *    written, so one pending entry per stream always carries the newest offset.
 *  - The input side parses complete frames in the caller's buffer and copies only a partial
 *    frame's bytes: first the header, then (once it validated) the payload.
 */
#include "tunnel/mux.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * A send queue whose storage grew beyond QUEUE_KEEP keeps it while the stream is busy and
 * gives it back at the first mux_tick that finds it drained and unused since the tick before
 * (idle memory). Freeing it at every drain cost a stream in full flow an mmap, a page fault
 * per 4 KiB and a munmap per batch: a third of the agent's CPU in a forward's download.
 */
#define QUEUE_KEEP (16u * 1024)
#define QUEUE_MIN (4u * 1024)
/* An input buffer larger than this (or our max_frame_payload) is freed after its frame. */
#define INBUF_KEEP (PROTO_DEFAULT_FRAME_PAYLOAD)
#define HASH_MIN_BITS 4
#define HASH_MAX_BITS 30
#define CREDIT_FRAME_SIZE (PROTO_HEADER_SIZE + 8u)
#define PING_FRAME_SIZE (PROTO_HEADER_SIZE + PROTO_PING_SIZE)

enum stream_state {
    ST_OPENING,   /* ours: OPEN sent, no answer yet; DATA may be queued but is not sent */
    ST_ACCEPTING, /* the peer's: OPEN received, not answered yet */
    ST_OPEN,
};

struct stream {
    uint32_t id;
    enum stream_state state;
    bool ours;
    bool fin_queued;     /* mux_stream_shutdown was called */
    bool fin_sent;       /* our FIN went into an output batch */
    bool fin_recv;       /* the peer's FIN arrived */
    bool credit_pending; /* a CREDIT entry for this stream is on the control queue */
    bool ready;          /* on the ready list */
    void *ud;
    struct stream *hnext;         /* hash chain */
    struct stream *rprev, *rnext; /* ready list; rnext also links streams being closed */
    /* Sending. Invariant: tx_sent + qlen <= tx_limit (we never queue beyond credit). */
    uint64_t tx_sent, tx_limit;
    uint8_t *q;
    size_t qhead, qlen, qcap;
    bool q_used;     /* the queue was appended to or reserved since the last mux_tick */
    size_t reserved; /* what the last mux_stream_reserve offered, until its commit */
    /* Receiving: rx_limit is the offset we granted, rx_drained what the owner consumed. */
    uint64_t rx_recv, rx_drained, rx_limit;
};

struct ctl_frame {
    struct ctl_frame *next;
    uint32_t credit_stream; /* non-zero: a CREDIT placeholder, bytes[] unused */
    size_t len;
    uint8_t bytes[];
};

/* A frame split across mux_feed calls: hlen < 12 while the header is incomplete. */
struct input {
    uint8_t hdr[PROTO_HEADER_SIZE];
    size_t hlen;
    struct proto_header h;
    uint8_t *buf;
    size_t cap, plen;
};

struct mux {
    struct mux_config cfg;
    struct mux_callbacks cb;
    void *ud;
    struct proto_hello peer;
    bool peer_hello, goaway_sent, goaway_recv;
    bool dead; /* a connection error of the peer's: nothing more is parsed */
    bool gone; /* mux_fail_all ran: the connection is over */

    struct stream **buckets;
    unsigned hbits;
    size_t n_local, n_remote; /* streams we opened / the peer opened, in the table */
    uint64_t next_id;         /* next id we open (u64: exhaustion is visible) */
    uint32_t local_max;       /* highest id we opened, 0 if none */
    uint32_t remote_max;      /* highest id the peer opened, 0 if none */
    struct stream *ready_head, *ready_tail;

    struct ctl_frame *ctl_head, *ctl_tail;
    size_t ctl_bytes;

    struct input in;

    uint64_t last_rx_ms, ping_sent_ms, now_ms;
    bool ping_out;
    int64_t rtt_ms;
    bool queues_parked; /* some drained queue may hold more than QUEUE_KEEP */
};

/* ---- helpers ---- */

static void notify(struct mux *m)
{
    if (m->cb.want_write)
        m->cb.want_write(m->ud);
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* PING payloads carry our clock as a u64, the same big-endian layout as a CREDIT offset. */
static uint64_t get64(const uint8_t *p)
{
    uint64_t v;
    proto_credit_decode(p, 8, &v);
    return v;
}

/* The agent opens odd ids, the relay even ones. */
static bool is_local_id(const struct mux *m, uint32_t id)
{
    return (id & 1u) == (m->cfg.role == MUX_ROLE_AGENT ? 1u : 0u);
}

/* ---- stream table ---- */

static size_t slot(unsigned bits, uint32_t id)
{
    return (size_t)((uint32_t)(id * 2654435761u) >> (32 - bits));
}

static struct stream *find(const struct mux *m, uint32_t id)
{
    struct stream *s = m->buckets[slot(m->hbits, id)];
    while (s && s->id != id)
        s = s->hnext;
    return s;
}

static void table_grow(struct mux *m)
{
    unsigned bits = m->hbits + 1;
    struct stream **nb = calloc((size_t)1 << bits, sizeof(*nb));
    if (!nb)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < ((size_t)1 << m->hbits); i++) {
        struct stream *s = m->buckets[i], *next;
        for (; s; s = next) {
            next = s->hnext;
            size_t j = slot(bits, s->id);
            s->hnext = nb[j];
            nb[j] = s;
        }
    }
    free(m->buckets);
    m->buckets = nb;
    m->hbits = bits;
}

static void table_unlink(struct mux *m, struct stream *s)
{
    struct stream **pp = &m->buckets[slot(m->hbits, s->id)];
    while (*pp != s)
        pp = &(*pp)->hnext;
    *pp = s->hnext;
    if (s->ours)
        m->n_local--;
    else
        m->n_remote--;
}

static void ready_append(struct mux *m, struct stream *s)
{
    s->ready = true;
    s->rnext = NULL;
    s->rprev = m->ready_tail;
    if (m->ready_tail)
        m->ready_tail->rnext = s;
    else
        m->ready_head = s;
    m->ready_tail = s;
}

static void ready_remove(struct mux *m, struct stream *s)
{
    if (!s->ready)
        return;
    if (s->rprev)
        s->rprev->rnext = s->rnext;
    else
        m->ready_head = s->rnext;
    if (s->rnext)
        s->rnext->rprev = s->rprev;
    else
        m->ready_tail = s->rprev;
    s->ready = false;
    s->rprev = s->rnext = NULL;
}

static bool has_output(const struct stream *s)
{
    return s->state == ST_OPEN && !s->fin_sent && (s->qlen > 0 || s->fin_queued);
}

static void ready_update(struct mux *m, struct stream *s)
{
    if (!s->ready && has_output(s)) {
        ready_append(m, s);
        notify(m);
    }
}

static struct stream *stream_new(struct mux *m, uint32_t id, bool ours, void *ud)
{
    struct stream *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->id = id;
    s->ours = ours;
    s->ud = ud;
    s->state = ours ? ST_OPENING : ST_ACCEPTING;
    s->tx_limit = m->peer.initial_window;
    s->rx_limit = m->cfg.local.initial_window;
    size_t n = m->n_local + m->n_remote;
    if (n >= ((size_t)1 << m->hbits) && m->hbits < HASH_MAX_BITS)
        table_grow(m);
    size_t j = slot(m->hbits, id);
    s->hnext = m->buckets[j];
    m->buckets[j] = s;
    if (ours)
        m->n_local++;
    else
        m->n_remote++;
    return s;
}

static void stream_free(struct stream *s)
{
    free(s->q);
    free(s);
}

/* Takes the stream out of the table and the ready list and frees it. */
static void stream_drop(struct mux *m, struct stream *s)
{
    ready_remove(m, s);
    table_unlink(m, s);
    stream_free(s);
}

/* Removes the stream, then tells the owner: callbacks never see a half-removed stream. */
static void stream_close(struct mux *m, struct stream *s, uint32_t code, const char *text,
                         size_t text_len)
{
    uint32_t id = s->id;
    void *ud = s->ud;
    stream_drop(m, s);
    if (m->cb.stream_closed)
        m->cb.stream_closed(m->ud, id, ud, code, text, text_len);
}

/* ---- send queue: a ring buffer, so draining part of it never moves bytes ---- */

static void queue_read(const struct stream *s, uint8_t *out, size_t n)
{
    size_t first = min_size(n, s->qcap - s->qhead);
    memcpy(out, s->q + s->qhead, first);
    memcpy(out + first, s->q, n - first);
}

/* Makes room for n more bytes in the queue's storage (doubling it), keeping what is queued. */
static int queue_reserve(struct stream *s, size_t n)
{
    s->q_used = true;
    if (s->qcap - s->qlen >= n)
        return 0;
    size_t cap = s->qcap ? s->qcap : QUEUE_MIN;
    while (cap < s->qlen + n)
        cap *= 2;
    uint8_t *q = malloc(cap);
    if (!q)
        return MUX_E_NOMEM;
    if (s->qlen)
        queue_read(s, q, s->qlen);
    free(s->q);
    s->q = q;
    s->qcap = cap;
    s->qhead = 0;
    return 0;
}

static int queue_append(struct stream *s, const uint8_t *data, size_t n)
{
    if (queue_reserve(s, n) < 0)
        return MUX_E_NOMEM;
    size_t tail = (s->qhead + s->qlen) % s->qcap;
    size_t first = min_size(n, s->qcap - tail);
    memcpy(s->q + tail, data, first);
    memcpy(s->q, data + first, n - first);
    s->qlen += n;
    return 0;
}

static void queue_consume(struct mux *m, struct stream *s, size_t n)
{
    s->qlen -= n;
    s->tx_sent += n;
    if (s->qlen > 0) {
        s->qhead = (s->qhead + n) % s->qcap;
        return;
    }
    s->qhead = 0;
    if (s->qcap > QUEUE_KEEP)
        m->queues_parked = true; /* mux_tick gives it back unless it is used again */
}

/* At each tick: frees the storage of drained queues that nothing was added to since the
 * previous tick; a queue in use only has its mark cleared. */
static void release_idle_queues(struct mux *m)
{
    if (!m->queues_parked)
        return;
    bool parked = false;
    for (size_t j = 0; j < (size_t)1 << m->hbits; j++) {
        for (struct stream *s = m->buckets[j]; s; s = s->hnext) {
            if (s->qlen > 0 || s->qcap <= QUEUE_KEEP)
                continue;
            if (s->q_used) {
                s->q_used = false;
                parked = true;
                continue;
            }
            free(s->q);
            s->q = NULL;
            s->qcap = 0;
        }
    }
    m->queues_parked = parked;
}

/* What mux_stream_send may take: credit left minus what is queued, while we may send. */
static uint64_t room_of(const struct stream *s)
{
    if (s->fin_queued || s->state == ST_ACCEPTING)
        return 0;
    return s->tx_limit - s->tx_sent - s->qlen;
}

/* ---- control queue ---- */

static void ctl_append(struct mux *m, struct ctl_frame *f)
{
    f->next = NULL;
    if (m->ctl_tail)
        m->ctl_tail->next = f;
    else
        m->ctl_head = f;
    m->ctl_tail = f;
    m->ctl_bytes += f->len;
    notify(m);
}

static struct ctl_frame *ctl_push(struct mux *m, uint8_t type, uint32_t stream,
                                  const uint8_t *payload, size_t len)
{
    struct ctl_frame *f = malloc(sizeof(*f) + PROTO_HEADER_SIZE + len);
    if (!f)
        return NULL;
    f->credit_stream = 0;
    f->len = PROTO_HEADER_SIZE + len;
    proto_header_encode(f->bytes, type, 0, stream, (uint32_t)len);
    if (len)
        memcpy(f->bytes + PROTO_HEADER_SIZE, payload, len);
    ctl_append(m, f);
    return f;
}

static int queue_reason(struct mux *m, uint8_t type, uint32_t id, uint32_t code, const char *text)
{
    uint8_t p[PROTO_REASON_MAX];
    size_t n = proto_reason_encode(code, text, p);
    return ctl_push(m, type, id, p, n) ? 0 : MUX_E_NOMEM;
}

/* GOAWAY goes at most once per connection (PROTOCOL.md section 8). */
static int queue_goaway(struct mux *m, uint32_t code, const char *text)
{
    if (m->goaway_sent)
        return 0;
    uint8_t p[PROTO_GOAWAY_MAX];
    size_t n = proto_goaway_encode(m->remote_max, code, text, p);
    m->goaway_sent = true;
    return ctl_push(m, PROTO_GOAWAY, 0, p, n) ? 0 : MUX_E_NOMEM;
}

/* At most one CREDIT entry per stream: a later grant only raises rx_limit. */
static bool queue_credit(struct mux *m, struct stream *s)
{
    if (s->credit_pending)
        return true;
    struct ctl_frame *f = malloc(sizeof(*f));
    if (!f)
        return false;
    f->credit_stream = s->id;
    f->len = CREDIT_FRAME_SIZE;
    ctl_append(m, f);
    s->credit_pending = true;
    return true;
}

static void queue_ping(struct mux *m, uint8_t type, const uint8_t payload[PROTO_PING_SIZE])
{
    ctl_push(m, type, 0, payload, PROTO_PING_SIZE);
}

/* ---- errors ---- */

/* The peer broke the connection's rules: GOAWAY, and nothing more is parsed. */
static int conn_error(struct mux *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int conn_error(struct mux *m, const char *fmt, ...)
{
    char text[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    queue_goaway(m, PROTO_CODE_PROTOCOL, text);
    m->dead = true;
    return MUX_E_PROTOCOL;
}

static int header_error(struct mux *m, int rc, const struct proto_header *h)
{
    const char *name = proto_type_name(h->type);
    switch (rc) {
    case PROTO_E_VERSION:
        return conn_error(m, "protocol version %u", h->version);
    case PROTO_E_TYPE:
        return conn_error(m, "unknown frame type %u", h->type);
    case PROTO_E_FLAGS:
        return conn_error(m, "undefined flags 0x%x on %s", h->flags, name);
    case PROTO_E_STREAM:
        return conn_error(m, "%s frame on stream %u", name, h->stream);
    case PROTO_E_LENGTH:
        if (h->type == PROTO_DATA)
            return conn_error(m, "frame length %u over limit %u", h->length,
                              m->cfg.local.max_frame_payload);
        return conn_error(m, "%s frame length %u invalid", name, h->length);
    default:
        return conn_error(m, "bad frame header: %s", proto_strerror(rc));
    }
}

/* A fault of the peer's confined to one stream: RST it and tell the owner. */
static int stream_fault(struct mux *m, struct stream *s, uint32_t code, const char *text)
{
    queue_reason(m, PROTO_RST, s->id, code, text);
    stream_close(m, s, code, text, strlen(text));
    return 0;
}

/* ---- frames from the peer: streams ---- */

static int on_data(struct mux *m, struct stream *s, const struct proto_header *h, const uint8_t *p)
{
    if (s->state != ST_OPEN)
        return stream_fault(m, s, PROTO_CODE_PROTOCOL, "DATA before OPEN_OK");
    if (s->fin_recv)
        return stream_fault(m, s, PROTO_CODE_PROTOCOL, "DATA after FIN");
    if (h->length > s->rx_limit - s->rx_recv)
        return stream_fault(m, s, PROTO_CODE_FLOW, "DATA beyond credit");
    uint32_t id = s->id;
    bool fin = h->flags & PROTO_FLAG_FIN;
    s->rx_recv += h->length;
    s->fin_recv = fin;
    /* Each callback may reset the stream: look it up again after each. */
    if (h->length > 0 && m->cb.stream_data)
        m->cb.stream_data(m->ud, id, s->ud, p, h->length);
    if (!fin || !(s = find(m, id)))
        return 0;
    if (m->cb.stream_fin)
        m->cb.stream_fin(m->ud, id, s->ud);
    if ((s = find(m, id)) && s->fin_sent)
        stream_close(m, s, 0, NULL, 0);
    return 0;
}

static int on_credit(struct mux *m, struct stream *s, const uint8_t *p)
{
    uint64_t off = get64(p);
    if (off < s->tx_limit)
        return stream_fault(m, s, PROTO_CODE_FLOW, "credit went backwards");
    if (off - s->tx_sent > PROTO_MAX_WINDOW)
        return stream_fault(m, s, PROTO_CODE_FLOW, "credit beyond the maximum window");
    bool was_full = room_of(s) == 0;
    s->tx_limit = off;
    if (was_full && room_of(s) > 0 && m->cb.stream_writable)
        m->cb.stream_writable(m->ud, s->id, s->ud);
    return 0;
}

static int on_rst(struct mux *m, struct stream *s, const struct proto_header *h, const uint8_t *p)
{
    struct proto_reason r;
    if (proto_reason_decode(p, h->length, &r) < 0)
        return conn_error(m, "malformed RST on stream %u", h->stream);
    /* Code 0 would read as a normal end to the owner. */
    stream_close(m, s, r.code ? r.code : PROTO_CODE_PROTOCOL, r.text, r.text_len);
    return 0;
}

static int on_open_answer(struct mux *m, struct stream *s, const struct proto_header *h,
                          const uint8_t *p)
{
    const char *name = proto_type_name(h->type);
    if (!s->ours || s->state != ST_OPENING)
        return conn_error(m, "%s for stream %u which is not awaiting one", name, s->id);
    uint32_t id = s->id;
    if (h->type == PROTO_OPEN_FAIL) {
        struct proto_reason r;
        if (proto_reason_decode(p, h->length, &r) < 0)
            return conn_error(m, "malformed OPEN_FAIL on stream %u", id);
        /* Code 0 would read as success to the owner. */
        uint32_t code = r.code ? r.code : PROTO_CODE_PROTOCOL;
        void *ud = s->ud;
        stream_drop(m, s);
        if (m->cb.stream_open_result)
            m->cb.stream_open_result(m->ud, id, ud, code, r.text, r.text_len);
        return 0;
    }
    s->state = ST_OPEN;
    ready_update(m, s); /* DATA queued before OPEN_OK may go now */
    if (m->cb.stream_open_result)
        m->cb.stream_open_result(m->ud, id, s->ud, 0, NULL, 0);
    if ((s = find(m, id)) && room_of(s) > 0 && m->cb.stream_writable)
        m->cb.stream_writable(m->ud, id, s->ud);
    return 0;
}

/* Answers an OPEN without allocating anything for it. */
static int refuse(struct mux *m, uint32_t id, uint32_t code, const char *text)
{
    queue_reason(m, PROTO_OPEN_FAIL, id, code, text);
    return 0;
}

static int on_open(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    uint32_t id = h->stream;
    if (is_local_id(m, id))
        return conn_error(m, "OPEN of stream %u: wrong parity", id);
    if (id <= m->remote_max)
        return conn_error(m, "OPEN of stream %u: not above %u", id, m->remote_max);
    m->remote_max = id;
    struct proto_open o;
    int rc = proto_open_decode(p, h->length, &o);
    if (rc < 0 && rc != PROTO_E_KIND)
        return conn_error(m, "malformed OPEN of stream %u", id);
    if (m->goaway_sent || m->gone)
        return refuse(m, id, PROTO_CODE_SHUTDOWN, "shutting down");
    if (rc == PROTO_E_KIND || !m->cb.stream_opened)
        return refuse(m, id, PROTO_CODE_UNSUPPORTED, "unsupported stream kind");
    if (m->n_remote >= m->cfg.local.max_streams)
        return refuse(m, id, PROTO_CODE_STREAM_LIMIT, "too many streams");
    if (!stream_new(m, id, false, NULL))
        return refuse(m, id, PROTO_CODE_INTERNAL, "out of memory");
    m->cb.stream_opened(m->ud, id, &o);
    return 0;
}

/*
 * A frame for an id not in the table. Ids are never reused, so an id at or below the
 * highest one opened with its parity belongs to a stream that has ended: its late frames
 * are dropped. A higher id was never opened.
 */
static int on_unknown_stream(struct mux *m, const struct proto_header *h)
{
    const char *name = proto_type_name(h->type);
    bool local = is_local_id(m, h->stream);
    bool answer = h->type == PROTO_OPEN_OK || h->type == PROTO_OPEN_FAIL;
    if (answer && !local)
        return conn_error(m, "%s for stream %u which the peer opened", name, h->stream);
    if (h->stream <= (local ? m->local_max : m->remote_max))
        return 0;
    return conn_error(m, "%s for stream %u which was never opened", name, h->stream);
}

static int on_stream_frame(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    if (h->type == PROTO_OPEN)
        return on_open(m, h, p);
    struct stream *s = find(m, h->stream);
    if (!s)
        return on_unknown_stream(m, h);
    switch (h->type) {
    case PROTO_DATA:
        return on_data(m, s, h, p);
    case PROTO_CREDIT:
        return on_credit(m, s, p);
    case PROTO_RST:
        return on_rst(m, s, h, p);
    default:
        return on_open_answer(m, s, h, p);
    }
}

/* ---- frames from the peer: session ---- */

static int on_hello(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    if (m->peer_hello)
        return conn_error(m, "second HELLO");
    if (proto_hello_decode(p, h->length, &m->peer) < 0)
        return conn_error(m, "HELLO with an invalid setting");
    m->peer_hello = true;
    if (m->cb.hello)
        m->cb.hello(m->ud, &m->peer);
    return 0;
}

static int on_ping(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    if (h->type == PROTO_PING) {
        /* Answering is a courtesy: a peer that does not read loses its PONGs. */
        if (m->ctl_bytes + PING_FRAME_SIZE <= m->cfg.max_control_queue)
            queue_ping(m, PROTO_PONG, p);
        return 0;
    }
    if (m->ping_out && get64(p) == m->ping_sent_ms) {
        m->ping_out = false;
        m->rtt_ms = (int64_t)(m->now_ms - m->ping_sent_ms);
    }
    return 0;
}

static int on_goaway(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    struct proto_reason r;
    if (proto_goaway_decode(p, h->length, &r) < 0)
        return conn_error(m, "malformed GOAWAY");
    if (m->goaway_recv)
        return 0; /* a second GOAWAY is ignored */
    m->goaway_recv = true;
    if (m->cb.goaway)
        m->cb.goaway(m->ud, r.code, r.text, r.text_len);
    return 0;
}

static int on_control(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    json_t *msg;
    char err[160];
    if (proto_control_parse(p, h->length, &msg, err, sizeof(err)) < 0)
        return conn_error(m, "bad control message: %s", err);
    if (m->cb.control)
        m->cb.control(m->ud, msg);
    json_decref(msg);
    return 0;
}

static int on_session_frame(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    switch (h->type) {
    case PROTO_HELLO:
        return on_hello(m, h, p);
    case PROTO_PING:
    case PROTO_PONG:
        return on_ping(m, h, p);
    case PROTO_GOAWAY:
        return on_goaway(m, h, p);
    default:
        return on_control(m, h, p);
    }
}

static int process_frame(struct mux *m, const struct proto_header *h, const uint8_t *p)
{
    if (!m->peer_hello && h->type != PROTO_HELLO)
        return conn_error(m, "%s frame before HELLO", proto_type_name(h->type));
    int rc = h->stream == 0 ? on_session_frame(m, h, p) : on_stream_frame(m, h, p);
    /* We may exceed the cap for frames the protocol requires; twice it means a deaf peer. */
    if (rc == 0 && m->ctl_bytes > 2 * m->cfg.max_control_queue)
        return conn_error(m, "peer is not reading: %zu bytes of control frames queued",
                          m->ctl_bytes);
    return rc;
}

/* ---- input ---- */

static void input_trim(struct mux *m)
{
    if (m->dead || (m->in.cap > INBUF_KEEP && m->in.cap > m->cfg.local.max_frame_payload)) {
        free(m->in.buf);
        m->in.buf = NULL;
        m->in.cap = 0;
    }
}

/* Buffers a partial frame. The payload buffer is sized only after the header validated. */
static int feed_buffered(struct mux *m, const uint8_t *data, size_t len, size_t *used)
{
    struct input *in = &m->in;
    size_t n = 0;
    if (in->hlen < PROTO_HEADER_SIZE) {
        n = min_size(PROTO_HEADER_SIZE - in->hlen, len);
        memcpy(in->hdr + in->hlen, data, n);
        in->hlen += n;
        *used = n;
        if (in->hlen < PROTO_HEADER_SIZE)
            return 0;
        int rc =
            proto_header_decode(in->hdr, PROTO_HEADER_SIZE, m->cfg.local.max_frame_payload, &in->h);
        if (rc < 0)
            return header_error(m, rc, &in->h);
        if (in->h.length > in->cap) {
            uint8_t *b = realloc(in->buf, in->h.length);
            if (!b) {
                queue_goaway(m, PROTO_CODE_INTERNAL, "out of memory");
                m->dead = true;
                return MUX_E_NOMEM;
            }
            in->buf = b;
            in->cap = in->h.length;
        }
        in->plen = 0;
    }
    size_t take = min_size(in->h.length - in->plen, len - n);
    if (take)
        memcpy(in->buf + in->plen, data + n, take);
    in->plen += take;
    *used = n + take;
    if (in->plen < in->h.length)
        return 0;
    struct proto_header h = in->h;
    in->hlen = 0;
    int rc = process_frame(m, &h, in->buf);
    input_trim(m);
    return rc;
}

/* Processes a frame that lies whole in the caller's buffer without copying it. */
static int feed_direct(struct mux *m, const uint8_t *data, size_t len, size_t *used)
{
    struct proto_header h;
    if (len < PROTO_HEADER_SIZE)
        return feed_buffered(m, data, len, used);
    int rc = proto_header_decode(data, len, m->cfg.local.max_frame_payload, &h);
    if (rc < 0)
        return header_error(m, rc, &h);
    if (len - PROTO_HEADER_SIZE < h.length)
        return feed_buffered(m, data, len, used);
    *used = PROTO_HEADER_SIZE + h.length;
    return process_frame(m, &h, data + PROTO_HEADER_SIZE);
}

int mux_feed(struct mux *m, const uint8_t *data, size_t len, uint64_t now_ms)
{
    if (m->dead)
        return MUX_E_PROTOCOL;
    m->now_ms = now_ms;
    if (len > 0)
        m->last_rx_ms = now_ms;
    while (len > 0) {
        size_t used = 0;
        int rc =
            m->in.hlen == 0 ? feed_direct(m, data, len, &used) : feed_buffered(m, data, len, &used);
        if (rc < 0)
            return rc;
        data += used;
        len -= used;
    }
    return 0;
}

int mux_message_end(struct mux *m)
{
    if (m->dead)
        return MUX_E_PROTOCOL;
    if (m->in.hlen > 0)
        return conn_error(m, "frame spans websocket messages");
    return 0;
}

/* ---- output ---- */

static size_t write_credit(struct mux *m, uint32_t id, uint8_t *out)
{
    struct stream *s = find(m, id);
    if (!s || !s->credit_pending)
        return 0; /* the stream ended meanwhile */
    s->credit_pending = false;
    proto_header_encode(out, PROTO_CREDIT, 0, id, 8);
    proto_credit_encode(s->rx_limit, out + PROTO_HEADER_SIZE);
    return CREDIT_FRAME_SIZE;
}

static size_t out_control(struct mux *m, uint8_t *buf, size_t cap)
{
    size_t n = 0;
    struct ctl_frame *f;
    while ((f = m->ctl_head) && f->len <= cap - n) {
        if (f->credit_stream) {
            n += write_credit(m, f->credit_stream, buf + n);
        } else {
            memcpy(buf + n, f->bytes, f->len);
            n += f->len;
        }
        m->ctl_head = f->next;
        if (!m->ctl_head)
            m->ctl_tail = NULL;
        m->ctl_bytes -= f->len;
        free(f);
    }
    return n;
}

/* One DATA frame: as much as the peer's frame limit and the space allow; FIN on the last. */
static size_t write_data(struct mux *m, struct stream *s, uint8_t *out, size_t space)
{
    size_t k = min_size(s->qlen, m->peer.max_frame_payload);
    k = min_size(k, space - PROTO_HEADER_SIZE);
    bool fin = s->fin_queued && k == s->qlen;
    proto_header_encode(out, PROTO_DATA, fin ? PROTO_FLAG_FIN : 0, s->id, (uint32_t)k);
    if (k)
        queue_read(s, out + PROTO_HEADER_SIZE, k);
    queue_consume(m, s, k);
    s->fin_sent = fin;
    return PROTO_HEADER_SIZE + k;
}

/*
 * DATA round-robin: one frame per ready stream per turn. Streams whose FIN went out after
 * the peer's arrived are finished; they are detached here and collected in *done, so that
 * their stream_closed callbacks run after the batch is complete.
 */
static size_t out_data(struct mux *m, uint8_t *buf, size_t cap, struct stream **done)
{
    size_t n = 0;
    struct stream *s;
    while ((s = m->ready_head) && cap - n > PROTO_HEADER_SIZE) {
        ready_remove(m, s);
        n += write_data(m, s, buf + n, cap - n);
        if (has_output(s)) {
            ready_append(m, s);
        } else if (s->fin_sent && s->fin_recv) {
            table_unlink(m, s);
            s->rnext = *done;
            *done = s;
        }
    }
    return n;
}

size_t mux_output(struct mux *m, uint8_t *buf, size_t cap)
{
    struct stream *done = NULL;
    size_t n = out_control(m, buf, cap);
    /* DATA waits while any control frame does: an OPEN_OK must precede its stream's DATA. */
    if (!m->ctl_head && !m->dead)
        n += out_data(m, buf + n, cap - n, &done);
    while (done) {
        struct stream *s = done;
        done = s->rnext;
        uint32_t id = s->id;
        void *ud = s->ud;
        stream_free(s);
        if (m->cb.stream_closed)
            m->cb.stream_closed(m->ud, id, ud, 0, NULL, 0);
    }
    return n;
}

bool mux_wants_output(const struct mux *m)
{
    return m->ctl_head || (!m->dead && m->ready_head);
}

/* ---- keepalive ---- */

/* An unanswered PING counts as outstanding for keepalive_timeout_ms, then another may go. */
static bool ping_pending(const struct mux *m, uint64_t now_ms)
{
    return m->ping_out && now_ms - m->ping_sent_ms < m->cfg.keepalive_timeout_ms;
}

int mux_tick(struct mux *m, uint64_t now_ms)
{
    release_idle_queues(m);
    uint64_t idle = now_ms > m->last_rx_ms ? now_ms - m->last_rx_ms : 0;
    if (idle >= m->cfg.keepalive_timeout_ms)
        return MUX_E_TIMEOUT;
    if (idle >= m->cfg.keepalive_idle_ms && !ping_pending(m, now_ms)) {
        uint8_t p[PROTO_PING_SIZE];
        proto_credit_encode(now_ms, p);
        queue_ping(m, PROTO_PING, p);
        m->ping_out = true;
        m->ping_sent_ms = now_ms;
    }
    return 0;
}

uint64_t mux_next_tick_ms(const struct mux *m, uint64_t now_ms)
{
    uint64_t due = m->last_rx_ms + m->cfg.keepalive_timeout_ms;
    uint64_t ping = m->last_rx_ms + m->cfg.keepalive_idle_ms;
    if (m->ping_out && ping < m->ping_sent_ms + m->cfg.keepalive_timeout_ms)
        ping = m->ping_sent_ms + m->cfg.keepalive_timeout_ms;
    if (ping < due)
        due = ping;
    return due > now_ms ? due - now_ms : 1;
}

int64_t mux_rtt_ms(const struct mux *m)
{
    return m->rtt_ms;
}

/* ---- lifecycle ---- */

void mux_config_default(struct mux_config *cfg, enum mux_role role)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->role = role;
    proto_hello_default(&cfg->local);
    cfg->keepalive_idle_ms = MUX_KEEPALIVE_IDLE_MS;
    cfg->keepalive_timeout_ms = MUX_KEEPALIVE_TIMEOUT_MS;
    cfg->max_control_queue = MUX_MAX_CONTROL_QUEUE;
}

struct mux *mux_new(const struct mux_config *cfg, const struct mux_callbacks *cb, void *ud,
                    uint64_t now_ms)
{
    struct mux *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->cfg = *cfg;
    if (cb)
        m->cb = *cb;
    m->ud = ud;
    proto_hello_default(&m->peer);
    m->hbits = HASH_MIN_BITS;
    m->buckets = calloc((size_t)1 << m->hbits, sizeof(*m->buckets));
    m->next_id = cfg->role == MUX_ROLE_AGENT ? 1 : 2;
    m->last_rx_ms = m->now_ms = now_ms;
    m->rtt_ms = -1;
    uint8_t hello[PROTO_HELLO_SIZE];
    size_t n = proto_hello_encode(&cfg->local, hello);
    if (!m->buckets || !ctl_push(m, PROTO_HELLO, 0, hello, n)) {
        mux_free(m);
        return NULL;
    }
    return m;
}

void mux_free(struct mux *m)
{
    if (!m)
        return;
    for (size_t i = 0; m->buckets && i < ((size_t)1 << m->hbits); i++) {
        struct stream *s = m->buckets[i], *next;
        for (; s; s = next) {
            next = s->hnext;
            stream_free(s);
        }
    }
    free(m->buckets);
    while (m->ctl_head) {
        struct ctl_frame *f = m->ctl_head;
        m->ctl_head = f->next;
        free(f);
    }
    free(m->in.buf);
    free(m);
}

/* ---- streams: the owner's side ---- */

int mux_stream_open(struct mux *m, const struct proto_open *open, void *stream_ud, uint32_t *id)
{
    if (mux_is_closing(m))
        return MUX_E_CLOSED;
    if (!m->peer_hello)
        return MUX_E_NOTREADY;
    if (m->n_local >= m->peer.max_streams || m->next_id > UINT32_MAX)
        return MUX_E_LIMIT;
    uint8_t p[PROTO_MAX_OPEN];
    int n = proto_open_encode(open, p, sizeof(p));
    if (n < 0)
        return n;
    struct stream *s = stream_new(m, (uint32_t)m->next_id, true, stream_ud);
    if (!s)
        return MUX_E_NOMEM;
    if (!ctl_push(m, PROTO_OPEN, s->id, p, (size_t)n)) {
        stream_drop(m, s);
        return MUX_E_NOMEM;
    }
    m->local_max = s->id;
    m->next_id += 2;
    *id = s->id;
    return 0;
}

static struct stream *find_accepting(struct mux *m, uint32_t id)
{
    struct stream *s = find(m, id);
    return s && s->state == ST_ACCEPTING ? s : NULL;
}

int mux_stream_accept(struct mux *m, uint32_t id, void *stream_ud)
{
    struct stream *s = find_accepting(m, id);
    if (!s)
        return MUX_E_NOSTREAM;
    if (!ctl_push(m, PROTO_OPEN_OK, id, NULL, 0))
        return MUX_E_NOMEM;
    s->state = ST_OPEN;
    s->ud = stream_ud;
    return 0;
}

int mux_stream_reject(struct mux *m, uint32_t id, uint32_t code, const char *text)
{
    struct stream *s = find_accepting(m, id);
    if (!s)
        return MUX_E_NOSTREAM;
    /* OPEN_FAIL with code 0 would read as success. */
    int rc = queue_reason(m, PROTO_OPEN_FAIL, id, code ? code : PROTO_CODE_REFUSED, text);
    if (rc == 0)
        stream_drop(m, s);
    return rc;
}

int mux_stream_reset(struct mux *m, uint32_t id, uint32_t code, const char *text)
{
    struct stream *s = find(m, id);
    if (!s)
        return MUX_E_NOSTREAM;
    int rc = queue_reason(m, PROTO_RST, id, code ? code : PROTO_CODE_CANCEL, text);
    /*
     * Forgotten either way: the owner may free what stream_ud points to. A RST that could
     * not be queued leaves the peer out of step, so the connection ends: mux_feed fails
     * from now on, and the transport closes.
     */
    stream_drop(m, s);
    if (rc < 0)
        m->dead = true;
    return rc;
}

void mux_stream_set_user(struct mux *m, uint32_t id, void *stream_ud)
{
    struct stream *s = find(m, id);
    if (s)
        s->ud = stream_ud;
}

size_t mux_stream_room(const struct mux *m, uint32_t id)
{
    const struct stream *s = find(m, id);
    return s ? (size_t)room_of(s) : 0;
}

/* The stream that send, reserve and commit may queue on, or why not (a MUX_E_* code). */
static int sendable(struct mux *m, uint32_t id, struct stream **out)
{
    struct stream *s = find(m, id);
    if (!s || s->state == ST_ACCEPTING || s->fin_queued)
        return MUX_E_NOSTREAM;
    if (m->dead)
        return MUX_E_CLOSED;
    *out = s;
    return 0;
}

int mux_stream_send(struct mux *m, uint32_t id, const uint8_t *data, size_t len)
{
    struct stream *s;
    int rc = sendable(m, id, &s);
    if (rc < 0)
        return rc;
    size_t n = min_size(len, (size_t)room_of(s));
    n = min_size(n, INT_MAX);
    if (n == 0)
        return 0;
    if (queue_append(s, data, n) < 0)
        return MUX_E_NOMEM;
    ready_update(m, s);
    return (int)n;
}

int mux_stream_reserve(struct mux *m, uint32_t id, size_t want, uint8_t **space)
{
    *space = NULL;
    struct stream *s;
    int rc = sendable(m, id, &s);
    if (rc < 0)
        return rc;
    size_t n = min_size(want, (size_t)room_of(s));
    n = min_size(n, INT_MAX);
    if (n == 0)
        return 0;
    /* The free storage, unless it is too small to be worth a read; else grow by doubling
     * at most, so that a few bytes read into a big buffer keep a small queue. */
    size_t free_space = s->qcap - s->qlen;
    if (free_space >= min_size(n, QUEUE_MIN))
        n = min_size(n, free_space);
    else
        n = min_size(n, s->qcap ? s->qcap : QUEUE_MIN);
    if (queue_reserve(s, n) < 0)
        return MUX_E_NOMEM;
    size_t tail = (s->qhead + s->qlen) % s->qcap;
    /* Free storage runs from the tail to the head when the queue wraps, else to the end. */
    size_t end = s->qlen > 0 && tail <= s->qhead ? s->qhead : s->qcap;
    *space = s->q + tail;
    s->reserved = min_size(n, end - tail);
    return (int)s->reserved;
}

int mux_stream_commit(struct mux *m, uint32_t id, size_t n)
{
    struct stream *s;
    int rc = sendable(m, id, &s);
    if (rc < 0)
        return rc;
    size_t offered = s->reserved;
    s->reserved = 0;
    if (n == 0)
        return 0;
    if (n > offered)
        return MUX_E_INVALID; /* more than mux_stream_reserve offered, or no reserve */
    s->qlen += n;
    ready_update(m, s);
    return (int)n;
}

int mux_stream_shutdown(struct mux *m, uint32_t id)
{
    struct stream *s = find(m, id);
    if (!s || s->state == ST_ACCEPTING)
        return MUX_E_NOSTREAM;
    s->fin_queued = true;
    ready_update(m, s);
    return 0;
}

void mux_stream_consumed(struct mux *m, uint32_t id, size_t n)
{
    struct stream *s = find(m, id);
    if (!s)
        return;
    /* The owner cannot drain more than arrived; clamping keeps credit within the window. */
    s->rx_drained += min_size(n, (size_t)(s->rx_recv - s->rx_drained));
    uint64_t w = m->cfg.local.initial_window;
    if (s->fin_recv || s->rx_drained - (s->rx_limit - w) < w / 2)
        return;
    if (queue_credit(m, s)) /* out of memory: the next call tries again */
        s->rx_limit = s->rx_drained + w;
}

size_t mux_stream_queued(const struct mux *m, uint32_t id)
{
    const struct stream *s = find(m, id);
    return s ? s->qlen : 0;
}

size_t mux_stream_queue_storage(const struct mux *m, uint32_t id)
{
    const struct stream *s = find(m, id);
    return s ? s->qcap : 0;
}

/* ---- session ---- */

int mux_send_control(struct mux *m, const json_t *msg)
{
    if (m->dead)
        return MUX_E_CLOSED;
    int rc = proto_control_validate(msg, NULL, 0);
    if (rc < 0)
        return rc;
    char *text = json_dumps(msg, JSON_COMPACT);
    if (!text)
        return MUX_E_NOMEM;
    size_t len = strlen(text);
    if (len > PROTO_MAX_CONTROL)
        rc = PROTO_E_LENGTH;
    else if (m->ctl_bytes + PROTO_HEADER_SIZE + len > m->cfg.max_control_queue)
        rc = MUX_E_FULL;
    else if (!ctl_push(m, PROTO_CONTROL, 0, (const uint8_t *)text, len))
        rc = MUX_E_NOMEM;
    free(text);
    return rc;
}

int mux_goaway(struct mux *m, uint32_t code, const char *text)
{
    if (m->dead)
        return MUX_E_CLOSED;
    return queue_goaway(m, code, text);
}

void mux_fail_all(struct mux *m, uint32_t code, const char *text)
{
    /* Detach everything first: callbacks then find no stream of this batch in the table. */
    struct stream *list = NULL;
    for (size_t i = 0; i < ((size_t)1 << m->hbits); i++) {
        struct stream *s = m->buckets[i], *next;
        m->buckets[i] = NULL;
        for (; s; s = next) {
            next = s->hnext;
            s->rnext = list;
            list = s;
        }
    }
    m->n_local = m->n_remote = 0;
    m->ready_head = m->ready_tail = NULL;
    m->gone = true;
    size_t text_len = text ? strlen(text) : 0;
    while (list) {
        struct stream *s = list;
        list = s->rnext;
        uint32_t id = s->id;
        void *ud = s->ud;
        stream_free(s);
        if (m->cb.stream_closed)
            m->cb.stream_closed(m->ud, id, ud, code, text, text_len);
    }
}

size_t mux_control_queued(const struct mux *m)
{
    return m->ctl_bytes;
}

size_t mux_stream_count(const struct mux *m)
{
    return m->n_local + m->n_remote;
}

bool mux_is_closing(const struct mux *m)
{
    return m->dead || m->gone || m->goaway_sent || m->goaway_recv;
}

bool mux_peer_hello_received(const struct mux *m)
{
    return m->peer_hello;
}

const struct proto_hello *mux_peer_limits(const struct mux *m)
{
    return &m->peer;
}
