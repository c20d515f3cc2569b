/*
 * tether config-ssh: writes one managed block into an OpenSSH client config, with a
 * `Host tether.NAME` entry per workspace the token may reach, each reaching its workspace
 * through `tether ssh-proxy`. So `ssh tether.NAME`, scp, rsync and IDEs work unchanged.
 *
 * The block lies between two marker lines (CONFIG_SSH_START, CONFIG_SSH_END). Everything
 * outside it is kept byte for byte: a run replaces the block where it is (or appends it),
 * --remove deletes it, and running twice gives identical bytes. If the file did not end
 * with a newline, the block is appended after one and itself ends without one; the block
 * then owns that newline, so --remove restores the original bytes exactly.
 *
 * The file is replaced atomically (a temporary file in the same directory, then rename),
 * keeping its mode. A symlinked config is written through: the link's target is replaced
 * and the link stays (dotfile managers keep ~/.ssh/config as a link); a link whose target
 * does not exist is refused.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "commands.h"
#include "relayapi.h"
#include "tunnel/bytebuf.h"
#include "tunnel/tokens.h"

#define CONFIG_SSH_START "# ------------ START-TETHER ------------"
#define CONFIG_SSH_END "# ------------ END-TETHER ------------"
/* Host aliases are this prefix and the workspace's name: `ssh tether.NAME`. */
#define CONFIG_SSH_HOST_PREFIX "tether."
/*
 * Seconds between ssh's keepalive requests: an idle session still sends something, so
 * proxies and load balancers in front of the relay (often 60 s idle limits) keep the
 * websocket, and ssh notices a dead path after ServerAliveCountMax (3) unanswered ones.
 */
#define CONFIG_SSH_ALIVE_INTERVAL 30
/* An ssh config larger than this is refused rather than rewritten. */
#define CONFIG_SSH_MAX_FILE (4u * 1024 * 1024)

static const char config_ssh_usage[] =
    "usage: tether config-ssh --url URL --token-file FILE [--ssh-config PATH] [--remove]\n"
    "\n"
    "Writes a block of 'Host tether.NAME' entries into your ssh config, one for every\n"
    "workspace the token may reach, so that 'ssh tether.NAME' connects through the relay\n"
    "(with 'tether ssh-proxy' as ProxyCommand). Running it again replaces the block; the\n"
    "rest of the file is left as it is.\n"
    "\n"
    "  --url URL           the relay (or set TETHER_URL)\n"
    "  --token-file FILE   a user token; the entries refer to this file by its path\n"
    "                      (or TETHER_TOKEN_FILE; TETHER_TOKEN cannot be used here)\n"
    "  --ssh-config PATH   the file to edit (default ~/.ssh/config)\n"
    "  --remove            delete the block instead (needs no relay or token)\n"
    "  --ca-file FILE      trust these CAs for wss:// instead of the system's\n"
    "  --insecure          do not check the relay's certificate (development only)\n"
    "  --log-level LEVEL   error, warn, info (default) or debug\n"
    "  -h, --help          this text\n";

static const char block_comment[] =
    "# Written by 'tether config-ssh', which rewrites this block on every run; 'tether\n"
    "# config-ssh --remove' deletes it. Edit outside the markers: changes inside are lost.\n"
    "#\n"
    "# Host keys are not checked for these hosts: the relay authenticates both ends (your user\n"
    "# token and the workspace agent's token), and workspaces are disposable, so a rebuilt one\n"
    "# has a new host key that would otherwise stop ssh with a changed-host-key error.\n"
    "# LogLevel ERROR hides ssh's 'Permanently added ... to the list of known hosts' notes.\n"
    "# ServerAliveInterval keeps idle sessions alive through proxies in front of the relay.\n";

/* One file's bytes around the block; all pointers into buf. */
struct config_file {
    char path[PATH_MAX]; /* what the command writes: a symlink's target, resolved */
    bool exists;
    struct stat st;
    char *buf;
    size_t len;
    size_t before_len; /* bytes before the block (all of them if there is none) */
    const char *block; /* the block, markers included; NULL if there is none */
    size_t block_len;
    const char *after; /* bytes after the block */
    size_t after_len;
};

/* ---- the config file ---- */

static int default_config_path(char *out, size_t outlen)
{
    /* OpenSSH finds ~ in the passwd entry, not in $HOME; so do we. */
    struct passwd *pw = getpwuid(getuid());
    if (!pw || !pw->pw_dir || !pw->pw_dir[0]) {
        cli_error("cannot find your home directory (no passwd entry): use --ssh-config PATH");
        return -1;
    }
    if ((size_t)snprintf(out, outlen, "%s/.ssh/config", pw->pw_dir) >= outlen) {
        cli_error("home directory path too long: use --ssh-config PATH");
        return -1;
    }
    return 0;
}

/* Creates the file's directory (one level, 0700 like ~/.ssh) if it is missing. */
static int ensure_parent_dir(const char *path)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = '\0';
    struct stat st;
    if (stat(dir, &st) == 0)
        return 0;
    if (errno != ENOENT || mkdir(dir, 0700) < 0) {
        cli_error("cannot create the directory %s: %s", dir, strerror(errno));
        return -1;
    }
    printf("created %s\n", dir);
    return 0;
}

/* Where to write: the path itself, or the target of a symlink (which must exist). */
static int resolve_target(const char *path, struct config_file *f)
{
    struct stat lst;
    if (lstat(path, &lst) < 0) {
        if (errno != ENOENT) {
            cli_error("cannot read %s: %s", path, strerror(errno));
            return -1;
        }
        snprintf(f->path, sizeof(f->path), "%s", path);
        return 0;
    }
    if (!S_ISLNK(lst.st_mode)) {
        snprintf(f->path, sizeof(f->path), "%s", path);
        return 0;
    }
    if (!realpath(path, f->path)) {
        cli_error("%s is a symlink whose target cannot be used (%s); not writing through it", path,
                  strerror(errno));
        return -1;
    }
    return 0;
}

static int read_config(struct config_file *f)
{
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        cli_error("cannot read %s: %s", f->path, strerror(errno));
        return -1;
    }
    int rc = -1;
    if (fstat(fd, &f->st) < 0 || !S_ISREG(f->st.st_mode)) {
        cli_error("%s is not a regular file", f->path);
        goto out;
    }
    if ((size_t)f->st.st_size > CONFIG_SSH_MAX_FILE) {
        cli_error("%s is larger than %u bytes: not rewriting it", f->path, CONFIG_SSH_MAX_FILE);
        goto out;
    }
    f->buf = malloc((size_t)f->st.st_size + 1);
    if (!f->buf) {
        cli_error("out of memory");
        goto out;
    }
    while (f->len < (size_t)f->st.st_size) {
        ssize_t n = read(fd, f->buf + f->len, (size_t)f->st.st_size - f->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        f->len += (size_t)n;
    }
    f->buf[f->len] = '\0';
    f->exists = true;
    rc = 0;
out:
    close(fd);
    return rc;
}

/* True if the line at p (up to its newline or the end) is the marker, trailing blanks aside. */
static bool is_marker(const char *p, const char *end, const char *marker)
{
    size_t ml = strlen(marker);
    if ((size_t)(end - p) < ml || memcmp(p, marker, ml) != 0)
        return false;
    for (p += ml; p < end && *p != '\n'; p++)
        if (*p != ' ' && *p != '\t' && *p != '\r')
            return false;
    return true;
}

/* Finds the block. Returns 0, or -1 (and says why) for markers that do not pair up. */
static int find_block(struct config_file *f)
{
    const char *end = f->buf + f->len;
    const char *start = NULL, *stop = NULL;
    for (const char *line = f->buf; f->buf && line < end;) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *next = nl ? nl + 1 : end;
        if (is_marker(line, end, CONFIG_SSH_START)) {
            if (start) {
                cli_error("%s has more than one '%s' line: fix it by hand", f->path,
                          CONFIG_SSH_START);
                return -1;
            }
            start = line;
        } else if (is_marker(line, end, CONFIG_SSH_END)) {
            if (!start || stop) {
                cli_error("%s has a '%s' line without its start: fix it by hand", f->path,
                          CONFIG_SSH_END);
                return -1;
            }
            stop = next;
        }
        line = next;
    }
    if (start && !stop) {
        cli_error("%s has a '%s' line without its end: fix it by hand", f->path, CONFIG_SSH_START);
        return -1;
    }
    f->before_len = start ? (size_t)(start - f->buf) : f->len;
    f->after = start ? stop : end;
    f->after_len = (size_t)(end - f->after);
    if (start) {
        f->block = start;
        f->block_len = (size_t)(stop - start);
        /* A block that ends the file without a newline owns the newline before it. */
        if (f->after_len == 0 && stop[-1] != '\n' && f->before_len > 0)
            f->before_len--;
    }
    return 0;
}

/* ---- the block ---- */

/*
 * Appends an argument of the ProxyCommand. ssh expands %-tokens in it, then runs it with
 * the user's shell: anything but plain characters goes in single quotes, with % doubled.
 * A quote or a control character cannot be written safely for every shell: refused.
 */
static int append_arg(struct bytebuf *b, const char *arg)
{
    static const char plain[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                "0123456789_./+,:@=-";
    for (const char *p = arg; *p; p++)
        if (*p == '\'' || (unsigned char)*p < 0x20 || *p == 0x7f)
            return -1;
    bool quote = !arg[0] || strspn(arg, plain) != strlen(arg);
    int rc = bytebuf_append(b, quote ? " '" : " ", quote ? 2 : 1);
    for (const char *p = arg; *p && rc == 0; p++)
        rc = bytebuf_append(b, *p == '%' ? "%%" : p, *p == '%' ? 2 : 1);
    if (quote && rc == 0)
        rc = bytebuf_append(b, "'", 1);
    return rc;
}

static int append_str(struct bytebuf *b, const char *s)
{
    return bytebuf_append(b, s, strlen(s));
}

/* bytebuf_append for pieces that may be empty (and then have no pointer). */
static int append_bytes(struct bytebuf *b, const void *p, size_t n)
{
    return n ? bytebuf_append(b, p, n) : 0;
}

/*
 * A path as the user meant it, made absolute against the working directory and cleaned
 * of "." and ".." without resolving symlinks: a token file reached through a link (a
 * mounted secret that is rotated by swapping links) must stay reached through it.
 */
static int absolute_path(const char *path, char *out, size_t outlen)
{
    char joined[2 * PATH_MAX], cwd[PATH_MAX];
    if (path[0] != '/' && !getcwd(cwd, sizeof(cwd)))
        return -1;
    snprintf(joined, sizeof(joined), "%s/%s", path[0] == '/' ? "" : cwd, path);
    size_t n = 0;
    for (char *seg = joined, *next; *seg; seg = next) {
        while (*seg == '/')
            seg++;
        next = seg + strcspn(seg, "/");
        size_t len = (size_t)(next - seg);
        if (len == 0 || (len == 1 && seg[0] == '.'))
            continue;
        if (len == 2 && seg[0] == '.' && seg[1] == '.') {
            while (n > 0 && out[--n] != '/')
                ;
            continue;
        }
        if (n + 1 + len >= outlen)
            return -1;
        out[n++] = '/';
        memcpy(out + n, seg, len);
        n += len;
    }
    if (n == 0)
        out[n++] = '/';
    out[n] = '\0';
    return 0;
}

struct block_args {
    const struct cli_client *cc;
    char exe[PATH_MAX];
    char token_file[PATH_MAX];
    char ca_file[PATH_MAX];
};

static int host_entry(struct bytebuf *b, const struct block_args *a, const char *name)
{
    int rc = append_str(b, "\nHost " CONFIG_SSH_HOST_PREFIX) | append_str(b, name) |
             append_str(b, "\n    ProxyCommand");
    rc |= append_arg(b, a->exe) | append_arg(b, "ssh-proxy") | append_arg(b, "--url") |
          append_arg(b, a->cc->url_text) | append_arg(b, "--token-file") |
          append_arg(b, a->token_file);
    if (a->ca_file[0])
        rc |= append_arg(b, "--ca-file") | append_arg(b, a->ca_file);
    if (a->cc->insecure)
        rc |= append_arg(b, "--insecure");
    char tail[256];
    snprintf(tail, sizeof(tail),
             " %s\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
             "    LogLevel ERROR\n    ServerAliveInterval %d\n",
             name, CONFIG_SSH_ALIVE_INTERVAL);
    rc |= append_str(b, tail);
    return rc < 0 ? -1 : 0;
}

/* The workspace names of the relay's list; only valid names (they go into the config). */
static int workspace_names(json_t *doc, const char ***names, size_t *n)
{
    *n = 0;
    if (!json_is_array(doc)) {
        cli_error("the relay's answer is not a list of workspaces");
        return -1;
    }
    *names = calloc(json_array_size(doc) + 1, sizeof(**names));
    if (!*names) {
        cli_error("out of memory");
        return -1;
    }
    size_t i;
    json_t *w;
    json_array_foreach(doc, i, w)
    {
        const char *name = json_string_value(json_object_get(w, "name"));
        if (name && tokens_name_valid(name))
            (*names)[(*n)++] = name;
        else
            cli_error("skipping a workspace whose name is not valid");
    }
    return 0;
}

/* ---- reporting ---- */

/* The text of one host's entry inside a block, up to the next entry or the end marker. */
static bool entry_in_block(const char *block, size_t len, const char *name, const char **entry,
                           size_t *entry_len)
{
    char head[128];
    snprintf(head, sizeof(head), "\nHost " CONFIG_SSH_HOST_PREFIX "%s\n", name);
    const char *end = block + len;
    const char *p = block;
    size_t hl = strlen(head);
    for (; p + hl <= end; p++)
        if (memcmp(p, head, hl) == 0)
            break;
    if (p + hl > end)
        return false;
    p++;
    const char *q = p + hl - 1;
    while (q < end && !(q[-1] == '\n' && (*q == '#' || (end - q >= 5 && !memcmp(q, "Host ", 5)))))
        q++;
    *entry = p;
    *entry_len = (size_t)(q - p);
    return true;
}

/* Names of the hosts in a block: "Host tether.NAME" lines. Calls fn for each. */
static void block_hosts(const char *block, size_t len, void (*fn)(const char *name, void *ud),
                        void *ud)
{
    const char *end = block + len;
    for (const char *line = block; line < end;) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *next = nl ? nl + 1 : end;
        static const char head[] = "Host " CONFIG_SSH_HOST_PREFIX;
        size_t hl = sizeof(head) - 1;
        if ((size_t)(next - line) > hl && memcmp(line, head, hl) == 0) {
            char name[TOKENS_MAX_NAME + 1];
            size_t nlen = (size_t)((nl ? nl : end) - line) - hl;
            if (nlen <= TOKENS_MAX_NAME) {
                memcpy(name, line + hl, nlen);
                name[nlen] = '\0';
                fn(name, ud);
            }
        }
        line = next;
    }
}

struct report {
    const char *new_block;
    size_t new_len;
};

static void report_removed(const char *name, void *ud)
{
    struct report *r = ud;
    const char *e;
    size_t el;
    if (!r->new_block || !entry_in_block(r->new_block, r->new_len, name, &e, &el))
        printf("removed   " CONFIG_SSH_HOST_PREFIX "%s\n", name);
}

static void report_hosts(const struct config_file *f, const struct bytebuf *nb, const char **names,
                         size_t n)
{
    const char *newb = nb ? (const char *)bytebuf_peek(nb) : NULL;
    size_t newl = nb ? nb->len : 0;
    for (size_t i = 0; i < n; i++) {
        const char *oe = NULL, *ne = NULL;
        size_t ol = 0, nl = 0;
        bool old = f->block && entry_in_block(f->block, f->block_len, names[i], &oe, &ol);
        entry_in_block(newb, newl, names[i], &ne, &nl);
        const char *what = !old                                          ? "added"
                           : (ne && ol == nl && memcmp(oe, ne, nl) == 0) ? "unchanged"
                                                                         : "updated";
        printf("%-9s " CONFIG_SSH_HOST_PREFIX "%s\n", what, names[i]);
    }
    struct report r = {newb, newl};
    if (f->block)
        block_hosts(f->block, f->block_len, report_removed, &r);
}

/* ---- writing ---- */

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Replaces f->path with content, atomically, keeping the file's mode. */
static int replace_file(const struct config_file *f, const struct bytebuf *content)
{
    char tmp[PATH_MAX + 32], dir[PATH_MAX];
    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tether-XXXXXX", f->path) >= sizeof(tmp)) {
        cli_error("path too long: %s", f->path);
        return -1;
    }
    int fd = mkstemp(tmp); /* O_EXCL: a planted file or link at this name is not followed */
    if (fd < 0) {
        cli_error("cannot write in the directory of %s: %s", f->path, strerror(errno));
        return -1;
    }
    mode_t mode = f->exists ? (f->st.st_mode & 07777) : 0600;
    int err = 0;
    if (fchmod(fd, mode) < 0)
        err = errno;
    if (!err && f->exists && (f->st.st_uid != geteuid() || f->st.st_gid != getegid()))
        (void)!fchown(fd, f->st.st_uid, f->st.st_gid); /* only root can; others keep theirs */
    if (!err && content->len && write_all(fd, (const char *)bytebuf_peek(content), content->len))
        err = errno;
    if (!err && fsync(fd) < 0)
        err = errno;
    if (close(fd) < 0 && !err)
        err = errno;
    if (!err && rename(tmp, f->path) < 0)
        err = errno;
    if (err) {
        unlink(tmp);
        cli_error("cannot write %s: %s", f->path, strerror(err));
        return -1;
    }
    snprintf(dir, sizeof(dir), "%s", f->path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *(slash == dir ? slash + 1 : slash) = '\0';
    int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd); /* the rename itself survives a crash */
        close(dfd);
    }
    return 0;
}

/* The new file: the bytes around the old block, and the new block (NULL to remove it). */
static int compose(const struct config_file *f, const struct bytebuf *block, struct bytebuf *out)
{
    int rc = append_bytes(out, f->buf, f->before_len);
    if (block) {
        bool at_end = f->after_len == 0;
        bool needs_newline = at_end && f->before_len > 0 && f->buf[f->before_len - 1] != '\n';
        size_t bl = block->len;
        if (needs_newline) {
            rc |= bytebuf_append(out, "\n", 1);
            bl--; /* the block owns the newline in front of it instead of the one after */
        }
        rc |= append_bytes(out, bytebuf_peek(block), bl);
    }
    rc |= append_bytes(out, f->after, f->after_len);
    return rc < 0 ? -1 : 0;
}

static int build_block(const struct block_args *a, const char **names, size_t n, struct bytebuf *b)
{
    int rc = append_str(b, CONFIG_SSH_START "\n") | append_str(b, block_comment);
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = host_entry(b, a, names[i]);
    if (rc < 0) {
        cli_error("cannot write a ProxyCommand for these paths: a path contains a quote or "
                  "a control character");
        return -1;
    }
    return append_str(b, CONFIG_SSH_END "\n") < 0 ? -1 : 0;
}

static int block_args_init(struct block_args *a, const struct cli_client *cc)
{
    memset(a, 0, sizeof(*a));
    a->cc = cc;
    ssize_t n = readlink("/proc/self/exe", a->exe, sizeof(a->exe) - 1);
    if (n <= 0) {
        cli_error("cannot find this program's path (/proc/self/exe): %s", strerror(errno));
        return -1;
    }
    a->exe[n] = '\0';
    if (absolute_path(cc->token_file, a->token_file, sizeof(a->token_file)) < 0 ||
        (cc->ca_file && absolute_path(cc->ca_file, a->ca_file, sizeof(a->ca_file)) < 0)) {
        cli_error("cannot make an absolute path of the token or CA file");
        return -1;
    }
    return 0;
}

struct config_ssh {
    struct cli_client cc;
    const char *config_path;
    bool remove;
    struct config_file file;
    json_t *doc;
    const char **names;
    size_t nnames;
    struct bytebuf block;
    struct bytebuf content;
};

/* Reads the workspaces and builds the new block; for --remove there is none. */
static int prepare_block(struct config_ssh *s)
{
    int rc = cli_client_resolve(&s->cc);
    if (rc != EXIT_OK)
        return rc;
    struct block_args a;
    if (block_args_init(&a, &s->cc) < 0)
        return EXIT_FAIL;
    if ((rc = relayapi_get(&s->cc, "/api/v1/workspaces", &s->doc)) != EXIT_OK)
        return rc;
    if (workspace_names(s->doc, &s->names, &s->nnames) < 0 ||
        build_block(&a, s->names, s->nnames, &s->block) < 0)
        return EXIT_FAIL;
    return EXIT_OK;
}

static int config_ssh_apply(struct config_ssh *s)
{
    char path[PATH_MAX];
    struct config_file *f = &s->file;
    if (s->config_path)
        snprintf(path, sizeof(path), "%s", s->config_path);
    else if (default_config_path(path, sizeof(path)) < 0)
        return EXIT_FAIL;
    if (!s->remove) {
        int rc = prepare_block(s);
        if (rc != EXIT_OK)
            return rc;
    }
    if (resolve_target(path, f) < 0 || read_config(f) < 0 || find_block(f) < 0)
        return EXIT_FAIL;
    if (s->remove && !f->block) {
        printf("%s has no tether block: nothing to remove\n", path);
        return EXIT_OK;
    }
    if (compose(f, s->remove ? NULL : &s->block, &s->content) < 0) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    bool same = f->exists && s->content.len == f->len &&
                (f->len == 0 || memcmp(bytebuf_peek(&s->content), f->buf, f->len) == 0);
    if (!same &&
        ((!f->exists && ensure_parent_dir(f->path) < 0) || replace_file(f, &s->content) < 0))
        return EXIT_FAIL;
    report_hosts(f, s->remove ? NULL : &s->block, s->names, s->nnames);
    if (s->remove)
        printf("removed the tether block from %s\n", path);
    else if (same)
        printf("%s is up to date: %zu workspace%s\n", path, s->nnames, s->nnames == 1 ? "" : "s");
    else
        printf("wrote %s: %zu workspace%s; connect with 'ssh " CONFIG_SSH_HOST_PREFIX "NAME'\n",
               path, s->nnames, s->nnames == 1 ? "" : "s");
    return EXIT_OK;
}

static int config_ssh_run(struct config_ssh *s, int argc, char **argv)
{
    static const struct option opts[] = {{"ssh-config", required_argument, NULL, 's'},
                                         {"remove", no_argument, NULL, 'r'},
                                         CLI_OPTS_CLIENT,
                                         CLI_OPTS_END};
    const struct cli_shared sh = {
        .command = "config-ssh", .usage = config_ssh_usage, .client = &s->cc};
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        if (c == 's') {
            s->config_path = optarg;
            continue;
        }
        if (c == 'r') {
            s->remove = true;
            continue;
        }
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (argc - optind != 0) {
        cli_error("config-ssh takes no arguments besides options (see 'tether config-ssh "
                  "--help')");
        return EXIT_USAGE;
    }
    if (s->config_path && !s->config_path[0]) {
        cli_error("--ssh-config needs a path");
        return EXIT_USAGE;
    }
    /* The entries name the token by its path: a token only in the environment has none. */
    if (!s->remove && !s->cc.token_file && !cli_env("TETHER_TOKEN_FILE") &&
        cli_env("TETHER_TOKEN")) {
        cli_error("config-ssh needs --token-file FILE: the ssh config refers to the token by "
                  "its path, so TETHER_TOKEN cannot be used");
        return EXIT_USAGE;
    }
    return config_ssh_apply(s);
}

int cmd_config_ssh(int argc, char **argv)
{
    struct config_ssh *s = calloc(1, sizeof(*s));
    if (!s) {
        cli_error("out of memory");
        return EXIT_FAIL;
    }
    int rc = config_ssh_run(s, argc, argv);
    free(s->file.buf);
    free(s->names);
    json_decref(s->doc);
    bytebuf_free(&s->block);
    bytebuf_free(&s->content);
    cli_client_free(&s->cc);
    free(s);
    return rc;
}
