/*
 * sshd: the agent's SSH server, on libssh in server mode, driven non-blocking from the
 * libuv loop.
 *
 * Each tunnel stream of kind ssh becomes one SSH connection: a socketpair joins the stream
 * (pumped by portfwd, like a TCP forward) to a libssh session. The relay authenticated the
 * user who opened the stream, so these sessions accept the SSH "none" method and nothing
 * else is asked. Session channels run shells, commands and subsystems (sftp) as children of
 * the agent, on pipes or on a PTY.
 *
 * The host key (ed25519) is created once in the state directory, so known_hosts entries
 * stay valid across restarts.
 *
 * An optional local listener serves SSH on a TCP port of the workspace itself; those
 * connections must authenticate with a public key from the authorized keys (never "none",
 * never a password).
 */
#ifndef TETHER_SSHD_H
#define TETHER_SSHD_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#include "activity.h"
#include "portfwd.h"
#include "tunnel/mux.h"

/* Counted per type for the activity statistics. */
enum sshd_session_type {
    SSHD_TYPE_SSH,
    SSHD_TYPE_VSCODE,
    SSHD_TYPE_JETBRAINS,
    SSHD_TYPE_SFTP,
    SSHD_TYPE_COUNT
};

/* Session processes yield to the agent: nicer, and first in line for the OOM killer. */
#define SSHD_CHILD_NICE_DELTA 5
#define SSHD_CHILD_OOM_ADJ_DELTA 100

/* The default login grace time, and how many connections may be unauthenticated at once
 * (more are closed at accept: a flood of silent connections cannot take every fd). */
#define SSHD_LOGIN_GRACE_MS 30000u
#define SSHD_MAX_UNAUTHENTICATED 64

struct sshd_config {
    const char *state_dir;   /* the host key lives here (created 0700 if missing) */
    const char *sftp_server; /* an external sftp-server to run; NULL: the built-in one */
    const char *workdir;     /* where sessions start; NULL: the user's home */
    /* The optional local listener (--ssh-listen): public-key auth only, against this file
     * and the manifest's authorized_keys. NULL: no listener. */
    const char *listen_host;
    int listen_port;
    const char *authorized_keys;
    /* A connection not authenticated this long after it was accepted is closed (OpenSSH's
     * LoginGraceTime); 0: SSHD_LOGIN_GRACE_MS. */
    uint64_t login_grace_ms;
    /* Environment names a client may set, NULL-terminated; "LC_*" style prefixes allowed.
     * NULL: SSHD_DEFAULT_ENV_ALLOW. */
    const char *const *env_allow;
    /* Which targets direct-tcpip channels (ssh -L, -D) may reach (--forward-allow); NULL:
     * loopback only. A refused open fails with "administratively prohibited". */
    const struct fwdpolicy *forward_policy;
};
#define SSHD_DEFAULT_ENV_ALLOW                                                                     \
    {                                                                                              \
        "LANG", "LC_*", "TERM", "TETHER_SESSION_TYPE", NULL                                        \
    }

struct sshd;

/*
 * Loads or creates the host key, looks up the user the sessions run as, and starts the
 * local listener if configured. Returns NULL with a one-line reason in err. cfg's strings
 * must outlive the server.
 */
struct sshd *sshd_new(uv_loop_t *loop, const struct sshd_config *cfg, char *err, size_t errlen);

/* Serves a tunnel stream of kind ssh: accepts it, or rejects it with a reason. */
void sshd_serve_stream(struct sshd *d, struct portfwd_shared *pf, struct mux *m, uint32_t id);

/*
 * The relay's manifest (validated by proto) for sessions started from now on: "env" (extra
 * environment), "authorized_keys" (keys the local listener accepts besides the file),
 * "motd" (shown on login shells after /etc/motd), "directory" (where sessions start,
 * instead of workdir). The server keeps a reference; NULL forgets the last one.
 */
void sshd_set_manifest(struct sshd *d, json_t *manifest);
/* The local listener's port (useful with port 0); 0 without one. */
int sshd_listen_port(const struct sshd *d);

/* For reconnecting PTYs and workspace scripts, which start their processes as SSH sessions
 * do: the session environment with TERM and TETHER_SESSION_TYPE (free with
 * sshd_session_env_free), the login shell, the directory, the children's oom_score_adj. */
char **sshd_session_env(const struct sshd *d, const char *term, const char *type);
void sshd_session_env_free(char **env);
const char *sshd_shell(const struct sshd *d);
const char *sshd_session_dir(const struct sshd *d);
int sshd_child_oom_adj(const struct sshd *d);
/* The reaper of the agent's children (shared by SSH sessions and PTYs). */
struct proc_reaper *sshd_reaper(struct sshd *d);

/* Where channel data is counted (the agent's; NULL: nowhere). */
void sshd_set_activity(struct sshd *d, struct activity *activity);

/* New shells, commands and subsystems wait while this gate is closed (the agent's
 * lifecycle; NULL: never wait). */
struct gate;
void sshd_set_gate(struct sshd *d, struct gate *gate);

/* Extra environment for every session from now on, applied after the manifest's:
 * "NAME=value" sets, "NAME" alone unsets (devcontainer.json's remoteEnv). NULL-terminated;
 * the server keeps the pointer, which must outlive it or be replaced first. */
void sshd_set_extra_env(struct sshd *d, char *const *env);

/* Open session channels by type. */
unsigned sshd_session_count(const struct sshd *d, enum sshd_session_type type);

/*
 * Ends every connection (each session's process group gets SIGHUP), waits up to
 * SSHD_HANGUP_GRACE_MS for the agent's children to exit (PTYs' too: they share the
 * reaper), sends SIGKILL to the groups still there, then frees the server and calls done.
 */
#define SSHD_HANGUP_GRACE_MS 3000u
void sshd_free(struct sshd *d, void (*done)(void *arg), void *arg);

#endif
