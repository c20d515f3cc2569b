/*
 * cli: what the subcommands share: the options every client takes (--url, --token-file,
 * --ca-file, --insecure), durations, and the exit-status convention.
 */
#ifndef TETHER_CLI_H
#define TETHER_CLI_H

#include <stdbool.h>
#include <getopt.h>
#include <stdint.h>

#include <uv.h>

#include "tunnel/url.h"
#include "tunnel/wsctx.h"

enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2 };
#define CLI_MAX_TOKEN 1024u

/* Prints "tether: MESSAGE" on stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Options several commands share. A command's getopt table lists the groups it takes
 * (CLI_OPTS_END last); its parse loop handles its own options and passes every other
 * getopt result to cli_shared_option.
 */
#define CLI_OPTS_CLIENT                                                                            \
    {"url", required_argument, NULL, 'u'}, {"token-file", required_argument, NULL, 't'},           \
        {"ca-file", required_argument, NULL, 'C'},                                                 \
    {                                                                                              \
        "insecure", no_argument, NULL, 'I'                                                         \
    }
#define CLI_OPTS_KEEPALIVE                                                                         \
    {"keepalive-idle", required_argument, NULL, 'i'},                                              \
    {                                                                                              \
        "keepalive-timeout", required_argument, NULL, 'T'                                          \
    }
#define CLI_OPTS_END                                                                               \
    {"log-level", required_argument, NULL, 'L'}, {"help", no_argument, NULL, 'h'},                 \
    {                                                                                              \
        NULL, 0, NULL, 0                                                                           \
    }

struct cli_client;

/* Where the shared options land; NULL pointers mean the command does not take them. */
struct cli_shared {
    const char *command; /* for messages */
    const char *usage;   /* printed by --help */
    struct cli_client *client;
    uint32_t *keepalive_idle_ms;
    uint32_t *keepalive_timeout_ms;
};

/* getopt_long with tether's conventions: no getopt messages, ':' for a missing value. */
int cli_getopt(int argc, char **argv, const struct option *opts);

#define CLI_NEXT (-1) /* go on parsing */
/*
 * Handles one result of cli_getopt that is not the command's own: a shared option, --help,
 * or an unknown/incomplete option (one "tether:" line). Returns CLI_NEXT or the exit
 * status the command should return now.
 */
int cli_shared_option(const struct cli_shared *sh, int c, char **argv);

/* Parses "250ms", "3s", "2m", "1h" or a bare number of seconds. Returns 0 or -1. */
int cli_duration_ms(const char *text, uint64_t *ms);

/* Parses "HOST:PORT" or "[V6]:PORT" into host (numeric or a name) and port. */
int cli_hostport(const char *text, char *host, size_t hostlen, int *port);

/* The agent's state directory: $XDG_STATE_HOME/tether, else ~/.local/state/tether. */
int cli_default_state_dir(char *buf, size_t len);

/* Options every command that talks to a relay accepts. */
struct cli_client {
    const char *url_text;
    const char *token_file;
    const char *ca_file;
    bool insecure;
    struct tether_url url;
    char *token; /* malloc'd; never printed */
};

/*
 * The value of environment variable name, or NULL if it is unset or empty: images and
 * orchestrators often clear a variable with NAME= rather than unsetting it.
 */
const char *cli_env(const char *name);

/*
 * Resolves the URL (--url or TETHER_URL) and the token (--token-file, TETHER_TOKEN_FILE,
 * or TETHER_TOKEN, in that order; empty variables count as unset; TETHER_TOKEN is removed
 * from the environment so that no child inherits it). Prints the problem and returns
 * EXIT_USAGE or EXIT_FAIL on failure.
 */
int cli_client_resolve(struct cli_client *c);
void cli_client_free(struct cli_client *c);

/* A process's loop and lws context, and the signals that stop it. */
struct cli_runtime {
    uv_loop_t loop;
    struct wsctx ws;
    uv_signal_t sigint;
    uv_signal_t sigterm;
    void (*on_signal)(struct cli_runtime *rt, int signum);
    void *ud;
};
int cli_runtime_init(struct cli_runtime *rt, const struct wsctx_config *cfg);
/* Stops watching signals and starts lws teardown (from a uv callback). */
void cli_runtime_stop(struct cli_runtime *rt);
/* After uv_run returned: finishes teardown. */
void cli_runtime_finish(struct cli_runtime *rt);

#endif
