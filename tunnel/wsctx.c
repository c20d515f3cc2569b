#include "wsctx.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "log.h"
#include "wsc.h"

/*
 * lws's own keepalive ("validity") cannot be switched off; set it as far out as it goes:
 * the mux runs the tunnel's keepalive, and it confirms validity on every frame received.
 */
static const lws_retry_bo_t no_lws_keepalive = {
    .secs_since_valid_ping = 65535,
    .secs_since_valid_hangup = 65535,
};

static const struct lws_protocols client_protocols[] = {
    WSC_PROTOCOL,
    {NULL, NULL, 0, 0, 0, NULL, 0},
};

/* libwebsockets' own messages (TLS verification failures, mostly) go through our logger. */
static void emit_lws_log(int level, const char *line)
{
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    log_msg(level == LLL_ERR ? LOG_WARN : LOG_DEBUG, "libwebsockets: %.*s", (int)n, line);
}

int wsctx_create(struct wsctx *w, const struct wsctx_config *cfg, char *err, size_t errlen)
{
    memset(w, 0, sizeof(*w));
    /*
     * libwebsockets opens /dev/urandom when its context is created, and when that fails its
     * cleanup runs the libuv loop it has not set up yet: the process crashes (lws 4.1.6).
     * Container runtimes give every image /dev/urandom, but a bare chroot may lack it.
     */
    if (access(WSCTX_RANDOM_DEVICE, R_OK) != 0) {
        snprintf(err, errlen,
                 "cannot read %s (%s): libwebsockets needs it; give the workspace a /dev "
                 "with it, as container runtimes do",
                 WSCTX_RANDOM_DEVICE, strerror(errno));
        return -1;
    }
    /* TETHER_LWS_LOG=<lws log bitmask> shows more of libwebsockets' own log, for debugging. */
    const char *lws_log = getenv("TETHER_LWS_LOG");
    lws_set_log_level(lws_log ? atoi(lws_log) : LLL_ERR, emit_lws_log);
    w->foreign_loops[0] = cfg->loop;

    struct lws_context_creation_info info;
    memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT |
                   LWS_SERVER_OPTION_EXPLICIT_VHOSTS;
    info.foreign_loops = w->foreign_loops;
    info.pcontext = &w->ctx;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.retry_and_idle_policy = &no_lws_keepalive;
    /* Every socket read lands here first: 4 KiB (lws's default) means a syscall per 4 KiB. */
    info.pt_serv_buf_size = WSCTX_READ_BUF;
    /* Request headers of modest size: a bearer token, and a /pty URI whose command may take
     * 4096 bytes (PROTOCOL.md §14.7; lws keeps the URI decoded). lws 4.1 reads this limit
     * from the context only: on a vhost's info it is ignored. */
    info.max_http_header_data = WSCTX_MAX_HEADER_DATA;
    /*
     * lws stops accepting (it turns its listen sockets' POLLIN off) when its own descriptors
     * reach fd_limit_per_thread. That must leave room below the process's limit for the
     * others (the loop's, log files, --on-idle's pipes): else accept fails with EMFILE,
     * which lws retries at once and logs each time (measured: a busy loop writing 10 MB of
     * log a second). So the process's soft limit goes WSCTX_FD_RESERVE above lws's table;
     * where the hard limit forbids that, lws's table shrinks instead (lws then looks
     * descriptors up more slowly, acceptable at such small limits).
     */
    struct rlimit nofile;
    bool raise_after = false;
    if (cfg->max_connections) {
        /* Below the descriptor limit, lws finds a descriptor's connection by a scan of its
         * table instead of indexing it by number: a few entries cost nothing to scan. */
        info.fd_limit_per_thread = cfg->max_connections;
    } else if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY) {
        if (nofile.rlim_max == RLIM_INFINITY ||
            nofile.rlim_max >= nofile.rlim_cur + WSCTX_FD_RESERVE) {
            info.fd_limit_per_thread = (unsigned)nofile.rlim_cur;
            raise_after = true;
        } else if (nofile.rlim_cur > 2 * WSCTX_FD_RESERVE) {
            info.fd_limit_per_thread = (unsigned)nofile.rlim_cur - WSCTX_FD_RESERVE;
        }
    }
    w->ctx = lws_create_context(&info);
    if (!w->ctx) {
        snprintf(err, errlen,
                 "cannot start libwebsockets on libuv (is libwebsockets-evlib-uv installed?)");
        return -1;
    }
    if (raise_after) {
        nofile.rlim_cur += WSCTX_FD_RESERVE;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }

    /* Client vhost: dials out, verifying servers against ca_file or the system bundle. */
    struct lws_context_creation_info ci;
    memset(&ci, 0, sizeof(ci));
    ci.vhost_name = "client";
    ci.port = CONTEXT_PORT_NO_LISTEN;
    ci.protocols = client_protocols;
    ci.retry_and_idle_policy = &no_lws_keepalive;
    /* The CAs (the system's bundle: about 140 certificates, 90 ms of CPU to load) only for
     * a process that dials wss://: plain ws:// needs no TLS context at all. */
    if (cfg->tls) {
        ci.options = LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
        if (cfg->ca_file)
            ci.client_ssl_ca_filepath = cfg->ca_file;
        else if (access(WSCTX_SYSTEM_CA_FILE, R_OK) == 0)
            ci.client_ssl_ca_filepath = WSCTX_SYSTEM_CA_FILE;
    }
    w->client_vhost = lws_create_vhost(w->ctx, &ci);
    if (!w->client_vhost) {
        snprintf(err, errlen, "cannot set up outgoing connections%s%s",
                 cfg->ca_file ? ": check --ca-file " : "", cfg->ca_file ? cfg->ca_file : "");
        return -1;
    }

    if (cfg->server) {
        const struct wsctx_server *s = cfg->server;
        struct lws_context_creation_info si;
        memset(&si, 0, sizeof(si));
        si.vhost_name = "relay";
        si.port = s->listen_port;
        si.iface = s->listen_host;
        si.protocols = s->protocols;
        si.user = s->user;
        si.retry_and_idle_policy = &no_lws_keepalive;
        si.ssl_cert_filepath = s->tls_cert;
        si.ssl_private_key_filepath = s->tls_key;
        if (s->tls_cert)
            si.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
        w->server_vhost = lws_create_vhost(w->ctx, &si);
        if (!w->server_vhost) {
            snprintf(err, errlen, "cannot listen on %s:%d (address in use, or bad TLS files?)",
                     s->listen_host ? s->listen_host : "*", s->listen_port);
            return -1;
        }
    }
    return 0;
}

int wsctx_listen_port(const struct wsctx *w)
{
    return w->server_vhost ? lws_get_vhost_listen_port(w->server_vhost) : -1;
}

void wsctx_stop(struct wsctx *w)
{
    if (w->ctx)
        lws_context_destroy(w->ctx);
}

int wsctx_finish(struct wsctx *w, uv_loop_t *loop)
{
    if (w->ctx)
        lws_context_destroy(w->ctx);
    uv_run(loop, UV_RUN_NOWAIT);
    return uv_loop_close(loop);
}

#define WSCTX_WRITE_CLOSE 4

void wsctx_close_ws(struct lws *wsi, int code, const char *reason)
{
    uint8_t frame[LWS_PRE + 125];
    size_t n = reason ? strlen(reason) : 0;
    if (n > 123) /* a close frame's payload is at most 125 bytes, 2 of them the code */
        n = 123;
    frame[LWS_PRE] = (uint8_t)(code >> 8);
    frame[LWS_PRE + 1] = (uint8_t)code;
    memcpy(frame + LWS_PRE + 2, reason, n);
    /* Opcode 4 is lws's internal LWS_WRITE_CLOSE, kept out of the public header. */
    lws_write(wsi, frame + LWS_PRE, n + 2, (enum lws_write_protocol)WSCTX_WRITE_CLOSE);
    lws_set_timeout(wsi, PENDING_TIMEOUT_CLOSE_ACK, WSCTX_CLOSE_WAIT_S);
}

void wsctx_confirm_valid(struct lws *wsi, uint64_t now_ms, uint64_t *last_ms)
{
    if (*last_ms && now_ms - *last_ms < WSCTX_VALIDITY_CONFIRM_MS)
        return;
    *last_ms = now_ms;
    lws_validity_confirmed(wsi);
}

void wsctx_kill(struct lws *wsi)
{
    lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    lws_cancel_service(lws_get_context(wsi));
}
