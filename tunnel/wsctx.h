/*
 * wsctx: the one libwebsockets context of a process, running on the process's libuv loop.
 *
 * It has a client vhost (for dialing out: the agent's tunnel, the CLI tools) and optionally
 * a listening server vhost (the relay). Teardown follows PITFALLS.md: wsctx_stop from a uv
 * callback, let uv_run return, then wsctx_finish.
 */
#ifndef TETHER_WSCTX_H
#define TETHER_WSCTX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>
#include <libwebsockets.h>

struct wsctx_server {
    const struct lws_protocols *protocols; /* terminated by a zeroed entry */
    const char *listen_host;               /* numeric address to bind, NULL = all */
    int listen_port;                       /* 0 = pick a free port (see wsctx_listen_port) */
    const char *tls_cert;                  /* PEM files, both or neither */
    const char *tls_key;
    void *user; /* lws_vhost_user() in the callbacks */
};

struct wsctx_config {
    uv_loop_t *loop;
    const char *ca_file;               /* CAs that client connections trust; NULL = system */
    bool tls;                          /* client connections use TLS (wss://): load the CAs */
    const struct wsctx_server *server; /* NULL for a process that only dials out */
    /*
     * Connections lws holds at once, for a process that makes only a few (the agent's
     * tunnel, attach, ssh-proxy): lws's descriptor tables then have this many entries, not
     * one per possible descriptor (16,384 of them are 256 KiB, all resident). 0 = one
     * per descriptor the process may open, for the relay and `tether forward`.
     */
    unsigned max_connections;
};

/* max_connections for a process with one websocket at a time (and its replacement). */
#define WSCTX_FEW_CONNECTIONS 8

struct wsctx {
    struct lws_context *ctx; /* NULL once destruction finished */
    struct lws_vhost *client_vhost;
    struct lws_vhost *server_vhost;
    void *foreign_loops[1];
};

/*
 * Closes a websocket politely: sends the close frame (code and reason) now, and drops the
 * connection if the peer has not answered with its own close within WSCTX_CLOSE_WAIT_S.
 * Call it from a WRITEABLE callback and return 0. (Returning -1 after lws_close_reason
 * does not do on the libuv loop: lws 4.1 then closes the socket a second time at once,
 * "uv repeat test", and the close frame never leaves.)
 */
#define WSCTX_CLOSE_WAIT_S 2
void wsctx_close_ws(struct lws *wsi, int code, const char *reason);

/*
 * Drops a connection as soon as possible, from anywhere (a uv callback included). lws 4.1
 * on libuv re-arms its timer only after it services an event, so a kill scheduled from
 * outside lws would wait for some unrelated timer (measured: 20-30 s); waking the service
 * makes it immediate.
 */
void wsctx_kill(struct lws *wsi);

/*
 * Tells lws that wsi's peer is alive (a frame arrived), at most once per
 * WSCTX_VALIDITY_CONFIRM_MS: lws's own validity timers are set 65535 s out (the tunnel
 * has its keepalive), and each confirmation re-sorts lws's timer list, which cost a relay
 * with 500 agents a fifth of its CPU when done on every message. *last_ms is the caller's.
 */
#define WSCTX_VALIDITY_CONFIRM_MS 60000u
void wsctx_confirm_valid(struct lws *wsi, uint64_t now_ms, uint64_t *last_ms);

/*
 * The size of lws's per-thread read buffer: the most one socket read returns. lws zeroes
 * it, so it is resident from the start. 64 KiB against 256 KiB: 188 KiB less RssAnon in
 * every process, and SSH through relay and agent no slower (256 MiB each way, 6 runs of
 * each, alternating: up 247-347 vs 276-388 MiB/s, down 271-408 vs 313-440).
 */
#define WSCTX_READ_BUF (64u * 1024)
/* The most bytes of one request's headers lws keeps (decoded URI included); a request with
 * more is dropped without an answer. */
#define WSCTX_MAX_HEADER_DATA 16384
/* Descriptors of the process's limit kept for others than libwebsockets'. */
#define WSCTX_FD_RESERVE 32

/* The system's CA bundle used when no --ca-file is given. */
#define WSCTX_SYSTEM_CA_FILE "/etc/ssl/certs/ca-certificates.crt"
/* libwebsockets reads its random bytes from here (it refuses to start without it). */
#define WSCTX_RANDOM_DEVICE "/dev/urandom"

/* Returns 0, or -1 with one line in err. */
int wsctx_create(struct wsctx *w, const struct wsctx_config *cfg, char *err, size_t errlen);
/* The port the server vhost listens on (useful after asking for port 0). */
int wsctx_listen_port(const struct wsctx *w);
/* Starts destruction; call from a uv callback, not from inside an lws callback. */
void wsctx_stop(struct wsctx *w);
/* After uv_run returned: frees what is left and closes the loop. Returns uv_loop_close's rc. */
int wsctx_finish(struct wsctx *w, uv_loop_t *loop);

#endif
