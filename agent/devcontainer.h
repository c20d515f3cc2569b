/*
 * devcontainer: the parts of a workspace's devcontainer.json the agent honours
 * (https://containers.dev/implementors/json_reference/): postStartCommand (run as a
 * startup script), postAttachCommand (run on the first session), forwardPorts (reported
 * with the listening ports) and remoteEnv (in every session's environment).
 *
 * The file is JSON with comments (// and block) and trailing commas. Pure functions: the
 * agent reads the file, this module parses text.
 */
#ifndef TETHER_DEVCONTAINER_H
#define TETHER_DEVCONTAINER_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define DEVCONTAINER_MAX_BYTES (1u << 20) /* larger files are refused before reading */
#define DEVCONTAINER_MAX_COMMANDS 32u     /* per lifecycle hook (object form) */
#define DEVCONTAINER_MAX_ARGS 256u        /* per array-form command */
#define DEVCONTAINER_MAX_PORTS 64u
#define DEVCONTAINER_MAX_ENV 256u
/* Bytes of a command name (object form). Names end log sources
 * "devcontainer:postAttachCommand:NAME", which PROTO_MAX_LOG_SOURCE caps at 64 bytes. */
#define DEVCONTAINER_MAX_NAME 33u
/* Bytes of one remoteEnv "NAME=value" after substitution: Linux's MAX_ARG_STRLEN (32 pages)
 * less the NUL; execve refuses longer strings, and it bounds what substitution can grow. */
#define DEVCONTAINER_MAX_ENV_ENTRY 131071u

/*
 * One command of a hook. A string runs through the shell: argv = {"/bin/sh", "-c", text};
 * an array runs as it is, with no shell (PATH lookup done by sh: argv = {"/bin/sh", "-c",
 * "exec \"$@\"", "sh", arg0, arg1, ...}). The object form gives several commands, each with
 * its name (run in parallel; 1..DEVCONTAINER_MAX_NAME bytes of A-Za-z0-9._-, in file order);
 * the string and array forms give one with name "". A blank string or an empty array is no
 * command (skipped, as the reference CLI does).
 */
struct dc_command {
    char name[65];
    char **argv; /* NULL-terminated, each string owned */
};

struct dc_port {
    uint16_t port;
    char host[256]; /* "" for a bare number or "NUMBER" string */
};

struct devcontainer {
    struct dc_command *post_start;
    size_t n_post_start;
    struct dc_command *post_attach;
    size_t n_post_attach;
    struct dc_port *ports;
    size_t n_ports;
    /* remoteEnv with substitutions done: ${containerEnv:NAME}, ${containerEnv:NAME:default}
     * (from envp below; a set but empty variable stays empty), ${localEnv:NAME[:default]} and
     * its alias ${env:...} (the default: the client's environment is unknown here),
     * ${containerWorkspaceFolder} and ${containerWorkspaceFolderBasename} (left as written
     * when workspace_dir is NULL). Other forms are left as written; substituted text is not
     * scanned again. "NAME=value" strings in file order; a null value in the file becomes
     * "NAME" alone (unset it). Also NULL-terminated (never NULL itself), so it can go to
     * sshd_set_extra_env as it is. */
    char **env;
    size_t n_env;
};

/*
 * Parses the text of a devcontainer.json (at most DEVCONTAINER_MAX_BYTES). workspace_dir
 * and envp (both may be NULL) feed the substitutions. Returns a new devcontainer (free it
 * with devcontainer_free), or NULL with a one-line reason in err (malformed JSON with its
 * line and column, a member of the wrong type, a limit crossed). Unknown members are ignored.
 */
struct devcontainer *devcontainer_parse(const char *text, size_t len, const char *workspace_dir,
                                        char *const *envp, char *err, size_t errlen);

/*
 * Looks for DIR/.devcontainer/devcontainer.json, then DIR/.devcontainer.json (symlinks are
 * followed; the first that exists is the one used). Returns 0 with *out NULL when neither
 * exists, 0 with *out set, or -1 with a reason in err (and the path) for a file that cannot
 * be read or parsed, is not a regular file or is larger than DEVCONTAINER_MAX_BYTES.
 */
int devcontainer_load(const char *workspace_dir, char *const *envp, struct devcontainer **out,
                      char *err, size_t errlen);

void devcontainer_free(struct devcontainer *dc);

/* JSON with comments and trailing commas to plain JSON, same length (both are replaced by
 * spaces, line breaks kept, so line and column numbers in errors stay right). Strings are
 * left alone; so is an unterminated block comment, for the parser to report. */
void devcontainer_strip_jsonc(char *text, size_t len);

#endif
