/*
 * The SSH server's optional local listener (--ssh-listen): SSH straight to a TCP port of
 * the workspace, for clients that do not go through the relay. These connections must
 * prove a key from the authorized keys (the --authorized-keys file, re-read at every
 * attempt as OpenSSH does, and the manifest's authorized_keys). "none" and passwords are
 * never accepted, and the user name must be the agent's user: every session runs as it.
 *
 * Key lines with options (command="...", from="...", restrict, ...) are skipped with a
 * warning: tether does not implement them, and a key meant to be restricted must not
 * open an unrestricted shell.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sshd_int.h"
#include "tunnel/log.h"
#include "tunnel/readfile.h"

/* Does one authorized_keys line hold key? Lines with options never match. */
static bool line_matches(const char *line, const ssh_key key, const char *where)
{
    char type[64], b64[16384];
    while (*line == ' ' || *line == '\t')
        line++;
    if (*line == '#' || *line == '\0' || *line == '\n')
        return false;
    if (sscanf(line, "%63s %16383s", type, b64) != 2)
        return false;
    enum ssh_keytypes_e kt = ssh_key_type_from_name(type);
    if (kt == SSH_KEYTYPE_UNKNOWN) {
        log_warn("ssh: %s: a key line with options or an unknown type is skipped", where);
        return false;
    }
    ssh_key k = NULL;
    if (ssh_pki_import_pubkey_base64(b64, kt, &k) != SSH_OK)
        return false;
    bool same = ssh_key_cmp(k, key, SSH_KEY_CMP_PUBLIC) == 0;
    ssh_key_free(k);
    return same;
}

static bool file_has_key(const char *path, const ssh_key key)
{
    char why[512];
    size_t len;
    char *buf = readfile_bounded(path, SSHD_AUTHORIZED_KEYS_MAX, &len, why, sizeof(why));
    if (!buf) {
        log_warn("ssh: authorized keys: %s", why);
        return false;
    }
    bool found = false;
    for (char *line = buf, *next; line && *line && !found; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        found = line_matches(line, key, path);
    }
    free(buf);
    return found;
}

static bool key_authorized(const struct sshd *d, const ssh_key key)
{
    if (d->cfg->authorized_keys && file_has_key(d->cfg->authorized_keys, key))
        return true;
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(d->manifest, "authorized_keys"), i, v)
    {
        if (json_is_string(v) && line_matches(json_string_value(v), key, "manifest"))
            return true;
    }
    return false;
}

int ssh_auth_pubkey(ssh_session s, const char *user, struct ssh_key_struct *key, char state,
                    void *ud)
{
    struct ssh_conn *c = ud;
    (void)s;
    if (!c->local)
        return SSH_AUTH_DENIED;
    if (strcmp(user, c->d->user.name) != 0) {
        log_info("ssh: local login as %s refused: sessions run as %s", user, c->d->user.name);
        return SSH_AUTH_DENIED;
    }
    if (state != SSH_PUBLICKEY_STATE_NONE && state != SSH_PUBLICKEY_STATE_VALID)
        return SSH_AUTH_DENIED;
    if (!key_authorized(c->d, key)) {
        if (state == SSH_PUBLICKEY_STATE_VALID)
            log_info("ssh: local login as %s refused: key not authorized", user);
        return SSH_AUTH_DENIED;
    }
    /* STATE_NONE asks whether the key would do; VALID carries a checked signature. */
    if (state == SSH_PUBLICKEY_STATE_VALID) {
        log_info("ssh: local login as %s with an authorized key", user);
        ssh_conn_authenticated(c);
    }
    return SSH_AUTH_SUCCESS;
}

static void on_listen_ready(uv_poll_t *h, int status, int events)
{
    struct sshd *d = h->data;
    (void)events;
    if (status < 0)
        return;
    int fd = accept4(d->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    if (d->unauthenticated >= SSHD_MAX_UNAUTHENTICATED) {
        /* Like OpenSSH's MaxStartups: the ones in their grace time are enough. One log
         * line per burst, not one per connection. */
        if (!d->refusing_unauthenticated)
            log_warn("ssh: local connections refused while %d are not authenticated yet",
                     SSHD_MAX_UNAUTHENTICATED);
        d->refusing_unauthenticated = true;
        close(fd);
        return;
    }
    d->refusing_unauthenticated = false;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (ssh_conn_start(d, fd, true) < 0)
        log_warn("ssh: cannot serve a local connection");
}

int ssh_tcp_listen(const struct sockaddr_storage *sa, socklen_t len, int *bound)
{
    int fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)sa, len) < 0 || listen(fd, 128) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    struct sockaddr_storage got;
    socklen_t glen = sizeof(got);
    getsockname(fd, (struct sockaddr *)&got, &glen);
    *bound = got.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&got)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&got)->sin_port);
    return fd;
}

int ssh_listen_start(struct sshd *d, char *err, size_t errlen)
{
    const struct sshd_config *cfg = d->cfg;
    if (!cfg->listen_host)
        return 0;
    struct sockaddr_storage sa;
    memset(&sa, 0, sizeof(sa));
    if (uv_ip4_addr(cfg->listen_host, cfg->listen_port, (struct sockaddr_in *)&sa) != 0 &&
        uv_ip6_addr(cfg->listen_host, cfg->listen_port, (struct sockaddr_in6 *)&sa) != 0) {
        snprintf(err, errlen, "--ssh-listen needs a numeric address, not '%s'", cfg->listen_host);
        return -1;
    }
    socklen_t len =
        sa.ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    int fd = ssh_tcp_listen(&sa, len, &d->listen_port);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", cfg->listen_host, cfg->listen_port,
                 strerror(-fd));
        return -1;
    }
    /* Allocated apart from the server: its close may complete after the server is freed. */
    d->listen_poll = malloc(sizeof(*d->listen_poll));
    if (!d->listen_poll || uv_poll_init(d->loop, d->listen_poll, fd) < 0) {
        free(d->listen_poll);
        d->listen_poll = NULL;
        close(fd);
        snprintf(err, errlen, "cannot watch the SSH listener");
        return -1;
    }
    d->listen_fd = fd;
    d->listen_poll->data = d;
    uv_poll_start(d->listen_poll, UV_READABLE, on_listen_ready);
    log_info("ssh: listening on %s:%d (public keys from %s%s)", cfg->listen_host, d->listen_port,
             cfg->authorized_keys ? cfg->authorized_keys : "",
             cfg->authorized_keys ? " and the manifest" : "the manifest");
    return 0;
}

static void on_listen_closed(uv_handle_t *h)
{
    free(h);
}

void ssh_listen_stop(struct sshd *d)
{
    if (d->listen_fd < 0)
        return;
    uv_close((uv_handle_t *)d->listen_poll, on_listen_closed);
    d->listen_poll = NULL;
    close(d->listen_fd);
    d->listen_fd = -1;
}
