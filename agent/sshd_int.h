/*
 * sshd_int: what the SSH server's two halves share: sshd.c (host key, connections, the
 * libssh pump) and ssh_session.c (session channels and their processes). Not for use
 * outside the SSH server.
 *
 * Re-entrancy rule: libssh calls our callbacks only from inside ssh_conn_pump (key
 * exchange and ssh_event_dopoll). Those callbacks change state and never free anything;
 * what ended is freed in ssh_conn_after_io, which runs after every pump and after every
 * libssh call made from a uv callback.
 */
#ifndef TETHER_SSHD_INT_H
#define TETHER_SSHD_INT_H

#include <stdbool.h>

#include <libssh/callbacks.h>
#include <libssh/libssh.h>
#include <libssh/server.h>
#include <uv.h>

#include "gate.h"
#include "pty/proc.h"
#include "sftp.h"
#include "sshd.h"

/* Limits per connection and per session channel. */
#define SSHD_MAX_CHANNELS 64    /* session channels open at once on one connection */
#define SSHD_MAX_ENV 64         /* variables a client may set on one channel */
#define SSHD_MAX_ENV_BYTES 4096 /* name=value of one variable */
#define SSHD_PUMP_ROUNDS 64     /* ssh_event_dopoll calls per wake-up (4 KiB read each) */
#define SSHD_MOTD_MAX 16384     /* bytes of /etc/motd shown */

struct sshd_user {
    char *name, *home, *shell;
};

struct sshd {
    uv_loop_t *loop;
    const struct sshd_config *cfg;
    const char *const *env_allow;
    ssh_bind bind;
    struct sshd_user user;
    struct proc_reaper reaper;
    int child_oom_adj;
    json_t *manifest; /* the relay's last manifest, or NULL */
    struct activity *activity;
    struct gate *gate;      /* sessions wait while it is closed; NULL: never */
    char *const *extra_env; /* after the manifest's: "NAME=value" or "NAME" (unset) */
    uv_poll_t *listen_poll;
    int listen_fd; /* the local listener, -1 without one */
    int listen_port;
    struct ssh_conn *conns;
    unsigned unauthenticated;      /* local connections whose login grace timer runs */
    bool refusing_unauthenticated; /* the last local connection was refused for it */
    unsigned sessions[SSHD_TYPE_COUNT];
    uv_timer_t grace; /* sshd_free: children had SIGHUP; SIGKILL for those still there */
    uint64_t grace_deadline;
    bool freeing;
    void (*done)(void *);
    void *done_arg;
};

/*
 * Client input taken from libssh and not yet written to the child: at most this much.
 * libssh 0.10 holds at most about 1.9 MB per channel (its window, 1,280,000 bytes, plus
 * half of it), and the buffer is pulled empty in one read (see flush_input).
 */
#define SSHD_STDIN_MAX (4u * 1024 * 1024)
#define SSHD_READ_MAX 32768                  /* one read of a child's output */
#define SSHD_READ_BURST 8                    /* reads of a child's output per wake-up */
#define SSHD_SOCKETPAIR_BUFFER (1024 * 1024) /* SO_SNDBUF asked for a tunnel stream's pair */

/* One descriptor of a session's process, watched on the loop. */
struct chan_fd {
    uv_poll_t poll;
    int fd;     /* -1 once closed */
    int events; /* what the poll is started with */
    bool is_stderr;
    struct ssh_chan *ch;
};

enum chan_state {
    CHAN_SETUP,      /* requests (pty, env) may arrive; nothing runs yet */
    CHAN_CONNECTING, /* a socket channel whose connect is still in progress */
    CHAN_OPENING,    /* a socket channel we asked the client for, not confirmed yet */
    CHAN_WAITING,    /* shell, exec or subsystem accepted; it waits for the gate to open */
    CHAN_RUNNING,    /* a process runs, or its output is still draining */
    CHAN_DONE,       /* exit status sent and the channel closed, or the client closed it */
};

struct ssh_chan {
    struct ssh_conn *conn;
    struct ssh_chan *next;
    ssh_channel channel; /* NULL once freed */
    struct ssh_channel_callbacks_struct cb;
    enum chan_state state;
    enum sshd_session_type type;
    bool counted;                /* in sshd's sessions[type] */
    bool is_socket;              /* a forward: out is a connected socket, both directions */
    struct sftp_server *sftp;    /* the built-in sftp subsystem, instead of a process */
    struct ssh_reverse *reverse; /* CHAN_OPENING: what we asked the client for */
    bool eof_sent;               /* socket: its end of file was passed to the client */
    /* Set up by requests before the process starts. */
    bool pty;
    char term[64];
    unsigned short rows, cols, xpixels, ypixels;
    char *env[SSHD_MAX_ENV]; /* "NAME=value", allowed names only */
    unsigned nenv;
    bool motd_pending;
    /* CHAN_WAITING: what to start once the gate opens. */
    struct gate_waiter wait;
    enum { DEFER_SHELL, DEFER_EXEC, DEFER_SUBSYSTEM } deferred;
    char *deferred_command; /* DEFER_EXEC */
    bool notice_pending;    /* interactive: say why nothing happens yet */
    /* The process: out is the PTY master (both directions) or the stdout pipe. */
    pid_t pid;
    bool exited;
    int wait_status;
    struct chan_fd out, err, in;
    unsigned open_handles;
    /* Client to child: bytes taken from libssh, and bytes libssh holds that we declined. */
    uint8_t *in_buf; /* allocated while input waits; freed when it is written */
    size_t in_cap, in_off, in_len;
    size_t leftover;
    bool eof_from_client;
    bool closed_by_client; /* socket: deliver what libssh holds, then end */
    bool freeing;
};

#define SSHD_MAX_LISTENERS 16 /* ssh -R listeners per connection */

/* A socket in the workspace that the client asked for: ssh -R, or its forwarded agent. */
struct ssh_listener {
    struct ssh_listener *next;
    struct ssh_conn *conn;
    uv_poll_t poll;
    int fd;
    bool is_agent;
    char addr[256]; /* -R: the address the client asked for (named in each channel open) */
    int req_port;   /* -R: the port it asked for (0: any), to match cancel requests */
    int port;       /* -R: the port bound */
    char path[108]; /* agent: the socket's path, in a private directory */
};

/* What a channel we open toward the client asks for: ssh -R's forwarded-tcpip, or the
 * forwarded agent. */
struct ssh_reverse {
    bool is_agent;
    char addr[256]; /* the listener's address and port, as the client asked for them */
    int port;
    char origin[64]; /* who connected */
    int origin_port;
};

struct ssh_conn {
    struct sshd *d;
    struct ssh_conn *next;
    ssh_session session;
    ssh_event event;
    struct ssh_server_callbacks_struct server_cb;
    uv_poll_t poll;
    int poll_fd; /* a duplicate: libssh closes its own fd on errors */
    int poll_events;
    bool kex_done;
    uv_timer_t login_timer; /* runs until the client authenticates (login grace time) */
    bool login_pending;     /* the timer runs: counted in sshd's unauthenticated */
    bool local;             /* from the local listener: public-key auth required */
    bool dead;              /* the SSH connection is over: tear down */
    bool closing;           /* teardown started */
    int in_io;              /* nesting depth of our own calls into libssh */
    unsigned refs;          /* the poll handle + every channel object still alive */
    struct ssh_chan *chans;
    unsigned nchans;
    struct ssh_listener *listeners;
    unsigned nlisteners;
    const char *agent_sock; /* SSH_AUTH_SOCK for sessions, once the client forwards one */
};

/* Starts an SSH connection on fd (owned from now on, also on failure). 0 or -errno. */
int ssh_conn_start(struct sshd *d, int fd, bool local);
/* Drives libssh after a readiness event on the connection's socket. */
void ssh_conn_pump(struct ssh_conn *c);
/* Frees what ended and re-arms the socket's poll; call after any libssh call. */
void ssh_conn_after_io(struct ssh_conn *c);
/* A channel object went away. */
void ssh_conn_unref(struct ssh_conn *c);
/* The client authenticated: its login grace timer stops. */
void ssh_conn_authenticated(struct ssh_conn *c);

/* ssh_session.c: a new session channel for libssh's channel-open callback (NULL = refuse). */
ssh_channel ssh_chan_open(struct ssh_conn *c);
/*
 * Joins an open libssh channel to a stream socket (fd, non-blocking, owned from now on,
 * also on failure). connecting: fd's connect is still in progress. Returns 0 or -1.
 */
int ssh_chan_attach_socket(struct ssh_conn *c, ssh_channel channel, int fd, bool connecting);

/* ssh_listen.c: the local listener and public-key auth. */
#define SSHD_AUTHORIZED_KEYS_MAX (256u * 1024) /* bytes of an authorized_keys file read */
int ssh_listen_start(struct sshd *d, char *err, size_t errlen);
/* A non-blocking listening TCP socket on sa; *bound gets its port. fd or -errno. */
int ssh_tcp_listen(const struct sockaddr_storage *sa, socklen_t len, int *bound);
void ssh_listen_stop(struct sshd *d);
int ssh_auth_pubkey(ssh_session s, const char *user, struct ssh_key_struct *key, char state,
                    void *ud);

/*
 * Asks the client for a channel for the accepted socket fd (owned from now on, also on
 * failure), as r says (copied). The channel carries bytes once the client confirms it; data
 * the client sends before that waits in libssh. Returns 0 or -1.
 */
int ssh_chan_open_reverse(struct ssh_conn *c, int fd, const struct ssh_reverse *r);

/* ssh_forward.c: libssh's message callback: direct-tcpip channels (-L, -D), tcpip-forward
 * and cancel-tcpip-forward (-R). */
int ssh_forward_message(ssh_session session, ssh_message msg, void *ud);
/* Starts the agent-forwarding socket of a connection (auth-agent-req). 0 or -1. */
int ssh_forward_agent(struct ssh_conn *c);
/* Closes every listener of a connection that ends. */
void ssh_forward_close_all(struct ssh_conn *c);
/* Resumes the channel's I/O that waited on the SSH side (window, pending writes). */
void ssh_chan_service(struct ssh_chan *ch);
/* True once the channel has finished and may be freed (ssh_chan_free). */
bool ssh_chan_finished(const struct ssh_chan *ch);
/* Unlinks the channel from its connection, hangs up (SIGHUP to its process group), frees
 * the libssh channel, and frees itself once its handles are closed (then ssh_conn_unref). */
void ssh_chan_free(struct ssh_chan *ch);

#endif
