/*
 * libFuzzer target for agent/devcontainer.c: a workspace's devcontainer.json, which whoever
 * can push to the repository writes.
 *
 * The input is the file. devcontainer_strip_jsonc runs on an exact-size copy (ASan sees a
 * byte written past it) and must keep line breaks and every byte of every string, only
 * ever blank other bytes to spaces, and change nothing on a second run. devcontainer_parse
 * runs on the input with a workspace folder and a container environment (inputs of odd
 * length: with neither); what it accepts must hold to the header's limits and shapes, and
 * a refusal is one printable line. Everything is freed, so LeakSanitizer sees a leak.
 * Violations abort().
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/devcontainer.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

#define ERR_LEN 256
/* A container variable long enough that a few ${containerEnv:LONG} cross
 * DEVCONTAINER_MAX_ENV_ENTRY. */
#define LONG_VALUE 40000u

/*
 * Where the strings are in the stripped text: past comments (now blanks) and trailing
 * commas, it is JSON; what is left of an unterminated block comment ends the scan.
 * Returns the offset where the scan stopped (len if it reached the end).
 */
static size_t check_strings_kept(const char *in, const char *out, size_t len)
{
    bool str = false;
    for (size_t i = 0; i < len; i++) {
        if (str) {
            CHECK(out[i] == in[i]);
            if (out[i] == '\\' && i + 1 < len) {
                i++;
                CHECK(out[i] == in[i]);
            } else if (out[i] == '"') {
                str = false;
            }
            continue;
        }
        if (out[i] == '/' && i + 1 < len && out[i + 1] == '*')
            return i;
        if (out[i] != in[i])
            CHECK(out[i] == ' ');
        if (out[i] == '"') {
            CHECK(in[i] == '"');
            str = true;
        }
    }
    return len;
}

static void check_strip(const uint8_t *data, size_t size)
{
    char *out = malloc(size ? size : 1), *again = malloc(size ? size : 1);
    CHECK(out && again);
    memcpy(out, data, size);
    devcontainer_strip_jsonc(out, size);
    const char *in = (const char *)data;
    for (size_t i = 0; i < size; i++) {
        if (out[i] != in[i])
            CHECK(out[i] == ' ' && in[i] != '\n' && in[i] != '\r');
    }
    size_t stop = check_strings_kept(in, out, size);
    /* An unterminated block comment is left for the parser to report. */
    CHECK(memcmp(out + stop, in + stop, size - stop) == 0);
    memcpy(again, out, size);
    devcontainer_strip_jsonc(again, size);
    CHECK(memcmp(again, out, size) == 0);
    free(again);
    free(out);
}

static bool name_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    return n >= 1 && n <= max &&
           strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

static void check_commands(const struct dc_command *cmds, size_t n)
{
    CHECK(n <= DEVCONTAINER_MAX_COMMANDS);
    CHECK((n == 0) == (cmds == NULL));
    for (size_t i = 0; i < n; i++) {
        const struct dc_command *c = &cmds[i];
        CHECK(c->name[0] == '\0' || name_ok(c->name, DEVCONTAINER_MAX_NAME));
        CHECK(n == 1 || c->name[0] != '\0');
        char **argv = c->argv;
        CHECK(argv && argv[0] && argv[1] && argv[2]);
        CHECK(strcmp(argv[0], "/bin/sh") == 0 && strcmp(argv[1], "-c") == 0);
        size_t k = 0;
        while (argv[k])
            k++;
        if (k == 3) {
            CHECK(argv[2][strspn(argv[2], " \t\r\n")] != '\0'); /* blank ones are skipped */
        } else {
            CHECK(k >= 5 && k <= 4 + DEVCONTAINER_MAX_ARGS);
            CHECK(strcmp(argv[2], "exec \"$@\"") == 0 && strcmp(argv[3], "sh") == 0);
            CHECK(argv[4][0] != '\0');
        }
    }
}

static void check_parsed(const struct devcontainer *dc)
{
    check_commands(dc->post_start, dc->n_post_start);
    check_commands(dc->post_attach, dc->n_post_attach);
    CHECK(dc->n_ports <= DEVCONTAINER_MAX_PORTS);
    for (size_t i = 0; i < dc->n_ports; i++) {
        const struct dc_port *p = &dc->ports[i];
        CHECK(p->port >= 1);
        CHECK(memchr(p->host, '\0', sizeof(p->host)) != NULL);
        CHECK(p->host[0] == '\0' || name_ok(p->host, sizeof(p->host) - 1));
    }
    CHECK(dc->env != NULL && dc->n_env <= DEVCONTAINER_MAX_ENV);
    CHECK(dc->env[dc->n_env] == NULL);
    for (size_t i = 0; i < dc->n_env; i++) {
        const char *e = dc->env[i];
        CHECK(e != NULL && strlen(e) <= DEVCONTAINER_MAX_ENV_ENTRY);
        size_t nl = strcspn(e, "=");
        CHECK(nl >= 1 && !(e[0] >= '0' && e[0] <= '9'));
        for (size_t k = 0; k < nl; k++)
            CHECK(e[k] == '_' || (e[k] >= 'A' && e[k] <= 'Z') || (e[k] >= 'a' && e[k] <= 'z') ||
                  (e[k] >= '0' && e[k] <= '9'));
    }
}

static void check_parse(const uint8_t *data, size_t size)
{
    char *long_env = malloc(sizeof("LONG=") + LONG_VALUE);
    CHECK(long_env != NULL);
    memcpy(long_env, "LONG=", 5);
    memset(long_env + 5, 'x', LONG_VALUE);
    long_env[5 + LONG_VALUE] = '\0';
    char *envp[] = {"HOME=/home/dev", "EMPTY=", "WITH_FORM=${containerEnv:HOME}", long_env, NULL};
    bool ctx = size % 2 == 0;

    char err[ERR_LEN];
    memset(err, 0x5a, sizeof(err));
    err[0] = '\0';
    struct devcontainer *dc =
        devcontainer_parse((const char *)data, size, ctx ? "/workspaces/project/" : NULL,
                           ctx ? envp : NULL, err, sizeof(err));
    if (dc) {
        check_parsed(dc);
        devcontainer_free(dc);
    } else {
        CHECK(memchr(err, '\0', sizeof(err)) != NULL);
        CHECK(err[0] != '\0');
        for (const char *c = err; *c; c++)
            CHECK((unsigned char)*c >= 0x20 && *c != 0x7f); /* one line */
    }
    free(long_env);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > DEVCONTAINER_MAX_BYTES)
        return 0;
    check_strip(data, size);
    check_parse(data, size);
    return 0;
}
