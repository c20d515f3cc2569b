#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROC_ORPHANS_PER_SIGNAL 1024 /* orphans collected per SIGCHLD (bounded work) */

struct proc_child {
    struct proc_child *next;
    pid_t pid;
    proc_exit_cb cb;
    void *ud;
};

static const struct {
    const char *name;
    int num;
} signal_names[] = {
    {"ABRT", SIGABRT}, {"ALRM", SIGALRM}, {"FPE", SIGFPE},   {"HUP", SIGHUP},   {"ILL", SIGILL},
    {"INT", SIGINT},   {"KILL", SIGKILL}, {"PIPE", SIGPIPE}, {"QUIT", SIGQUIT}, {"SEGV", SIGSEGV},
    {"TERM", SIGTERM}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2},
};

int proc_signal_number(const char *name)
{
    for (size_t i = 0; i < sizeof(signal_names) / sizeof(signal_names[0]); i++)
        if (strcmp(name, signal_names[i].name) == 0)
            return signal_names[i].num;
    return 0;
}

const char *proc_signal_name(int signum)
{
    for (size_t i = 0; i < sizeof(signal_names) / sizeof(signal_names[0]); i++)
        if (signal_names[i].num == signum)
            return signal_names[i].name;
    return NULL;
}

static int set_nonblock_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -errno;
    return 0;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

void proc_io_close(struct proc_io *io)
{
    close_fd(&io->pty_master);
    close_fd(&io->stdin_fd);
    close_fd(&io->stdout_fd);
    close_fd(&io->stderr_fd);
}

/* Only async-signal-safe calls from here to execve: the parent may have other threads. */
static void write_str(int fd, const char *s)
{
    ssize_t r = write(fd, s, strlen(s));
    (void)r;
}

static void close_from(int lowfd)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0) == 0)
        return;
#endif
    struct rlimit rl;
    long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY
                   ? (long)rl.rlim_cur
                   : 65536;
    for (long fd = lowfd; fd < max; fd++)
        close((int)fd);
}

static void write_int(int fd, int v)
{
    char buf[16];
    int i = (int)sizeof(buf);
    bool neg = v < 0;
    unsigned u = neg ? (unsigned)-v : (unsigned)v;
    do {
        buf[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u && i > 1);
    if (neg)
        buf[--i] = '-';
    ssize_t r = write(fd, buf + i, sizeof(buf) - (size_t)i);
    (void)r;
}

static __attribute__((noreturn)) void child_exec(const struct proc_spec *spec, pid_t parent, int in,
                                                 int out, int err, int ctty)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL);
    setsid();
    /* If the agent dies (kill -9, OOM), the session hangs up as it would at a normal end:
     * a command without a PTY would otherwise run on with nobody to read it. The signal
     * goes to this process only (a fork clears it), like the SIGHUP a closing terminal
     * sends. The agent may have died before the prctl: then the parent is another. */
    prctl(PR_SET_PDEATHSIG, SIGHUP, 0, 0, 0);
    if (getppid() != parent)
        raise(SIGHUP);
    if (ctty >= 0)
        ioctl(ctty, TIOCSCTTY, 0);
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        _exit(127);
    close_from(3);
    if (spec->nice != 0) {
        errno = 0;
        int cur = getpriority(PRIO_PROCESS, 0);
        if (errno == 0)
            setpriority(PRIO_PROCESS, 0, cur + spec->nice);
    }
    if (spec->oom_score_adj != PROC_OOM_KEEP) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            write_int(fd, spec->oom_score_adj);
            close(fd);
        }
    }
    if (spec->cwd && chdir(spec->cwd) < 0 && chdir("/") < 0)
        _exit(127);
    execve(spec->path, spec->argv, spec->envp);
    int e = errno;
    write_str(2, "tether: cannot run ");
    write_str(2, spec->path);
    write_str(2, ": ");
    write_str(2, strerror(e)); /* strerror of a valid errno returns a static string */
    write_str(2, "\r\n");
    _exit(127);
}

int proc_pty_open(unsigned short rows, unsigned short cols, unsigned short xpixels,
                  unsigned short ypixels, int *master, int *slave, char *name, size_t namelen)
{
    struct winsize ws = {.ws_row = rows ? rows : 24,
                         .ws_col = cols ? cols : 80,
                         .ws_xpixel = xpixels,
                         .ws_ypixel = ypixels};
    if (openpty(master, slave, NULL, NULL, &ws) < 0)
        return -errno;
    /* UTF-8 aware line editing: erase whole characters, as every modern terminal expects. */
    struct termios t;
    if (tcgetattr(*slave, &t) == 0) {
        t.c_iflag |= IUTF8;
        tcsetattr(*slave, TCSANOW, &t);
    }
    int rc = set_nonblock_cloexec(*master);
    if (rc == 0 && fcntl(*slave, F_SETFD, FD_CLOEXEC) < 0)
        rc = -errno;
    if (rc == 0 && name && ptsname_r(*master, name, namelen) != 0)
        snprintf(name, namelen, "/dev/tty");
    if (rc < 0) {
        close(*master);
        close(*slave);
        *master = *slave = -1;
    }
    return rc;
}

static int spawn_pty(const struct proc_spec *spec, struct proc_io *io)
{
    int master = spec->pty_master, slave = spec->pty_slave;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int rc = -errno;
        close(master);
        close(slave);
        return rc;
    }
    if (pid == 0)
        child_exec(spec, parent, slave, slave, slave, slave);
    close(slave);
    io->pid = pid;
    io->pty_master = master;
    return 0;
}

static int spawn_pipes(const struct proc_spec *spec, struct proc_io *io)
{
    int p[3][2] = {{-1, -1}, {-1, -1}, {-1, -1}};
    int rc = 0;
    for (int i = 0; i < 3 && rc == 0; i++)
        if (pipe2(p[i], O_CLOEXEC) < 0)
            rc = -errno;
    /* The parent's ends: stdin's write end, stdout's and stderr's read ends. */
    if (rc == 0)
        rc = set_nonblock_cloexec(p[0][1]);
    if (rc == 0)
        rc = set_nonblock_cloexec(p[1][0]);
    if (rc == 0)
        rc = set_nonblock_cloexec(p[2][0]);
    pid_t pid = -1, parent = getpid();
    if (rc == 0) {
        pid = fork();
        if (pid < 0)
            rc = -errno;
        else if (pid == 0)
            child_exec(spec, parent, p[0][0], p[1][1], p[2][1], -1);
    }
    close_fd(&p[0][0]);
    close_fd(&p[1][1]);
    close_fd(&p[2][1]);
    if (rc < 0) {
        close_fd(&p[0][1]);
        close_fd(&p[1][0]);
        close_fd(&p[2][0]);
        return rc;
    }
    io->pid = pid;
    io->stdin_fd = p[0][1];
    io->stdout_fd = p[1][0];
    io->stderr_fd = p[2][0];
    return 0;
}

int proc_spawn(const struct proc_spec *spec, struct proc_io *io)
{
    io->pid = -1;
    io->pty_master = io->stdin_fd = io->stdout_fd = io->stderr_fd = -1;
    return spec->use_pty ? spawn_pty(spec, io) : spawn_pipes(spec, io);
}

int proc_pty_resize(int pty_master, unsigned short rows, unsigned short cols,
                    unsigned short xpixels, unsigned short ypixels)
{
    struct winsize ws = {
        .ws_row = rows, .ws_col = cols, .ws_xpixel = xpixels, .ws_ypixel = ypixels};
    return ioctl(pty_master, TIOCSWINSZ, &ws) < 0 ? -errno : 0;
}

/* ---- reaper ---- */

static void reap(struct proc_reaper *r)
{
    struct proc_child **pp = &r->children;
    while (*pp) {
        struct proc_child *c = *pp;
        int status;
        pid_t got = waitpid(c->pid, &status, WNOHANG);
        if (got == 0 || (got < 0 && errno == EINTR)) {
            pp = &c->next;
            continue;
        }
        /* Collected, or not ours to collect any more (ECHILD): forget it either way. */
        *pp = c->next;
        if (got == c->pid && c->cb)
            c->cb(c->ud, c->pid, status);
        free(c);
    }
    /* PID 1: whatever else exited is an orphan (a daemonised grandchild, say). */
    for (int i = 0; r->reap_orphans && i < PROC_ORPHANS_PER_SIGNAL; i++) {
        int status;
        pid_t got = waitpid(-1, &status, WNOHANG);
        if (got <= 0)
            break;
        for (struct proc_child **cp = &r->children; *cp; cp = &(*cp)->next)
            if ((*cp)->pid == got) { /* one of ours exited just now: still tell its owner */
                struct proc_child *c = *cp;
                *cp = c->next;
                if (c->cb)
                    c->cb(c->ud, c->pid, status);
                free(c);
                break;
            }
    }
}

static void on_sigchld(uv_signal_t *h, int signum)
{
    (void)signum;
    reap(h->data);
}

int proc_reaper_init(struct proc_reaper *r, uv_loop_t *loop)
{
    memset(r, 0, sizeof(*r));
    r->reap_orphans = getpid() == 1;
    int rc = uv_signal_init(loop, &r->sigchld);
    if (rc < 0)
        return rc;
    r->sigchld.data = r;
    rc = uv_signal_start(&r->sigchld, on_sigchld, SIGCHLD);
    if (rc < 0) {
        uv_close((uv_handle_t *)&r->sigchld, NULL);
        return rc;
    }
    uv_unref((uv_handle_t *)&r->sigchld); /* watching children alone keeps no loop alive */
    return 0;
}

int proc_reaper_watch(struct proc_reaper *r, pid_t pid, proc_exit_cb cb, void *ud)
{
    struct proc_child *c = malloc(sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->pid = pid;
    c->cb = cb;
    c->ud = ud;
    c->next = r->children;
    r->children = c;
    /* The child may have exited before it was watched: its SIGCHLD is already spent. */
    reap(r);
    return 0;
}

void proc_reaper_kill_all(struct proc_reaper *r, int sig)
{
    for (struct proc_child *c = r->children; c; c = c->next)
        kill(-c->pid, sig);
}

int proc_reaper_adopt_orphans(struct proc_reaper *r)
{
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        return -errno;
    r->reap_orphans = true;
    return 0;
}

int proc_signal_children(int sig)
{
    DIR *proc = opendir("/proc");
    if (!proc)
        return -1;
    pid_t self = getpid();
    int n = 0;
    struct dirent *d;
    while ((d = readdir(proc))) {
        char path[300], buf[512];
        if (d->d_name[0] < '1' || d->d_name[0] > '9')
            continue;
        snprintf(path, sizeof(path), "/proc/%s/stat", d->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t len = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (len <= 0)
            continue;
        buf[len] = '\0';
        /* "pid (comm) state ppid pgrp ...": comm may hold anything, so from its last ')'. */
        char *rp = strrchr(buf, ')'), state;
        int pid = atoi(buf), ppid, pgrp;
        if (!rp || sscanf(rp + 1, " %c %d %d", &state, &ppid, &pgrp) != 3 || ppid != self ||
            state == 'Z')
            continue;
        n++;
        if (sig)
            kill(pgrp == pid ? -pid : pid, sig);
    }
    closedir(proc);
    return n;
}

bool proc_reaper_busy(const struct proc_reaper *r)
{
    return r->children != NULL;
}

void proc_reaper_forget(struct proc_reaper *r, pid_t pid)
{
    for (struct proc_child *c = r->children; c; c = c->next)
        if (c->pid == pid)
            c->cb = NULL;
}

static void on_reaper_closed(uv_handle_t *h)
{
    struct proc_reaper *r = h->data;
    if (r->done)
        r->done(r);
}

void proc_reaper_close(struct proc_reaper *r, void (*done)(struct proc_reaper *r))
{
    reap(r);
    struct proc_child *c = r->children;
    while (c) {
        struct proc_child *next = c->next;
        free(c);
        c = next;
    }
    r->children = NULL;
    r->done = done;
    uv_close((uv_handle_t *)&r->sigchld, on_reaper_closed);
}

char **proc_env_copy(char *const *envp)
{
    size_t n = 0;
    while (envp && envp[n])
        n++;
    char **copy = calloc(n + 1, sizeof(*copy));
    for (size_t i = 0; copy && i < n; i++)
        if (!(copy[i] = strdup(envp[i]))) {
            proc_env_free(copy);
            return NULL;
        }
    return copy;
}

void proc_env_free(char **env)
{
    for (char **e = env; e && *e; e++)
        free(*e);
    free(env);
}
