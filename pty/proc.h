/*
 * proc: starting the processes of a session, on pipes or on a new PTY, and learning of
 * their exit on the loop.
 *
 * proc_spawn forks and execs with everything the child needs prepared beforehand (argv,
 * envp), so the child between fork and exec only makes system calls. The child leads its
 * own session and process group (setsid), so the whole group can be signalled; with a PTY,
 * the PTY becomes its controlling terminal. Every other descriptor is closed in the child.
 * The child gets SIGHUP if the agent dies (PR_SET_PDEATHSIG), so a command with no PTY does
 * not run on for ever after a kill -9 of the agent.
 *
 * proc_reaper watches SIGCHLD on the loop and collects only the pids it was told about,
 * with waitpid(pid, WNOHANG): no thread per child, and children started by others (libuv's
 * uv_spawn) are left to their owners. As PID 1 it also collects orphans (waitpid(-1)): the
 * agent then must not use uv_spawn, whose statuses this would take.
 */
#ifndef TETHER_PROC_H
#define TETHER_PROC_H

#include <stdbool.h>
#include <string.h>
#include <sys/types.h>

#include <termios.h>
#include <uv.h>

struct proc_spec {
    const char *path;  /* the program to exec (absolute) */
    char *const *argv; /* argv[0] may differ from path (a login shell's "-bash") */
    char *const *envp; /* the whole environment; nothing is inherited */
    const char *cwd;   /* NULL: stay in the agent's directory */
    bool use_pty;
    int pty_master, pty_slave; /* use_pty: from proc_pty_open; proc_spawn owns both */
    int nice;                  /* added to the agent's niceness (setpriority), 0 = same */
    int oom_score_adj;         /* written to /proc/self/oom_score_adj if not PROC_OOM_KEEP */
};
#define PROC_OOM_KEEP (-10000)

/* The parent's ends, all O_NONBLOCK and O_CLOEXEC; -1 where not used. */
struct proc_io {
    pid_t pid;
    int pty_master; /* use_pty: read output, write input, resize */
    int stdin_fd;   /* pipes: write end of the child's stdin */
    int stdout_fd;  /* pipes: read end of the child's stdout */
    int stderr_fd;  /* pipes: read end of the child's stderr */
};

/*
 * Opens a PTY of the given size: master O_NONBLOCK, both O_CLOEXEC, UTF-8 line editing.
 * name receives the slave's path (for SSH_TTY). Returns 0 or a negative errno.
 */
int proc_pty_open(unsigned short rows, unsigned short cols, unsigned short xpixels,
                  unsigned short ypixels, int *master, int *slave, char *name, size_t namelen);

/*
 * Starts the child. Returns 0 and fills io, or a negative errno (fork, pipe or PTY failure).
 * An exec failure happens in the child: it writes "tether: cannot run PATH: REASON" to its
 * stderr and exits 127, as a shell would. With use_pty, the PTY's descriptors are consumed
 * (the master ends up in io, the slave is closed) whether or not the call succeeds.
 */
int proc_spawn(const struct proc_spec *spec, struct proc_io *io);

/* The last component of a path ("bash" of "/bin/bash"): argv[0] of shells. */
static inline const char *proc_basename(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* A deep copy of a NULL-terminated environment (NULL: an empty one), or NULL when out of
 * memory; free it with proc_env_free (which takes NULL too). */
char **proc_env_copy(char *const *envp);
void proc_env_free(char **env);

/* Closes the parent's ends that are still open and sets them to -1. */
void proc_io_close(struct proc_io *io);

/* Sets a PTY's size (the kernel sends SIGWINCH to its foreground group). 0 or -errno. */
int proc_pty_resize(int pty_master, unsigned short rows, unsigned short cols,
                    unsigned short xpixels, unsigned short ypixels);

/* The signal number for an SSH signal name ("INT", "TERM", ...); 0 if unknown. */
int proc_signal_number(const char *name);
/* The SSH signal name for a number ("KILL"); NULL for one SSH has no name for. */
const char *proc_signal_name(int signum);

typedef void (*proc_exit_cb)(void *ud, pid_t pid, int wait_status);

struct proc_child;
struct proc_reaper {
    uv_signal_t sigchld;
    struct proc_child *children;
    /* Running as PID 1 (in a container), orphans are re-parented to us: collect them too,
     * or they stay zombies. Set by proc_reaper_init when getpid() is 1. */
    bool reap_orphans;
    void (*done)(struct proc_reaper *r);
};

int proc_reaper_init(struct proc_reaper *r, uv_loop_t *loop);
/*
 * Collects pid once it exits and calls cb with its wait status (cb may be NULL: reap only).
 * Returns 0 or -ENOMEM. A pid is watched until it has been collected.
 */
int proc_reaper_watch(struct proc_reaper *r, pid_t pid, proc_exit_cb cb, void *ud);
/* The owner of ud is going away: the pid is still collected, but cb is not called. */
void proc_reaper_forget(struct proc_reaper *r, pid_t pid);
/* Sends sig to the process group of every child not collected yet. */
void proc_reaper_kill_all(struct proc_reaper *r, int sig);
/*
 * Makes this process the subreaper of its descendants (PR_SET_CHILD_SUBREAPER): what a
 * session or a script leaves running in the background (a dev server started with '&')
 * becomes its child instead of init's, is collected by r (reap_orphans), and can be hung
 * up with proc_signal_children when the agent stops. Only for a process that never uses
 * uv_spawn (see above). Returns 0 or a negative errno.
 */
int proc_reaper_adopt_orphans(struct proc_reaper *r);
/*
 * Sends sig (0: none, just count) to every live child of this process, adopted orphans
 * included: to its process group if it leads one, else to it alone. Only children: a pid
 * read from /proc is one of ours until we collect it, so no stranger is hit. Returns the
 * number of live (not zombie) children, or -1 if /proc cannot be read.
 */
int proc_signal_children(int sig);
/* True while some watched child has not been collected. */
bool proc_reaper_busy(const struct proc_reaper *r);
/* Stops watching SIGCHLD; children not collected yet are left to init (SIGHUP'd first by
 * their owners). done runs when the signal handle is closed. */
void proc_reaper_close(struct proc_reaper *r, void (*done)(struct proc_reaper *r));

#endif
