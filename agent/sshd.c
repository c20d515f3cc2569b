#include "sshd.h"

#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <pwd.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sshd_int.h"
#include "stream.h"
#include "tunnel/log.h"

#define HOST_KEY_FILE "ssh_host_ed25519_key"

/* ---- the user sessions run as ---- */

/*
 * The passwd entry of the agent's user. A static glibc binary may have no NSS at run time,
 * so /etc/passwd is read directly when getpwuid finds nothing.
 */
static int lookup_user(struct sshd_user *u)
{
    uid_t uid = getuid();
    struct passwd *pw = getpwuid(uid);
    char line[1024];
    FILE *f = NULL;
    struct passwd entry;
    if (!pw && (f = fopen("/etc/passwd", "re")) != NULL) {
        while (fgets(line, sizeof(line), f)) {
            char *fields[7], *p = line;
            int n = 0;
            line[strcspn(line, "\n")] = '\0';
            for (char *t; n < 7 && (t = strsep(&p, ":")) != NULL;)
                fields[n++] = t;
            if (n == 7 && (uid_t)strtoul(fields[2], NULL, 10) == uid) {
                entry.pw_name = fields[0];
                entry.pw_dir = fields[5];
                entry.pw_shell = fields[6];
                pw = &entry;
                break;
            }
        }
    }
    char uidname[32];
    snprintf(uidname, sizeof(uidname), "%u", (unsigned)uid);
    const char *home = pw && pw->pw_dir && pw->pw_dir[0] ? pw->pw_dir : getenv("HOME");
    const char *shell = pw && pw->pw_shell && pw->pw_shell[0] ? pw->pw_shell : "/bin/sh";
    u->name = strdup(pw && pw->pw_name ? pw->pw_name : uidname);
    u->home = strdup(home ? home : "/");
    u->shell = strdup(shell);
    if (f)
        fclose(f);
    return u->name && u->home && u->shell ? 0 : -ENOMEM;
}

static void free_user(struct sshd_user *u)
{
    free(u->name);
    free(u->home);
    free(u->shell);
}

/* ---- host key ---- */

static int mkdir_p(const char *path, mode_t mode)
{
    char buf[4096];
    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
        return -ENAMETOOLONG;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, mode) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/*
 * Writes the private key to path under a temporary name (0600), syncs it and renames it,
 * so that path is either absent or a whole key, also when the disk is full or the agent
 * dies meanwhile. The key is written here rather than by ssh_pki_export_privkey_file, which
 * does not check that its buffered write reached the file. Returns 0 or a negative errno.
 */
static int write_host_key(ssh_key key, const char *path)
{
    char *text = NULL;
    if (ssh_pki_export_privkey_base64(key, NULL, NULL, NULL, &text) != SSH_OK || !text)
        return -ENOMEM;
    size_t len = strlen(text), off = 0;
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    unlink(tmp); /* left by an agent that died while writing */
    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        rc = -errno;
    while (rc == 0 && off < len) {
        ssize_t n = write(fd, text + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            rc = n < 0 ? -errno : -EIO;
        else
            off += (size_t)n;
    }
    if (rc == 0 && fsync(fd) < 0)
        rc = -errno;
    if (fd >= 0 && close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) < 0)
        rc = -errno;
    if (rc < 0 && fd >= 0)
        unlink(tmp);
    explicit_bzero(text, len);
    ssh_string_free_char(text);
    return rc;
}

/* Loads the host key from the state directory, or creates it there (0600) the first time. */
static int load_host_key(struct sshd *d, char *err, size_t errlen)
{
    char path[4096];
    const char *dir = d->cfg->state_dir;
    int rc = mkdir_p(dir, 0700);
    if (rc < 0) {
        snprintf(err, errlen, "cannot create the state directory %s: %s", dir, strerror(-rc));
        return -1;
    }
    snprintf(path, sizeof(path), "%s/%s", dir, HOST_KEY_FILE);
    ssh_key key = NULL;
    if (access(path, F_OK) < 0 && errno != ENOENT) { /* never replace a key we cannot see */
        snprintf(err, errlen, "cannot read the host key %s: %s", path, strerror(errno));
        return -1;
    }
    if (access(path, F_OK) == 0) {
        if (ssh_pki_import_privkey_file(path, NULL, NULL, NULL, &key) != SSH_OK) {
            snprintf(err, errlen, "cannot read the host key %s (remove it to make a new one)",
                     path);
            return -1;
        }
    } else {
        if (ssh_pki_generate(SSH_KEYTYPE_ED25519, 0, &key) != SSH_OK) {
            snprintf(err, errlen, "cannot generate an ed25519 host key");
            return -1;
        }
        rc = write_host_key(key, path);
        if (rc < 0) {
            ssh_key_free(key);
            snprintf(err, errlen, "cannot write the SSH host key into the state directory %s: %s",
                     dir, strerror(-rc));
            return -1;
        }
        log_info("created the SSH host key %s", path);
    }
    if (ssh_bind_options_set(d->bind, SSH_BIND_OPTIONS_IMPORT_KEY, key) != SSH_OK) {
        ssh_key_free(key);
        snprintf(err, errlen, "libssh refused the host key");
        return -1;
    }
    return 0; /* the bind owns the key now */
}

static int read_own_oom_adj(void)
{
    int v = 0;
    FILE *f = fopen("/proc/self/oom_score_adj", "re");
    if (f) {
        if (fscanf(f, "%d", &v) != 1)
            v = 0;
        fclose(f);
    }
    v += SSHD_CHILD_OOM_ADJ_DELTA;
    return v > 1000 ? 1000 : v;
}

static void sshd_log_cb(int priority, const char *function, const char *buffer, void *ud)
{
    (void)function;
    (void)ud;
    if (priority <= SSH_LOG_WARN)
        log_warn("libssh: %s", buffer);
    else
        log_debug("libssh: %s", buffer);
}

static void on_reaper_closed(struct proc_reaper *r);

struct sshd *sshd_new(uv_loop_t *loop, const struct sshd_config *cfg, char *err, size_t errlen)
{
    static const char *const default_allow[] = SSHD_DEFAULT_ENV_ALLOW;
    struct sshd *d = calloc(1, sizeof(*d));
    if (!d) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    d->loop = loop;
    d->cfg = cfg;
    d->listen_fd = -1;
    d->env_allow = cfg->env_allow ? cfg->env_allow : default_allow;
    d->child_oom_adj = read_own_oom_adj();
    ssh_set_log_callback(sshd_log_cb); /* libssh's logger is process-wide */
    if (lookup_user(&d->user) < 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    d->bind = ssh_bind_new();
    if (!d->bind) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (load_host_key(d, err, errlen) < 0)
        goto fail;
    int rc = proc_reaper_init(&d->reaper, loop);
    if (rc < 0) {
        snprintf(err, errlen, "cannot watch SIGCHLD: %s", uv_strerror(rc));
        goto fail;
    }
    if (ssh_listen_start(d, err, errlen) < 0) {
        /* The reaper's handle is closing; the bind and user go with the server. */
        d->freeing = true;
        proc_reaper_close(&d->reaper, on_reaper_closed);
        return NULL;
    }
    return d;
fail:
    if (d->bind)
        ssh_bind_free(d->bind);
    free_user(&d->user);
    free(d);
    return NULL;
}

int sshd_listen_port(const struct sshd *d)
{
    return d->listen_fd >= 0 ? d->listen_port : 0;
}

void sshd_set_manifest(struct sshd *d, json_t *manifest)
{
    json_decref(d->manifest);
    d->manifest = json_is_object(manifest) ? json_incref(manifest) : NULL;
}

unsigned sshd_session_count(const struct sshd *d, enum sshd_session_type type)
{
    return type < SSHD_TYPE_COUNT ? d->sessions[type] : 0;
}

/* ---- connections ---- */

static int auth_none(ssh_session s, const char *user, void *ud)
{
    struct ssh_conn *c = ud;
    (void)s;
    if (c->local)
        return SSH_AUTH_DENIED; /* the local listener takes public keys only */
    /* The relay authenticated whoever opened this tunnel stream. */
    log_debug("ssh: session for %s over the tunnel", user);
    ssh_conn_authenticated(c);
    return SSH_AUTH_SUCCESS;
}

static ssh_channel open_session_channel(ssh_session s, void *ud)
{
    (void)s;
    return ssh_chan_open(ud);
}

/* The last step of sshd_free: the reaper's signal handle is closed. */
static void on_reaper_closed(struct proc_reaper *r)
{
    struct sshd *d = (struct sshd *)((char *)r - offsetof(struct sshd, reaper));
    void (*done)(void *) = d->done;
    void *arg = d->done_arg;
    json_decref(d->manifest);
    ssh_bind_free(d->bind);
    free_user(&d->user);
    free(d);
    if (done)
        done(arg);
}

static void on_grace_closed(uv_handle_t *h)
{
    struct sshd *d = h->data;
    proc_reaper_close(&d->reaper, on_reaper_closed);
}

/* Every 100 ms after the hangup: done once no child is left, or SIGKILL at the deadline. */
static void on_grace_tick(uv_timer_t *t)
{
    struct sshd *d = t->data;
    if (proc_reaper_busy(&d->reaper) && uv_now(d->loop) < d->grace_deadline)
        return;
    if (proc_reaper_busy(&d->reaper)) {
        log_warn("session processes still running after SIGHUP: sending SIGKILL");
        proc_reaper_kill_all(&d->reaper, SIGKILL);
    }
    uv_close((uv_handle_t *)&d->grace, on_grace_closed);
}

/* The last step of sshd_free: the connections are gone; the children get their grace. */
static void finish_free(struct sshd *d)
{
    d->grace_deadline = uv_now(d->loop) + SSHD_HANGUP_GRACE_MS;
    uv_timer_init(d->loop, &d->grace);
    d->grace.data = d;
    uv_timer_start(&d->grace, on_grace_tick, 0, 100);
}

static void conn_free_now(struct ssh_conn *c)
{
    struct sshd *d = c->d;
    for (struct ssh_conn **pp = &d->conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    if (c->event)
        ssh_event_free(c->event);
    ssh_free(c->session);
    free(c);
    if (d->freeing && !d->conns)
        finish_free(d);
}

void ssh_conn_unref(struct ssh_conn *c)
{
    if (--c->refs == 0)
        conn_free_now(c);
}

static void on_poll_closed(uv_handle_t *h)
{
    struct ssh_conn *c = h->data;
    close(c->poll_fd);
    c->poll_fd = -1;
    ssh_conn_unref(c);
}

static void on_login_timer_closed(uv_handle_t *h)
{
    ssh_conn_unref(h->data);
}

/* The connection leaves the login phase (it authenticated, or it ends): the grace timer
 * stops, and a local one no longer counts against SSHD_MAX_UNAUTHENTICATED. */
static void end_login_phase(struct ssh_conn *c)
{
    if (!c->login_pending)
        return;
    c->login_pending = false;
    if (c->local)
        c->d->unauthenticated--;
    uv_timer_stop(&c->login_timer);
}

void ssh_conn_authenticated(struct ssh_conn *c)
{
    end_login_phase(c);
}

static uint64_t login_grace_ms(const struct sshd *d)
{
    return d->cfg->login_grace_ms ? d->cfg->login_grace_ms : SSHD_LOGIN_GRACE_MS;
}

static void on_login_timeout(uv_timer_t *t)
{
    struct ssh_conn *c = t->data;
    log_info("ssh: a %s connection was not authenticated within %llu ms: closed",
             c->local ? "local" : "tunnel", (unsigned long long)login_grace_ms(c->d));
    c->dead = true;
    ssh_conn_after_io(c);
}

/* Ends the connection: every channel hangs up; freed once all handles are closed. */
static void conn_teardown(struct ssh_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    end_login_phase(c);
    uv_close((uv_handle_t *)&c->login_timer, on_login_timer_closed);
    ssh_forward_close_all(c);
    while (c->chans) {
        struct ssh_chan *ch = c->chans;
        ssh_chan_free(ch); /* unlinks itself */
    }
    if (c->kex_done && ssh_is_connected(c->session))
        ssh_disconnect(c->session);
    uv_close((uv_handle_t *)&c->poll, on_poll_closed);
}

static void on_conn_poll(uv_poll_t *h, int status, int events);

void ssh_conn_after_io(struct ssh_conn *c)
{
    if (c->in_io > 0 || c->closing)
        return;
    int status = ssh_get_status(c->session);
    if (c->dead || (status & (SSH_CLOSED | SSH_CLOSED_ERROR)) ||
        (c->kex_done && !ssh_is_connected(c->session))) {
        conn_teardown(c);
        return;
    }
    c->in_io++;
    for (struct ssh_chan *ch = c->chans; ch; ch = ch->next)
        ssh_chan_service(ch);
    c->in_io--;
    for (struct ssh_chan *ch = c->chans, *next; ch; ch = next) {
        next = ch->next;
        if (ssh_chan_finished(ch))
            ssh_chan_free(ch); /* unlinks itself */
    }
    int want = UV_READABLE;
    if (ssh_get_poll_flags(c->session) & SSH_WRITE_PENDING)
        want |= UV_WRITABLE;
    if (want != c->poll_events) {
        c->poll_events = want;
        uv_poll_start(&c->poll, want, on_conn_poll);
    }
}

void ssh_conn_pump(struct ssh_conn *c)
{
    if (c->closing)
        return;
    c->in_io++;
    for (int round = 0; round < SSHD_PUMP_ROUNDS; round++) {
        if (!c->kex_done) {
            int rc = ssh_handle_key_exchange(c->session);
            if (rc == SSH_AGAIN)
                break;
            if (rc != SSH_OK) {
                log_debug("ssh: key exchange failed: %s", ssh_get_error(c->session));
                c->dead = true;
                break;
            }
            c->kex_done = true;
            c->event = ssh_event_new();
            if (!c->event || ssh_event_add_session(c->event, c->session) != SSH_OK) {
                c->dead = true;
                break;
            }
            continue;
        }
        int rc = ssh_event_dopoll(c->event, 0);
        if (rc == SSH_ERROR) {
            c->dead = true;
            break;
        }
        if (rc != SSH_OK) /* SSH_AGAIN: nothing was ready */
            break;
    }
    c->in_io--;
    ssh_conn_after_io(c);
}

static void on_conn_poll(uv_poll_t *h, int status, int events)
{
    struct ssh_conn *c = h->data;
    (void)events;
    if (status < 0)
        c->dead = true;
    ssh_conn_pump(c);
}

int ssh_conn_start(struct sshd *d, int fd, bool local)
{
    struct ssh_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return -ENOMEM;
    }
    c->d = d;
    c->local = local;
    c->poll_fd = -1;
    c->session = ssh_new();
    if (!c->session) {
        free(c);
        close(fd);
        return -ENOMEM;
    }
    c->server_cb.userdata = c;
    c->server_cb.auth_none_function = auth_none;
    c->server_cb.auth_pubkey_function = ssh_auth_pubkey;
    c->server_cb.channel_open_request_session_function = open_session_channel;
    ssh_callbacks_init(&c->server_cb);
    ssh_set_server_callbacks(c->session, &c->server_cb);
    if (ssh_bind_accept_fd(d->bind, c->session, fd) != SSH_OK) {
        log_warn("ssh: cannot start a session: %s", ssh_get_error(d->bind));
        ssh_free(c->session);
        free(c);
        close(fd);
        return -EIO;
    }
    /* From here libssh owns fd (ssh_free closes it). */
    ssh_set_auth_methods(c->session, local ? SSH_AUTH_METHOD_PUBLICKEY : SSH_AUTH_METHOD_NONE);
    ssh_set_message_callback(c->session, ssh_forward_message, c);
    ssh_set_blocking(c->session, 0);
    c->poll_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    int rc = c->poll_fd < 0 ? -errno : uv_poll_init(d->loop, &c->poll, c->poll_fd);
    if (rc < 0) {
        if (c->poll_fd >= 0)
            close(c->poll_fd);
        ssh_free(c->session);
        free(c);
        return rc;
    }
    c->poll.data = c;
    uv_timer_init(d->loop, &c->login_timer);
    c->login_timer.data = c;
    c->refs = 2; /* the poll and the login timer */
    c->next = d->conns;
    d->conns = c;
    c->login_pending = true;
    if (local)
        d->unauthenticated++;
    uv_timer_start(&c->login_timer, on_login_timeout, login_grace_ms(d), 0);
    c->poll_events = UV_READABLE;
    uv_poll_start(&c->poll, UV_READABLE, on_conn_poll);
    ssh_conn_pump(c); /* sends our version string */
    return 0;
}

/*
 * A unix socket polls writable only while less than a quarter of its send buffer is queued:
 * with the default (208 KiB) that is about 52 KiB, so libssh, which waits for POLLOUT after
 * every write, stopped after two 32 KiB packets per loop iteration. The kernel caps the size
 * at net.core.wmem_max (208 KiB by default, then doubled); what is queued is kernel memory
 * for as long as the other end has not read it.
 */
static void sshd_socketpair_buffers(const int sv[2])
{
    int size = SSHD_SOCKETPAIR_BUFFER;
    for (int i = 0; i < 2; i++)
        setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
}

void sshd_serve_stream(struct sshd *d, struct portfwd_shared *pf, struct mux *m, uint32_t id)
{
    int sv[2];
    if (d->freeing) {
        mux_stream_reject(m, id, PROTO_CODE_REFUSED, "the agent is shutting down");
        return;
    }
    int rc = 0;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0) {
        rc = -errno;
    } else {
        sshd_socketpair_buffers(sv);
        if ((rc = ssh_conn_start(d, sv[0], false)) < 0)
            close(sv[1]);
    }
    if (rc < 0) {
        char why[128];
        if (stream_out_of_fds(rc))
            snprintf(why, sizeof(why), "%s", STREAM_OUT_OF_FDS);
        else
            snprintf(why, sizeof(why), "cannot start an SSH session: %s", strerror(-rc));
        log_warn("stream %u: ssh refused: %s", id, why);
        mux_stream_reject(m, id, PROTO_CODE_INTERNAL, why);
        return;
    }
    rc = portfwd_attach_fd(pf, m, id, sv[1]);
    if (rc < 0) {
        /* The SSH side sees the socketpair close and tears itself down. */
        mux_stream_reject(m, id, PROTO_CODE_INTERNAL, uv_strerror(rc));
    }
}

void sshd_free(struct sshd *d, void (*done)(void *arg), void *arg)
{
    d->freeing = true;
    d->done = done;
    d->done_arg = arg;
    ssh_listen_stop(d);
    if (!d->conns) {
        finish_free(d);
        return;
    }
    for (struct ssh_conn *c = d->conns, *next; c; c = next) {
        next = c->next;
        conn_teardown(c);
    }
}

struct proc_reaper *sshd_reaper(struct sshd *d)
{
    return &d->reaper;
}

void sshd_set_activity(struct sshd *d, struct activity *activity)
{
    d->activity = activity;
}

void sshd_set_gate(struct sshd *d, struct gate *gate)
{
    d->gate = gate;
}

void sshd_set_extra_env(struct sshd *d, char *const *env)
{
    d->extra_env = env;
}
