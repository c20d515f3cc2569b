/*
 * tether: the workspace agent, its relay, and the client tools, in one binary.
 */
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include <jansson.h>
#include <libssh/libssh.h>
#include <uv.h>
#include <zlib.h>
#include <libwebsockets.h>
#if defined(LWS_WITH_MBEDTLS)
#include <mbedtls/version.h>
#else
#include <openssl/crypto.h>
#endif
#ifdef __GLIBC__
#include <gnu/libc-version.h>
#endif

#include "cli.h"
#include "commands.h"
#include "tunnel/log.h"

/* The process's log level: the only process-wide mutable setting (tunnel/log.h). */
int tether_log_level = LOG_INFO;
struct log_sink tether_log_sink; /* set by the agent while it runs */

static const char usage[] =
    "usage: tether COMMAND [OPTIONS]\n"
    "\n"
    "tether is a workspace agent: it dials out to a relay over one websocket and serves\n"
    "SSH (shells, exec, sftp, forwards) and TCP port forwards through it.\n"
    "\n"
    "commands:\n"
    "  agent        run the workspace agent (dials the relay)\n"
    "  relay        run the relay, the control-plane end of the tunnel\n"
    "  forward      forward a local TCP port to a port inside a workspace\n"
    "  ssh-proxy    join stdin/stdout to a workspace's SSH server (ssh's ProxyCommand)\n"
    "  config-ssh   write 'Host tether.NAME' entries for the workspaces to ~/.ssh/config\n"
    "  attach       attach this terminal to a reconnecting PTY in a workspace\n"
    "  status       print the relay's view of workspaces as JSON\n"
    "  sftp-server  serve SFTP on stdin/stdout (for images without OpenSSH's sftp-server)\n"
    "  demo         run a relay and an agent on loopback, this directory as the workspace\n"
    "  version      print versions of tether and its libraries\n"
    "\n"
    "Every command takes --help. Exit status: 0 success, 1 failure, 2 usage error.\n";

/*
 * Descriptors a long-running command wants open at most: the agent serves up to 1024
 * streams (PROTO_DEFAULT_MAX_STREAMS), a tcp stream holds one descriptor and an SSH session
 * about six; `forward` holds two per connection; the relay one per agent and per client.
 * Not the hard limit itself (often 524288 or more): libwebsockets allocates and zeroes about
 * 16 bytes for every descriptor the limit allows.
 */
#define TETHER_NOFILE 16384

/* The soft RLIMIT_NOFILE this process was started with, given back to its children. */
static rlim_t child_nofile;

/* In every child, between fork and exec (pthread_atfork): only system calls. */
static void restore_child_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = child_nofile;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/*
 * The soft limit of 1024 that systemd gives services (and what they start) by default
 * would refuse the agent's 170th SSH session, or `forward`'s 510th connection, while the
 * hard limit allows far more. Raise it to TETHER_NOFILE (or the hard limit) before
 * libwebsockets sizes its tables to it. Children (sessions, scripts, --on-idle) get the
 * old limit back: programs that use select() rely on it.
 */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= TETHER_NOFILE)
        return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur =
        rl.rlim_max != RLIM_INFINITY && rl.rlim_max < TETHER_NOFILE ? rl.rlim_max : TETHER_NOFILE;
    if (rl.rlim_cur <= was || setrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    child_nofile = was;
    pthread_atfork(NULL, NULL, restore_child_nofile);
}

/*
 * glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
 * which large buffers (stream buffers, zlib's windows, log batches) come from the heap and
 * stay resident when freed: a 10-minute soak saw the agent's idle RSS wander by 2.4 MiB
 * while the bytes in use returned to 3.3 MB at every quiet point. Holding the threshold at
 * glibc's default (128 KiB) gives such buffers back when freed.
 */
static void hold_mmap_threshold(void)
{
#ifdef M_MMAP_THRESHOLD
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
#endif
}

/* The TLS library libwebsockets and libssh were built with: OpenSSL, or mbedTLS in the
 * static build (packaging/static/build.sh). */
static const char *tls_library_version(void)
{
#if defined(LWS_WITH_MBEDTLS)
    static char v[32];
    mbedtls_version_get_string_full(v);
    return v;
#else
    return OpenSSL_version(OPENSSL_VERSION);
#endif
}

static int cmd_version(void)
{
    printf("tether %s\n", TETHER_VERSION);
    printf("libuv %s, libwebsockets %s, libssh %s, %s, jansson %s, zlib %s\n", uv_version_string(),
           lws_get_library_version(), ssh_version(0), tls_library_version(), JANSSON_VERSION,
           zlibVersion());
#if defined(__GLIBC__)
    printf("glibc %s, dynamically linked\n", gnu_get_libc_version());
#elif defined(TETHER_LIBC_VERSION) /* the static build (packaging/static/build.sh) */
    printf("%s, statically linked\n", TETHER_LIBC_VERSION);
#else
    printf("not glibc\n");
#endif
    return EXIT_OK;
}

int main(int argc, char **argv)
{
    /* Writes to a closed socket must fail with EPIPE, not kill the process. */
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fputs(usage, stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        fputs(usage, stdout);
        return EXIT_OK;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0)
        return cmd_version();
    /* The commands that hold many connections. */
    if (strcmp(cmd, "relay") == 0 || strcmp(cmd, "agent") == 0 || strcmp(cmd, "forward") == 0 ||
        strcmp(cmd, "demo") == 0) {
        raise_nofile();
        hold_mmap_threshold();
    }
    if (strcmp(cmd, "relay") == 0)
        return cmd_relay(argc - 1, argv + 1);
    if (strcmp(cmd, "agent") == 0)
        return cmd_agent(argc - 1, argv + 1);
    if (strcmp(cmd, "forward") == 0)
        return cmd_forward(argc - 1, argv + 1);
    if (strcmp(cmd, "status") == 0)
        return cmd_status(argc - 1, argv + 1);
    if (strcmp(cmd, "demo") == 0)
        return cmd_demo(argc - 1, argv + 1);
    if (strcmp(cmd, "sftp-server") == 0)
        return cmd_sftp_server(argc - 1, argv + 1);
    if (strcmp(cmd, "ssh-proxy") == 0)
        return cmd_ssh_proxy(argc - 1, argv + 1);
    if (strcmp(cmd, "config-ssh") == 0)
        return cmd_config_ssh(argc - 1, argv + 1);
    if (strcmp(cmd, "attach") == 0)
        return cmd_attach(argc - 1, argv + 1);
    cli_error("unknown command '%s' (try 'tether --help')", cmd);
    return EXIT_USAGE;
}
