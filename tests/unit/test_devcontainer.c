/* devcontainer.json: JSONC stripping, hooks, forwardPorts, remoteEnv, limits, loading. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "agent/devcontainer.h"

/* Parses text, which must succeed. */
static struct devcontainer *parse_ok(const char *text, const char *ws, char *const *envp)
{
    char err[512] = "";
    struct devcontainer *dc = devcontainer_parse(text, strlen(text), ws, envp, err, sizeof(err));
    if (!dc)
        fail_msg("parse failed: %s\n%s", err, text);
    return dc;
}

/* Parses text, which must fail with a reason containing want. */
static void parse_fails(const char *text, const char *want)
{
    char err[512] = "";
    struct devcontainer *dc =
        devcontainer_parse(text, strlen(text), "/work/proj", NULL, err, sizeof(err));
    if (dc) {
        devcontainer_free(dc);
        fail_msg("parse succeeded, wanted \"%s\":\n%s", want, text);
    }
    if (!strstr(err, want))
        fail_msg("reason \"%s\" lacks \"%s\"", err, want);
    assert_null(strchr(err, '\n')); /* one line */
}

static void strip_eq(const char *in, const char *want)
{
    size_t len = strlen(in);
    char *buf = strdup(in);
    assert_non_null(buf);
    devcontainer_strip_jsonc(buf, len);
    assert_int_equal(strlen(want), len); /* the test's own expectation keeps the length */
    assert_string_equal(buf, want);
    free(buf);
}

/* Growable text for generated inputs. */
struct text {
    char *p;
    size_t len;
};

static void text_add(struct text *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    assert_true(n >= 0);
    t->p = realloc(t->p, t->len + (size_t)n + 1);
    assert_non_null(t->p);
    va_start(ap, fmt);
    vsnprintf(t->p + t->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

/* ---- stripping ---- */

static void test_strip_comments(void **state)
{
    (void)state;
    strip_eq("{\"a\": 1 // note\n}", "{\"a\": 1        \n}");
    strip_eq("{/* x\ny */\"a\":1}", "{    \n    \"a\":1}"); /* the line break stays */
    strip_eq("// only\n[1]", "       \n[1]");
    strip_eq("[1] // no newline at the end", "[1]                         ");
    /* Comment openers inside strings, and an escaped quote before one, are text. */
    strip_eq("{\"u\": \"http://x/*y*/\"}", "{\"u\": \"http://x/*y*/\"}");
    strip_eq("[\"a\\\" // b\"]", "[\"a\\\" // b\"]");
    strip_eq("[\"a\\\\\" // b\n]", "[\"a\\\\\"     \n]");
    /* A comment right after a value and before a comma. */
    strip_eq("[1/**/,2]", "[1    ,2]");
}

static void test_strip_trailing_commas(void **state)
{
    (void)state;
    strip_eq("{\"a\":1,}", "{\"a\":1 }");
    strip_eq("[1,2,\n]", "[1,2 \n]");
    strip_eq("[[1,],{\"b\":[],},]", "[[1 ],{\"b\":[] } ]");
    strip_eq("[1, // last\n /* really */ ]", "[1         \n              ]");
    strip_eq("[\",]\"]", "[\",]\"]"); /* in a string */
    /* Commas that are not after a value stay, so the parser still rejects them. */
    strip_eq("[,]", "[,]");
    strip_eq("[1,,]", "[1,,]");
    strip_eq("{\"a\":,}", "{\"a\":,}");
}

static void test_strip_unterminated(void **state)
{
    (void)state;
    strip_eq("{} /* open", "{} /* open");
    /* Valid JSON before it must not hide the error. */
    parse_fails("{\"forwardPorts\": [1]}\n/* not closed", "line 2");
    parse_fails("{\"a\": \"not closed", "line 1");
}

/* ---- hooks ---- */

static void test_hook_string(void **state)
{
    (void)state;
    struct devcontainer *dc =
        parse_ok("{\"postStartCommand\": \"make -j8 && echo 'done'\"}", "/w", NULL);
    assert_int_equal(dc->n_post_start, 1);
    assert_int_equal(dc->n_post_attach, 0);
    assert_string_equal(dc->post_start[0].name, "");
    char **a = dc->post_start[0].argv;
    assert_string_equal(a[0], "/bin/sh");
    assert_string_equal(a[1], "-c");
    assert_string_equal(a[2], "make -j8 && echo 'done'");
    assert_null(a[3]);
    devcontainer_free(dc);
}

static void test_hook_array(void **state)
{
    (void)state;
    struct devcontainer *dc =
        parse_ok("{\"postAttachCommand\": [\"npm\", \"run\", \"dev server\", \"\"]}", "/w", NULL);
    assert_int_equal(dc->n_post_attach, 1);
    assert_int_equal(dc->n_post_start, 0);
    char **a = dc->post_attach[0].argv;
    const char *want[] = {"/bin/sh", "-c", "exec \"$@\"", "sh", "npm", "run", "dev server", ""};
    for (size_t i = 0; i < 8; i++)
        assert_string_equal(a[i], want[i]);
    assert_null(a[8]);
    devcontainer_free(dc);
}

static void test_hook_object_in_order(void **state)
{
    (void)state;
    struct devcontainer *dc = parse_ok("{\"postStartCommand\": {\n"
                                       "  \"zeta\": \"redis-server\",\n"
                                       "  \"alpha\": [\"make\", \"watch\"],\n"
                                       "  \"skipped\": \"  \",\n"
                                       "  \"m.1_x-y\": \"true\",\n"
                                       "}}",
                                       "/w", NULL);
    assert_int_equal(dc->n_post_start, 3); /* the blank one is no command */
    assert_string_equal(dc->post_start[0].name, "zeta");
    assert_string_equal(dc->post_start[0].argv[2], "redis-server");
    assert_string_equal(dc->post_start[1].name, "alpha");
    assert_string_equal(dc->post_start[1].argv[4], "make");
    assert_string_equal(dc->post_start[1].argv[5], "watch");
    assert_null(dc->post_start[1].argv[6]);
    assert_string_equal(dc->post_start[2].name, "m.1_x-y");
    devcontainer_free(dc);
}

static void test_hook_absent_or_empty(void **state)
{
    (void)state;
    const char *texts[] = {"{}",
                           "{\"postStartCommand\": \"\"}",
                           "{\"postStartCommand\": []}",
                           "{\"postStartCommand\": {}}",
                           "{\"postStartCommand\": null}",
                           "{\"postStartCommand\": \" \\n\\t\"}"};
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        struct devcontainer *dc = parse_ok(texts[i], "/w", NULL);
        assert_int_equal(dc->n_post_start, 0);
        assert_null(dc->post_start);
        assert_int_equal(dc->n_ports, 0);
        assert_int_equal(dc->n_env, 0);
        assert_non_null(dc->env);
        assert_null(dc->env[0]);
        devcontainer_free(dc);
    }
}

static void test_hook_wrong_types(void **state)
{
    (void)state;
    parse_fails("{\"postStartCommand\": 42}", "postStartCommand: must be a string, an array");
    parse_fails("{\"postAttachCommand\": true}", "postAttachCommand: must be");
    parse_fails("{\"postStartCommand\": [\"ls\", 1]}", "postStartCommand[1]: must be a string");
    parse_fails("{\"postStartCommand\": [\"\", \"x\"]}", "postStartCommand[0]: the program");
    parse_fails("{\"postStartCommand\": {\"a\": {\"b\": \"c\"}}}",
                "postStartCommand.a: must be a string or an array");
    parse_fails("{\"postStartCommand\": {\"a\": [\"x\", null]}}", "postStartCommand.a[1]");
    parse_fails("{\"postStartCommand\": {\"a b\": \"x\"}}",
                "command name \"a b\" must be 1..33 bytes of A-Za-z0-9._-");
    parse_fails("{\"postStartCommand\": {\"\": \"x\"}}", "command name \"\"");
    parse_fails("{\"postStartCommand\": {\"a:b\": \"x\"}}", "command name \"a:b\"");
    parse_fails("{\"postStartCommand\": \"a\\u0000b\"}", "must not contain \\u0000");
    parse_fails("[]", "the top level must be an object");
    parse_fails("\"x\"", "line 1");
}

static void test_unknown_and_duplicate_members(void **state)
{
    (void)state;
    struct devcontainer *dc = parse_ok("{\"image\": \"debian\", \"customizations\": {\"x\": [1]},\n"
                                       " \"postStartCommand\": \"first\",\n"
                                       " \"postStartCommand\": \"second\"}",
                                       "/w", NULL);
    assert_int_equal(dc->n_post_start, 1);
    assert_string_equal(dc->post_start[0].argv[2], "second");
    devcontainer_free(dc);
}

/* ---- forwardPorts ---- */

static void test_ports(void **state)
{
    (void)state;
    struct devcontainer *dc =
        parse_ok("{\"forwardPorts\": [3000, \"8080\", \"db:5432\", \"my-svc.local_1:65535\", 1,],}",
                 "/w", NULL);
    assert_int_equal(dc->n_ports, 5);
    assert_int_equal(dc->ports[0].port, 3000);
    assert_string_equal(dc->ports[0].host, "");
    assert_int_equal(dc->ports[1].port, 8080);
    assert_string_equal(dc->ports[1].host, "");
    assert_int_equal(dc->ports[2].port, 5432);
    assert_string_equal(dc->ports[2].host, "db");
    assert_int_equal(dc->ports[3].port, 65535);
    assert_string_equal(dc->ports[3].host, "my-svc.local_1");
    assert_int_equal(dc->ports[4].port, 1);
    devcontainer_free(dc);
}

static void test_bad_ports(void **state)
{
    (void)state;
    parse_fails("{\"forwardPorts\": 3000}", "forwardPorts: must be an array");
    parse_fails("{\"forwardPorts\": [0]}", "forwardPorts[0]: 0 is not a port");
    parse_fails("{\"forwardPorts\": [80, 65536]}", "forwardPorts[1]: 65536 is not a port");
    parse_fails("{\"forwardPorts\": [-1]}", "is not a port");
    parse_fails("{\"forwardPorts\": [3000.5]}", "forwardPorts[0]: must be a port number");
    parse_fails("{\"forwardPorts\": [true]}", "forwardPorts[0]: must be a port number");
    const char *bad[] = {"db:", ":80", "a b:80", "db:0",     "db:70000", "x",
                         "",    "+80", "080000", "db:80:81", "[::1]:80", "db: 80"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char text[128];
        snprintf(text, sizeof(text), "{\"forwardPorts\": [\"%s\"]}", bad[i]);
        parse_fails(text, "is not PORT or HOST:PORT");
    }
}

/* ---- remoteEnv ---- */

static void test_env_substitution(void **state)
{
    (void)state;
    char *envp[] = {"PATH=/usr/bin:/bin", "EMPTY=", "HOME=/home/dev", NULL};
    struct devcontainer *dc =
        parse_ok("{\"remoteEnv\": {\n"
                 "  \"PATH\": \"${containerEnv:PATH}:/opt/bin\",\n"
                 "  \"A\": \"${containerEnv:MISSING:fallback}\",\n"
                 "  \"B\": \"${containerEnv:HOME:unused}\",\n"
                 "  \"C\": \"[${containerEnv:MISSING}]\",\n"
                 "  \"D\": \"[${containerEnv:EMPTY:dflt}]\",\n"
                 "  \"E\": \"${localEnv:USER:nobody} ${localEnv:USER} ${env:X:y}\",\n"
                 "  \"F\": \"${containerWorkspaceFolder}/src\",\n"
                 "  \"G\": \"${containerWorkspaceFolderBasename}\",\n"
                 "  \"H\": \"${devcontainerId} ${containerEnv:1BAD} ${nope\",\n"
                 "  \"I\": \"${containerEnv:MISSING:http://a:1}\",\n"
                 "  \"UNSET_ME\": null,\n"
                 "  \"_plain9\": \"no substitutions $HOME ${\",\n"
                 "}}",
                 "/work/proj/", envp);
    const char *want[] = {"PATH=/usr/bin:/bin:/opt/bin",
                          "A=fallback",
                          "B=/home/dev",
                          "C=[]",
                          "D=[]",
                          "E=nobody  y",
                          "F=/work/proj//src",
                          "G=proj",
                          "H=${devcontainerId} ${containerEnv:1BAD} ${nope",
                          "I=http://a:1",
                          "UNSET_ME",
                          "_plain9=no substitutions $HOME ${"};
    size_t n = sizeof(want) / sizeof(want[0]);
    assert_int_equal(dc->n_env, n);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(dc->env[i], want[i]);
    assert_null(dc->env[n]);
    devcontainer_free(dc);
}

static void test_env_without_context(void **state)
{
    (void)state;
    /* No envp: containerEnv gives its default or ""; no workspace: its forms stay. */
    struct devcontainer *dc = parse_ok("{\"remoteEnv\": {\"P\": \"${containerEnv:PATH:/bin}\","
                                       " \"Q\": \"${containerEnv:PATH}\","
                                       " \"W\": \"${containerWorkspaceFolder}\"}}",
                                       NULL, NULL);
    assert_int_equal(dc->n_env, 3);
    assert_string_equal(dc->env[0], "P=/bin");
    assert_string_equal(dc->env[1], "Q=");
    assert_string_equal(dc->env[2], "W=${containerWorkspaceFolder}");
    devcontainer_free(dc);
    /* A value that itself holds a form is not expanded again. */
    char *envp[] = {"X=${containerWorkspaceFolder}", NULL};
    dc = parse_ok("{\"remoteEnv\": {\"Y\": \"${containerEnv:X}\"}}", "/w", envp);
    assert_string_equal(dc->env[0], "Y=${containerWorkspaceFolder}");
    devcontainer_free(dc);
}

static void test_env_bad(void **state)
{
    (void)state;
    parse_fails("{\"remoteEnv\": [\"A=b\"]}", "remoteEnv: must be an object");
    parse_fails("{\"remoteEnv\": {\"1A\": \"x\"}}", "\"1A\" is not a variable name");
    parse_fails("{\"remoteEnv\": {\"A=B\": \"x\"}}", "\"A=B\" is not a variable name");
    parse_fails("{\"remoteEnv\": {\"\": \"x\"}}", "\"\" is not a variable name");
    parse_fails("{\"remoteEnv\": {\"A\": 1}}", "remoteEnv.A: must be a string");
    parse_fails("{\"remoteEnv\": {\"A\": \"x\\u0000y\"}}", "line 1, column 30: strings must not");
    parse_fails("{\"remoteEnv\": {\"A\\u0000\": \"x\"}}", "must not contain \\u0000");
}

/* ---- malformed JSON ---- */

static void test_malformed_json_line(void **state)
{
    (void)state;
    parse_fails("{\n  // fine\n  \"a\": [1, 2\n  \"b\": 3\n}", "line 4, column");
    parse_fails("{\"a\": 1} trailing", "line 1");
    parse_fails("", "line 1");
    parse_fails("{\"a\": \"\xff\"}", "line 1");       /* invalid UTF-8 */
    parse_fails("{\"a\": \"raw\nbreak\"}", "line 1"); /* and the reason is still one line */
}

/* ---- limits ---- */

static void test_limit_commands(void **state)
{
    (void)state;
    for (unsigned n = DEVCONTAINER_MAX_COMMANDS; n <= DEVCONTAINER_MAX_COMMANDS + 1; n++) {
        struct text t = {0};
        text_add(&t, "{\"postStartCommand\": {");
        for (unsigned i = 0; i < n; i++)
            text_add(&t, "%s\"c%u\": \"true\"", i ? "," : "", i);
        text_add(&t, "}}");
        if (n == DEVCONTAINER_MAX_COMMANDS) {
            struct devcontainer *dc = parse_ok(t.p, "/w", NULL);
            assert_int_equal(dc->n_post_start, n);
            assert_string_equal(dc->post_start[n - 1].name, "c31");
            devcontainer_free(dc);
        } else {
            parse_fails(t.p, "postStartCommand: 33 commands, at most 32");
        }
        free(t.p);
    }
}

static void test_limit_args(void **state)
{
    (void)state;
    for (unsigned n = DEVCONTAINER_MAX_ARGS; n <= DEVCONTAINER_MAX_ARGS + 1; n++) {
        struct text t = {0};
        text_add(&t, "{\"postAttachCommand\": {\"x\": [");
        for (unsigned i = 0; i < n; i++)
            text_add(&t, "%s\"a%u\"", i ? "," : "", i);
        text_add(&t, "]}}");
        if (n == DEVCONTAINER_MAX_ARGS) {
            struct devcontainer *dc = parse_ok(t.p, "/w", NULL);
            assert_string_equal(dc->post_attach[0].argv[4 + n - 1], "a255");
            assert_null(dc->post_attach[0].argv[4 + n]);
            devcontainer_free(dc);
        } else {
            parse_fails(t.p, "postAttachCommand.x: 257 arguments, at most 256");
        }
        free(t.p);
    }
}

static void test_limit_name_and_host(void **state)
{
    (void)state;
    char name[DEVCONTAINER_MAX_NAME + 2];
    memset(name, 'n', sizeof(name) - 1);
    name[DEVCONTAINER_MAX_NAME] = '\0';
    char text[1024];
    snprintf(text, sizeof(text), "{\"postStartCommand\": {\"%s\": \"x\"}}", name);
    struct devcontainer *dc = parse_ok(text, "/w", NULL);
    assert_string_equal(dc->post_start[0].name, name);
    devcontainer_free(dc);
    name[DEVCONTAINER_MAX_NAME] = 'n';
    name[DEVCONTAINER_MAX_NAME + 1] = '\0';
    snprintf(text, sizeof(text), "{\"postStartCommand\": {\"%s\": \"x\"}}", name);
    parse_fails(text, "must be 1..33 bytes");

    char host[257];
    memset(host, 'h', 255);
    host[255] = '\0';
    snprintf(text, sizeof(text), "{\"forwardPorts\": [\"%s:80\"]}", host);
    dc = parse_ok(text, "/w", NULL);
    assert_string_equal(dc->ports[0].host, host);
    devcontainer_free(dc);
    strcpy(host + 255, "h");
    snprintf(text, sizeof(text), "{\"forwardPorts\": [\"%s:80\"]}", host);
    parse_fails(text, "is not PORT or HOST:PORT");
}

static void test_limit_ports_and_env(void **state)
{
    (void)state;
    for (unsigned n = DEVCONTAINER_MAX_PORTS; n <= DEVCONTAINER_MAX_PORTS + 1; n++) {
        struct text t = {0};
        text_add(&t, "{\"forwardPorts\": [");
        for (unsigned i = 0; i < n; i++)
            text_add(&t, "%s%u", i ? "," : "", 1000 + i);
        text_add(&t, "]}");
        if (n == DEVCONTAINER_MAX_PORTS) {
            struct devcontainer *dc = parse_ok(t.p, "/w", NULL);
            assert_int_equal(dc->n_ports, n);
            assert_int_equal(dc->ports[n - 1].port, 1000 + n - 1);
            devcontainer_free(dc);
        } else {
            parse_fails(t.p, "forwardPorts: 65 ports, at most 64");
        }
        free(t.p);
    }
    for (unsigned n = DEVCONTAINER_MAX_ENV; n <= DEVCONTAINER_MAX_ENV + 1; n++) {
        struct text t = {0};
        text_add(&t, "{\"remoteEnv\": {");
        for (unsigned i = 0; i < n; i++)
            text_add(&t, "%s\"V%u\": \"%u\"", i ? "," : "", i, i);
        text_add(&t, "}}");
        if (n == DEVCONTAINER_MAX_ENV) {
            struct devcontainer *dc = parse_ok(t.p, "/w", NULL);
            assert_int_equal(dc->n_env, n);
            assert_string_equal(dc->env[n - 1], "V255=255");
            assert_null(dc->env[n]);
            devcontainer_free(dc);
        } else {
            parse_fails(t.p, "remoteEnv: 257 variables, at most 256");
        }
        free(t.p);
    }
}

static void test_limit_env_entry(void **state)
{
    (void)state;
    /* 64 KiB of container variable, used twice: 2 + 2 * 65536 bytes > the entry limit, from
     * a small file. Exactly at the limit still works. */
    size_t big = 65536;
    char *var = malloc(big + 3);
    assert_non_null(var);
    memcpy(var, "B=", 2);
    memset(var + 2, 'x', big);
    var[big + 2] = '\0';
    char *envp[] = {var, NULL};
    char err[512];
    const char *twice = "{\"remoteEnv\": {\"A\": \"${containerEnv:B}${containerEnv:B}\"}}";
    assert_null(devcontainer_parse(twice, strlen(twice), "/w", envp, err, sizeof(err)));
    assert_non_null(strstr(err, "remoteEnv.A: longer than 131071 bytes after substitution"));

    /* "A=" + 65536 + 65533 = 131071. */
    char text[256];
    snprintf(text, sizeof(text),
             "{\"remoteEnv\": {\"A\": \"${containerEnv:B}${containerEnv:C}\"}}");
    char *c = malloc(65533 + 3);
    assert_non_null(c);
    memcpy(c, "C=", 2);
    memset(c + 2, 'y', 65533);
    c[65533 + 2] = '\0';
    char *envp2[] = {var, c, NULL};
    struct devcontainer *dc = parse_ok(text, "/w", envp2);
    assert_int_equal(strlen(dc->env[0]), DEVCONTAINER_MAX_ENV_ENTRY);
    devcontainer_free(dc);
    free(c);
    free(var);
}

static void test_limit_bytes(void **state)
{
    (void)state;
    size_t len = DEVCONTAINER_MAX_BYTES + 1;
    char *text = malloc(len);
    assert_non_null(text);
    memset(text, ' ', len);
    text[0] = '{';
    text[len - 1] = '}';
    char err[256];
    assert_null(devcontainer_parse(text, len, "/w", NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "at most 1048576"));
    /* One byte less parses. */
    text[len - 2] = '}';
    struct devcontainer *dc = devcontainer_parse(text, len - 1, "/w", NULL, err, sizeof(err));
    assert_non_null(dc);
    devcontainer_free(dc);
    free(text);
    devcontainer_free(NULL);
}

/* ---- loading ---- */

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

static void remove_in(const char *dir, const char *name)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    assert_int_equal(remove(path), 0);
}

static void test_load(void **state)
{
    (void)state;
    char dir[] = "/tmp/test_devcontainer.XXXXXX";
    assert_non_null(mkdtemp(dir));
    char err[512] = "";
    struct devcontainer *dc = (struct devcontainer *)1;

    /* Absent: not an error. */
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), 0);
    assert_null(dc);

    /* The second location. */
    write_file(dir, ".devcontainer.json", "{\"postStartCommand\": \"second\"}");
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), 0);
    assert_non_null(dc);
    assert_string_equal(dc->post_start[0].argv[2], "second");
    devcontainer_free(dc);

    /* The first location wins, and feeds the workspace directory to substitution. */
    char sub[600];
    snprintf(sub, sizeof(sub), "%s/.devcontainer", dir);
    assert_int_equal(mkdir(sub, 0755), 0);
    write_file(dir, ".devcontainer/devcontainer.json",
               "// jsonc\n{\"postStartCommand\": \"first\",\n"
               " \"remoteEnv\": {\"W\": \"${containerWorkspaceFolder}\"},}");
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), 0);
    assert_non_null(dc);
    assert_string_equal(dc->post_start[0].argv[2], "first");
    char want[600];
    snprintf(want, sizeof(want), "W=%s", dir);
    assert_string_equal(dc->env[0], want);
    devcontainer_free(dc);

    /* A symlink to a regular file is followed. */
    snprintf(sub, sizeof(sub), "%s/.devcontainer/devcontainer.json", dir);
    assert_int_equal(unlink(sub), 0);
    write_file(dir, "real.json", "{\"postStartCommand\": \"linked\"}");
    assert_int_equal(symlink("../real.json", sub), 0);
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), 0);
    assert_non_null(dc);
    assert_string_equal(dc->post_start[0].argv[2], "linked");
    devcontainer_free(dc);

    /* Malformed: the path and the line. */
    write_file(dir, "real.json", "{\n\"a\": }");
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), -1);
    assert_null(dc);
    assert_non_null(strstr(err, "/.devcontainer/devcontainer.json: line 2"));

    /* Oversized: refused from its size, before reading. */
    snprintf(sub, sizeof(sub), "%s/real.json", dir);
    assert_int_equal(truncate(sub, DEVCONTAINER_MAX_BYTES + 1), 0);
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "devcontainer.json: 1048577 bytes, at most 1048576"));

    /* A directory where the file should be. */
    snprintf(sub, sizeof(sub), "%s/.devcontainer/devcontainer.json", dir);
    assert_int_equal(unlink(sub), 0);
    assert_int_equal(mkdir(sub, 0755), 0);
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "devcontainer.json: not a regular file"));

    /* .devcontainer as a file: the first location is absent, the second is used. */
    remove_in(dir, ".devcontainer/devcontainer.json");
    remove_in(dir, ".devcontainer");
    write_file(dir, ".devcontainer", "not a directory");
    assert_int_equal(devcontainer_load(dir, NULL, &dc, err, sizeof(err)), 0);
    assert_non_null(dc);
    assert_string_equal(dc->post_start[0].argv[2], "second");
    devcontainer_free(dc);

    remove_in(dir, ".devcontainer");
    remove_in(dir, ".devcontainer.json");
    remove_in(dir, "real.json");
    assert_int_equal(rmdir(dir), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strip_comments),
        cmocka_unit_test(test_strip_trailing_commas),
        cmocka_unit_test(test_strip_unterminated),
        cmocka_unit_test(test_hook_string),
        cmocka_unit_test(test_hook_array),
        cmocka_unit_test(test_hook_object_in_order),
        cmocka_unit_test(test_hook_absent_or_empty),
        cmocka_unit_test(test_hook_wrong_types),
        cmocka_unit_test(test_unknown_and_duplicate_members),
        cmocka_unit_test(test_ports),
        cmocka_unit_test(test_bad_ports),
        cmocka_unit_test(test_env_substitution),
        cmocka_unit_test(test_env_without_context),
        cmocka_unit_test(test_env_bad),
        cmocka_unit_test(test_malformed_json_line),
        cmocka_unit_test(test_limit_commands),
        cmocka_unit_test(test_limit_args),
        cmocka_unit_test(test_limit_name_and_host),
        cmocka_unit_test(test_limit_ports_and_env),
        cmocka_unit_test(test_limit_env_entry),
        cmocka_unit_test(test_limit_bytes),
        cmocka_unit_test(test_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
