/*
 * script: runs one workspace script (a startup, shutdown, devcontainer or metadata command)
 * as a child of the agent, on the loop, with a timeout, and hands its output over line by
 * line.
 *
 * The child leads its own session and process group (proc_spawn), its stdin is /dev/null,
 * and it is collected by the agent's one proc_reaper (never uv_spawn: as PID 1 the reaper
 * takes every exit status). At the timeout the whole process group gets SIGKILL.
 *
 * A script may leave background processes behind that keep its output pipes open (a
 * startup script that starts a dev server with `&`): the exit is reported once the
 * script's own process was collected and its pipes reached end of file, or
 * SCRIPT_DRAIN_MS after the process was collected, whichever comes first; lines that
 * arrive later are still passed on, until end of file or script_free.
 */
#ifndef TETHER_SCRIPT_H
#define TETHER_SCRIPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "pty/proc.h"

#define SCRIPT_DRAIN_MS 1000u                /* after the exit, wait this long for pipes' EOF */
#define SCRIPT_LINE_MAX 4096u                /* longer lines are passed on in pieces */
#define SCRIPT_OUTPUT_CAP_DEFAULT (8u << 20) /* bytes of output passed on per script */

struct script_spec {
    const char *source;  /* for on_line and the agent's log, e.g. "startup" (copied) */
    char *const *argv;   /* argv[0] is an absolute path; copied where needed */
    char *const *envp;   /* the whole environment */
    const char *cwd;     /* NULL: the agent's directory */
    uint64_t timeout_ms; /* 0: none */
    /* Output bytes passed to on_line (stdout and stderr together); past it the rest is read
     * and discarded, with one marker line when the cut happens and one with the count of
     * discarded bytes at the exit. 0: SCRIPT_OUTPUT_CAP_DEFAULT. */
    size_t output_cap;
    /* Keep stdout (up to output_cap) in memory for on_exit instead of passing it to
     * on_line (metadata); stderr still goes to on_line, within its own output_cap. Bytes of
     * stdout past the cap only count in the result's discarded, with no marker line. */
    bool capture_stdout;
};

enum script_end {
    SCRIPT_EXITED,      /* status = the exit code */
    SCRIPT_SIGNALED,    /* status = the signal number */
    SCRIPT_TIMED_OUT,   /* killed at the timeout */
    SCRIPT_SPAWN_FAILED /* status = -errno; nothing ran (fork or pipe failure: a program
                         * that cannot be executed is SCRIPT_EXITED 127, with proc_spawn's
                         * "tether: cannot run PATH: REASON" line on stderr) */
};

struct script_result {
    enum script_end end;
    int status;
    uint64_t elapsed_ms;
    const char *output; /* capture_stdout: what it printed (not NUL-terminated), else NULL */
    size_t output_len;
    size_t discarded; /* output bytes past the cap */
};

struct script_callbacks {
    /* One line of output without its LF, as the script wrote it (a CR before the LF stays;
     * the bytes need not be UTF-8). A line over SCRIPT_LINE_MAX comes in pieces, cut
     * before a UTF-8 character that would not fit whole; a last line without LF comes at
     * end of file. The marker lines of output_cap come here too, with the same source. */
    void (*on_line)(void *ud, const char *source, const char *text, size_t len);
    /* Once, as described above; the script stays allocated until script_free. */
    void (*on_exit)(void *ud, const struct script_result *r);
};

struct script;

/*
 * Starts the script. Returns NULL only when out of memory; a spawn failure is reported
 * through on_exit (SCRIPT_SPAWN_FAILED) from the loop, never from inside this call.
 */
struct script *script_start(uv_loop_t *loop, struct proc_reaper *reaper,
                            const struct script_spec *spec, const struct script_callbacks *cb,
                            void *ud);
/* Kills the process group (SIGKILL) if it still runs; on_exit follows as SCRIPT_SIGNALED. */
void script_kill(struct script *s);
/* Kills what still runs, stops every callback, and frees the script (its handles close on
 * the loop). Safe from inside on_exit and on_line. Once the script's own process was
 * collected its group is left alone (the pid may be reused; a background server the script
 * started keeps running), only the pipes are closed. */
void script_free(struct script *s);

/* Fills argv (NULL-terminated, at most 4 entries used) to run shell text with /bin/sh -c. */
void script_shell_argv(const char *text, char *argv[4]);

#endif
