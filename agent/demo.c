/*
 * tether demo: a relay and an agent in one process on loopback, with freshly generated
 * tokens, the current directory as the workspace. Prints what to run to reach it.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "cli.h"
#include "commands.h"
#include "tunnel/log.h"
#include "tunnel/relay.h"
#include "tunnel/tokens.h"

#define DEMO_DEFAULT_LISTEN "127.0.0.1:7420"
#define DEMO_TOKEN_BYTES 24

static const char demo_usage[] =
    "usage: tether demo [--listen ADDR:PORT] [--name WORKSPACE] [--startup-script CMD]\n"
    "                   [--shutdown-script CMD]\n"
    "\n"
    "Runs a relay and an agent in this process on loopback, with new tokens, and this\n"
    "directory as the workspace. Prints the commands that reach it. Ctrl-C stops it.\n"
    "\n"
    "  --listen ADDR:PORT  where the relay listens (default " DEMO_DEFAULT_LISTEN ")\n"
    "  --name WORKSPACE    the workspace's name (default demo)\n"
    "  --startup-script CMD   run CMD (with /bin/sh -c) as the workspace starts; its output\n"
    "                      is in the workspace's logs (/api/v1/workspaces/NAME/logs)\n"
    "  --shutdown-script CMD  run CMD when the demo stops, before sessions are hung up\n"
    "  --log-level LEVEL   error, warn, info (default) or debug\n"
    "  -h, --help          this text\n";

struct demo {
    struct cli_runtime rt;
    struct relay *relay;
    struct agent *agent;
    struct sshd_config ssh;
    struct lifecycle_config lifecycle;
    bool stopping;
    char cwd[1024];
    uv_timer_t grace;
    char dir[256];
    char tokens_path[300];
    char user_token_path[300];
    char agent_token[2 * DEMO_TOKEN_BYTES + 1];
};

static int random_hex(char *out, size_t bytes)
{
    unsigned char raw[64];
    if (bytes > sizeof(raw) || getrandom(raw, bytes, 0) != (ssize_t)bytes)
        return -1;
    for (size_t i = 0; i < bytes; i++)
        sprintf(out + 2 * i, "%02x", raw[i]);
    return 0;
}

static int write_private(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -1;
    fchmod(fd, 0600);
    size_t n = strlen(text);
    int rc = write(fd, text, n) == (ssize_t)n ? 0 : -1;
    close(fd);
    return rc;
}

/* A private directory for the demo's token files: $XDG_RUNTIME_DIR or /tmp, mode 0700. */
static int make_state_dir(struct demo *d)
{
    const char *base = getenv("XDG_RUNTIME_DIR");
    if (base && *base)
        snprintf(d->dir, sizeof(d->dir), "%s/tether-demo", base);
    else
        snprintf(d->dir, sizeof(d->dir), "/tmp/tether-demo-%u", (unsigned)getuid());
    if (mkdir(d->dir, 0700) < 0 && errno != EEXIST)
        return -1;
    struct stat st;
    if (lstat(d->dir, &st) < 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 077)) {
        errno = EPERM;
        return -1;
    }
    return 0;
}

static int write_tokens(struct demo *d, const char *name)
{
    char user_token[2 * DEMO_TOKEN_BYTES + 1];
    if (random_hex(d->agent_token, DEMO_TOKEN_BYTES) < 0 ||
        random_hex(user_token, DEMO_TOKEN_BYTES) < 0)
        return -1;
    char json[512];
    snprintf(json, sizeof(json), "{\"agents\": {\"%s\": \"%s\"}, \"users\": {\"%s\": [\"*\"]}}\n",
             d->agent_token, name, user_token);
    snprintf(d->tokens_path, sizeof(d->tokens_path), "%s/tokens.json", d->dir);
    snprintf(d->user_token_path, sizeof(d->user_token_path), "%s/user.token", d->dir);
    char line[80];
    snprintf(line, sizeof(line), "%s\n", user_token);
    return write_private(d->tokens_path, json) < 0 || write_private(d->user_token_path, line) < 0
               ? -1
               : 0;
}

static void on_grace(uv_timer_t *t)
{
    struct demo *d = t->data;
    uv_close((uv_handle_t *)t, NULL);
    cli_runtime_stop(&d->rt);
}

static void on_agent_stopped(void *arg)
{
    struct demo *d = arg;
    relay_stop(d->relay);
    uv_timer_init(&d->rt.loop, &d->grace);
    d->grace.data = d;
    uv_timer_start(&d->grace, on_grace, 100, 0);
}

static void on_demo_signal(struct cli_runtime *rt, int signum)
{
    struct demo *d = rt->ud;
    (void)signum;
    if (d->stopping)
        return; /* the handles stay open so that a second Ctrl-C cannot cut the shutdown */
    d->stopping = true;
    log_info("stopping the demo");
    agent_stop(d->agent, on_agent_stopped, d);
}

/* The command to print: "tether" if that is what PATH finds, else this binary's path. */
static void self_command(char *out, size_t len)
{
    char self[512], found[512];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    snprintf(out, len, "tether");
    if (n <= 0)
        return;
    self[n] = '\0';
    const char *path = getenv("PATH");
    while (path && *path) {
        size_t dl = strcspn(path, ":");
        snprintf(found, sizeof(found), "%.*s/tether", (int)dl, path);
        char real[512];
        if (realpath(found, real) && strcmp(real, self) == 0)
            return;
        path += dl + (path[dl] == ':');
    }
    snprintf(out, len, "%s", self);
}

static void print_instructions(struct demo *d, const char *name, const char *url)
{
    char cwd[1024], cmd[512];
    if (!getcwd(cwd, sizeof(cwd)))
        snprintf(cwd, sizeof(cwd), ".");
    self_command(cmd, sizeof(cmd));
    printf("tether demo: relay on %s, workspace \"%s\" is %s\n\n", url, name, cwd);
    printf("In another terminal:\n");
    printf("  %s status  --url %s --token-file %s\n", cmd, url, d->user_token_path);
    printf("  %s forward --url %s --token-file %s %s 8080:8080\n", cmd, url, d->user_token_path,
           name);
    printf("    (then connections to 127.0.0.1:8080 reach port 8080 in the workspace)\n");
    printf("  ssh -o ProxyCommand='%s ssh-proxy --url %s --token-file %s %s' \\\n"
           "      -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null tether.%s\n\n",
           cmd, url, d->user_token_path, name, name);
    printf("In a browser, a terminal in the workspace (log in with the token in %s):\n"
           "  http://%s/w/%s\n\n",
           d->user_token_path, strncmp(url, "ws://", 5) == 0 ? url + 5 : url, name);
    printf("Ctrl-C stops the demo.\n");
    fflush(stdout);
}

static int demo_run(struct demo *d, const char *listen, const char *name)
{
    char host[256], err[512], url[300];
    int port;
    if (cli_hostport(listen, host, sizeof(host), &port) < 0) {
        cli_error("bad --listen '%s': expected ADDR:PORT", listen);
        return EXIT_USAGE;
    }
    if (make_state_dir(d) < 0 || write_tokens(d, name) < 0) {
        cli_error("cannot write the demo's tokens under %s: %s", d->dir, strerror(errno));
        return EXIT_FAIL;
    }
    struct relay_config rc;
    relay_config_default(&rc);
    rc.tokens_path = d->tokens_path;
    d->relay = relay_new(&d->rt.loop, &rc, err, sizeof(err));
    if (!d->relay) {
        cli_error("%s", err);
        return EXIT_FAIL;
    }
    struct wsctx_server srv = {
        .protocols = relay_protocols(),
        .listen_host = host,
        .listen_port = port,
        .user = d->relay,
    };
    struct wsctx_config wc = {.server = &srv};
    d->rt.on_signal = on_demo_signal;
    d->rt.ud = d;
    if (cli_runtime_init(&d->rt, &wc) < 0) {
        relay_free(d->relay);
        return EXIT_FAIL;
    }
    relay_start(d->relay);
    snprintf(url, sizeof(url), "ws://%s%s%s:%d", strchr(host, ':') ? "[" : "", host,
             strchr(host, ':') ? "]" : "", wsctx_listen_port(&d->rt.ws));

    struct dial_config dc;
    dial_config_default(&dc);
    dc.ws = &d->rt.ws;
    dc.token = d->agent_token;
    /* The demo's sessions start in the current directory; its host key is temporary. */
    d->ssh.state_dir = d->dir;
    d->ssh.workdir = getcwd(d->cwd, sizeof(d->cwd)) ? d->cwd : NULL;
    struct sshd *sshd = sshd_new(&d->rt.loop, &d->ssh, err, sizeof(err));
    if (!sshd)
        log_warn("SSH is off: %s", err);
    if (url_parse(url, &dc.url, err, sizeof(err)) < 0 ||
        !(d->agent =
              agent_new(&d->rt.loop, &dc, sshd,
                        &(struct agent_options){.lifecycle = &d->lifecycle, .keep_log_local = true},
                        NULL, NULL))) {
        if (sshd)
            sshd_free(sshd, NULL, NULL);
        cli_error("cannot start the agent");
        relay_stop(d->relay);
        cli_runtime_stop(&d->rt);
        uv_run(&d->rt.loop, UV_RUN_DEFAULT);
        cli_runtime_finish(&d->rt);
        relay_free(d->relay);
        return EXIT_FAIL;
    }
    agent_start(d->agent);
    print_instructions(d, name, url);
    uv_run(&d->rt.loop, UV_RUN_DEFAULT);
    cli_runtime_finish(&d->rt);
    relay_free(d->relay);
    return EXIT_OK;
}

int cmd_demo(int argc, char **argv)
{
    static const struct option opts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"name", required_argument, NULL, 'n'},
        {"startup-script", required_argument, NULL, 'a'},
        {"shutdown-script", required_argument, NULL, 'z'},
        CLI_OPTS_END,
    };
    struct lifecycle_config lc;
    lifecycle_config_default(&lc);
    const char *listen = DEMO_DEFAULT_LISTEN, *name = "demo";
    const struct cli_shared sh = {.command = "demo", .usage = demo_usage};
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        switch (c) {
        case 'l':
            listen = optarg;
            continue;
        case 'n':
            name = optarg;
            continue;
        case 'a':
            lc.startup_script = optarg;
            continue;
        case 'z':
            lc.shutdown_script = optarg;
            continue;
        }
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (optind != argc) {
        cli_error("unexpected argument '%s'", argv[optind]);
        return EXIT_USAGE;
    }
    if (!tokens_name_valid(name)) {
        cli_error("bad --name '%s': use letters, digits, '.', '-' and '_'", name);
        return EXIT_USAGE;
    }
    struct demo *d = calloc(1, sizeof(*d));
    if (!d)
        return EXIT_FAIL;
    d->lifecycle = lc;
    int rc = demo_run(d, listen, name);
    free(d);
    return rc;
}
