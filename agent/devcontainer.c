#include "devcontainer.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "proto/logbatch.h"
#include "tunnel/readfile.h"

/* A command's name ends a log source "devcontainer:postAttachCommand:NAME" (the longer
 * hook), which must fit the protocol's source limit. */
_Static_assert(sizeof("devcontainer:postAttachCommand:") - 1 + DEVCONTAINER_MAX_NAME <=
                   PROTO_MAX_LOG_SOURCE,
               "command names must fit in a log source");
_Static_assert(DEVCONTAINER_MAX_NAME < sizeof(((struct dc_command *)0)->name),
               "dc_command.name holds a name and its NUL");

#define HOST_MAX (sizeof(((struct dc_port *)0)->host) - 1) /* bytes of a forwardPorts host */
#define SHOW_MAX 40 /* bytes of a name quoted in an error, the rest is cut */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* A name from the file, quoted in a one-line error: non-printable bytes become '?' and
 * long names are cut, so the reason stays one short line. */
static void show(const char *s, char *out, size_t cap)
{
    size_t n = 0;
    for (; s[n] && n < SHOW_MAX && n + 4 < cap; n++)
        out[n] = (s[n] >= 0x20 && s[n] < 0x7f) ? s[n] : '?';
    if (s[n] && n + 4 <= cap) {
        memcpy(out + n, "...", 3);
        n += 3;
    }
    out[n] = '\0';
}

/* ---- JSON with comments ---- */

enum jsonc_state { JSONC_CODE, JSONC_STRING, JSONC_LINE_COMMENT, JSONC_BLOCK_COMMENT };

static void blank(char *text, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        if (text[i] != '\n' && text[i] != '\r')
            text[i] = ' ';
    }
}

/*
 * One pass with four states. A comma is a trailing one when the next significant byte is '}'
 * or ']'; it is remembered (pending) until that byte shows, and only after a value (not after
 * '[', '{', ',' or ':'), so "[,]" stays an error. Line breaks inside comments are kept so the
 * parser's line and column numbers still point into the file. An unterminated block comment
 * is left as it is: the parser then fails at its "/" whatever follows, where blanking it
 * could make "{}" followed by an open comment valid JSON.
 */
void devcontainer_strip_jsonc(char *text, size_t len)
{
    enum jsonc_state st = JSONC_CODE;
    size_t comment_start = 0;
    size_t pending = SIZE_MAX; /* offset of a comma that may be trailing */
    char last = '\0';          /* last significant byte of code */

    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        switch (st) {
        case JSONC_STRING:
            if (c == '\\' && i + 1 < len)
                i++;
            else if (c == '"')
                st = JSONC_CODE;
            break;
        case JSONC_LINE_COMMENT:
            if (c == '\n' || c == '\r') {
                blank(text, comment_start, i);
                st = JSONC_CODE;
            }
            break;
        case JSONC_BLOCK_COMMENT:
            if (c == '*' && i + 1 < len && text[i + 1] == '/') {
                i++;
                blank(text, comment_start, i + 1);
                st = JSONC_CODE;
            }
            break;
        case JSONC_CODE:
            if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
                break;
            if (c == '/' && i + 1 < len && (text[i + 1] == '/' || text[i + 1] == '*')) {
                st = text[i + 1] == '/' ? JSONC_LINE_COMMENT : JSONC_BLOCK_COMMENT;
                comment_start = i++;
                break;
            }
            if ((c == '}' || c == ']') && pending != SIZE_MAX)
                text[pending] = ' ';
            pending = SIZE_MAX;
            if (c == ',' && last != '\0' && !strchr("[{,:", last))
                pending = i;
            if (c == '"')
                st = JSONC_STRING;
            last = c;
            break;
        }
    }
    if (st == JSONC_LINE_COMMENT)
        blank(text, comment_start, len);
}

/* ---- small checks ---- */

/* The string's bytes, or NULL if v is not a string or holds a NUL (which C strings, argv
 * and environ cannot carry). jansson refuses \u0000 without JSON_ALLOW_NUL already; this
 * keeps the rule true whatever the load flags. */
static const char *json_text(const json_t *v)
{
    if (!json_is_string(v))
        return NULL;
    const char *s = json_string_value(v);
    return strlen(s) == json_string_length(v) ? s : NULL;
}

static int name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > DEVCONTAINER_MAX_NAME)
        return 0;
    return strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

static int env_name_ok(const char *s, size_t n)
{
    if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!(c == '_' || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
              (c >= '0' && c <= '9')))
            return 0;
    }
    return 1;
}

static int blank_string(const char *s)
{
    return s[strspn(s, " \t\r\n")] == '\0';
}

/* ---- lifecycle hooks ---- */

static void free_argv(char **argv)
{
    if (!argv)
        return;
    for (char **a = argv; *a; a++)
        free(*a);
    free(argv);
}

static void free_commands(struct dc_command *cmds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free_argv(cmds[i].argv);
    free(cmds);
}

/* argv of n strings (plus the NULL), each copied; NULL when out of memory. */
static char **argv_dup(const char *const *strs, size_t n)
{
    char **argv = calloc(n + 1, sizeof(*argv));
    if (!argv)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        argv[i] = strdup(strs[i]);
        if (!argv[i]) {
            free_argv(argv);
            return NULL;
        }
    }
    return argv;
}

/* A string runs through the shell. */
static char **argv_shell(const char *text)
{
    const char *strs[] = {"/bin/sh", "-c", text};
    return argv_dup(strs, 3);
}

/* An array runs without a shell's parsing: sh only does the PATH lookup and execs it. */
static char **argv_array(const json_t *arr, const char *where, char *err, size_t errlen)
{
    size_t n = json_array_size(arr);
    if (n > DEVCONTAINER_MAX_ARGS) {
        set_err(err, errlen, "%s: %zu arguments, at most %u", where, n, DEVCONTAINER_MAX_ARGS);
        return NULL;
    }
    const char **strs = calloc(n + 4, sizeof(*strs));
    if (!strs) {
        set_err(err, errlen, "%s: out of memory", where);
        return NULL;
    }
    strs[0] = "/bin/sh";
    strs[1] = "-c";
    strs[2] = "exec \"$@\"";
    strs[3] = "sh";
    char **argv = NULL;
    for (size_t i = 0; i < n; i++) {
        strs[4 + i] = json_text(json_array_get(arr, i));
        if (!strs[4 + i]) {
            set_err(err, errlen, "%s[%zu]: must be a string without NUL bytes", where, i);
            goto out;
        }
    }
    if (strs[4][0] == '\0') {
        set_err(err, errlen, "%s[0]: the program must not be empty", where);
        goto out;
    }
    argv = argv_dup(strs, n + 4);
    if (!argv)
        set_err(err, errlen, "%s: out of memory", where);
out:
    free(strs);
    return argv;
}

/*
 * One command from a string or an array. An empty command (a blank string, an empty
 * array) is skipped like the reference CLI does: *argv NULL and 0 returned.
 */
static int command_argv(const json_t *v, const char *where, char ***argv, char *err, size_t errlen)
{
    *argv = NULL;
    if (json_is_string(v)) {
        const char *text = json_text(v);
        if (!text) {
            set_err(err, errlen, "%s: must not contain NUL bytes", where);
            return -1;
        }
        if (blank_string(text))
            return 0;
        *argv = argv_shell(text);
        if (!*argv) {
            set_err(err, errlen, "%s: out of memory", where);
            return -1;
        }
        return 0;
    }
    if (json_is_array(v)) {
        if (json_array_size(v) == 0)
            return 0;
        *argv = argv_array(v, where, err, errlen);
        return *argv ? 0 : -1;
    }
    return -2; /* the caller names the types it accepts */
}

static int hook_object(const json_t *obj, const char *member, struct dc_command **out, size_t *nout,
                       char *err, size_t errlen)
{
    size_t n = json_object_size(obj);
    if (n > DEVCONTAINER_MAX_COMMANDS) {
        set_err(err, errlen, "%s: %zu commands, at most %u", member, n, DEVCONTAINER_MAX_COMMANDS);
        return -1;
    }
    struct dc_command *cmds = calloc(n ? n : 1, sizeof(*cmds));
    if (!cmds) {
        set_err(err, errlen, "%s: out of memory", member);
        return -1;
    }
    size_t k = 0;
    const char *name;
    json_t *v;
    /* jansson keeps insertion order, so commands come in file order. */
    json_object_foreach((json_t *)obj, name, v)
    {
        char where[sizeof("postAttachCommand.") + DEVCONTAINER_MAX_NAME];
        if (!name_ok(name)) {
            char shown[SHOW_MAX + 4];
            show(name, shown, sizeof(shown));
            set_err(err, errlen,
                    "%s: command name \"%s\" must be 1..%u bytes of A-Za-z0-9._- (it becomes "
                    "part of a log source)",
                    member, shown, DEVCONTAINER_MAX_NAME);
            goto fail;
        }
        snprintf(where, sizeof(where), "%s.%s", member, name);
        int rc = command_argv(v, where, &cmds[k].argv, err, errlen);
        if (rc == -2)
            set_err(err, errlen, "%s: must be a string or an array of strings", where);
        if (rc < 0)
            goto fail;
        if (cmds[k].argv) {
            snprintf(cmds[k].name, sizeof(cmds[k].name), "%s", name);
            k++;
        }
    }
    *out = cmds;
    *nout = k;
    return 0;
fail:
    free_commands(cmds, k);
    return -1;
}

static int parse_hook(const json_t *root, const char *member, struct dc_command **out, size_t *nout,
                      char *err, size_t errlen)
{
    *out = NULL;
    *nout = 0;
    const json_t *v = json_object_get(root, member);
    if (!v || json_is_null(v))
        return 0;
    if (json_is_object(v)) {
        if (hook_object(v, member, out, nout, err, errlen) < 0)
            return -1;
        if (*nout == 0) {
            free(*out);
            *out = NULL;
        }
        return 0;
    }
    char **argv;
    int rc = command_argv(v, member, &argv, err, errlen);
    if (rc == -2)
        set_err(err, errlen, "%s: must be a string, an array of strings or an object", member);
    if (rc < 0 || !argv)
        return rc < 0 ? -1 : 0;
    *out = calloc(1, sizeof(**out));
    if (!*out) {
        free_argv(argv);
        set_err(err, errlen, "%s: out of memory", member);
        return -1;
    }
    (*out)->argv = argv;
    *nout = 1;
    return 0;
}

/* ---- forwardPorts ---- */

/* "1".."65535": digits only, at most 5 of them. */
static int port_number(const char *s, size_t n, uint16_t *port)
{
    if (n < 1 || n > 5 || strspn(s, "0123456789") < n)
        return -1;
    unsigned long v = 0;
    for (size_t i = 0; i < n; i++)
        v = v * 10 + (unsigned long)(s[i] - '0');
    if (v < 1 || v > 65535)
        return -1;
    *port = (uint16_t)v;
    return 0;
}

/* "PORT" or "HOST:PORT"; the host charset leaves no room for IPv6 literals or spaces. */
static int port_string(const char *s, struct dc_port *p)
{
    const char *colon = strrchr(s, ':');
    if (!colon)
        return port_number(s, strlen(s), &p->port);
    size_t hlen = (size_t)(colon - s);
    if (hlen < 1 || hlen > HOST_MAX ||
        strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_") != hlen)
        return -1;
    if (port_number(colon + 1, strlen(colon + 1), &p->port) < 0)
        return -1;
    memcpy(p->host, s, hlen);
    p->host[hlen] = '\0';
    return 0;
}

static int parse_ports(const json_t *root, struct devcontainer *dc, char *err, size_t errlen)
{
    const json_t *arr = json_object_get(root, "forwardPorts");
    if (!arr || json_is_null(arr))
        return 0;
    if (!json_is_array(arr)) {
        set_err(err, errlen, "forwardPorts: must be an array");
        return -1;
    }
    size_t n = json_array_size(arr);
    if (n > DEVCONTAINER_MAX_PORTS) {
        set_err(err, errlen, "forwardPorts: %zu ports, at most %u", n, DEVCONTAINER_MAX_PORTS);
        return -1;
    }
    if (n == 0)
        return 0;
    dc->ports = calloc(n, sizeof(*dc->ports));
    if (!dc->ports) {
        set_err(err, errlen, "forwardPorts: out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_array_get(arr, i);
        struct dc_port *p = &dc->ports[i];
        if (json_is_integer(v)) {
            json_int_t num = json_integer_value(v);
            if (num < 1 || num > 65535) {
                set_err(err, errlen, "forwardPorts[%zu]: %lld is not a port (1..65535)", i,
                        (long long)num);
                return -1;
            }
            p->port = (uint16_t)num;
        } else if (json_is_string(v)) {
            const char *s = json_text(v);
            if (!s || port_string(s, p) < 0) {
                char shown[SHOW_MAX + 4];
                show(s ? s : "", shown, sizeof(shown));
                set_err(err, errlen,
                        "forwardPorts[%zu]: \"%s\" is not PORT or HOST:PORT (port 1..65535, "
                        "host 1..%zu bytes of A-Za-z0-9.-_)",
                        i, shown, HOST_MAX);
                return -1;
            }
        } else {
            set_err(err, errlen, "forwardPorts[%zu]: must be a port number or a string", i);
            return -1;
        }
        dc->n_ports = i + 1;
    }
    return 0;
}

/* ---- remoteEnv ---- */

/* A "NAME=value" under construction, never longer than DEVCONTAINER_MAX_ENV_ENTRY. */
struct envbuf {
    char *p;
    size_t len, cap;
};

static int envbuf_put(struct envbuf *b, const char *s, size_t n)
{
    if (n > DEVCONTAINER_MAX_ENV_ENTRY - b->len)
        return -1;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        if (cap > DEVCONTAINER_MAX_ENV_ENTRY + 1)
            cap = DEVCONTAINER_MAX_ENV_ENTRY + 1;
        char *p = realloc(b->p, cap);
        if (!p)
            return -2;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/* The value of NAME in envp ("NAME=value" strings, the first match wins like getenv), or
 * NULL when it is not set. */
static const char *env_lookup(char *const *envp, const char *name, size_t n)
{
    for (; envp && *envp; envp++) {
        if (strncmp(*envp, name, n) == 0 && (*envp)[n] == '=')
            return *envp + n + 1;
    }
    return NULL;
}

static const char *basename_of(const char *path, size_t *n)
{
    size_t end = strlen(path);
    while (end > 0 && path[end - 1] == '/')
        end--;
    size_t start = end;
    while (start > 0 && path[start - 1] != '/')
        start--;
    *n = end - start;
    return path + start;
}

struct subst_ctx {
    const char *workspace_dir; /* NULL: its forms stay as they are */
    char *const *envp;         /* NULL: no container variable is set */
};

/*
 * One ${...} form, inner being what is between the braces. Returns 1 when it was replaced,
 * 0 for a form this module does not know (the caller keeps it as written), or an
 * envbuf_put error. A NAME's default is everything after its colon (so "a:b" defaults
 * keep their colons). localEnv (and its alias env) refers to the client's machine, unknown
 * here: it always gives its default.
 */
static int subst_one(struct envbuf *b, const char *inner, size_t n, const struct subst_ctx *ctx)
{
    static const char folder[] = "containerWorkspaceFolder";
    static const char base[] = "containerWorkspaceFolderBasename";
    if (n == sizeof(folder) - 1 && memcmp(inner, folder, n) == 0) {
        if (!ctx->workspace_dir)
            return 0;
        int rc = envbuf_put(b, ctx->workspace_dir, strlen(ctx->workspace_dir));
        return rc < 0 ? rc : 1;
    }
    if (n == sizeof(base) - 1 && memcmp(inner, base, n) == 0) {
        if (!ctx->workspace_dir)
            return 0;
        size_t bn;
        const char *bs = basename_of(ctx->workspace_dir, &bn);
        int rc = envbuf_put(b, bs, bn);
        return rc < 0 ? rc : 1;
    }

    const char *colon = memchr(inner, ':', n);
    if (!colon)
        return 0;
    size_t kind_len = (size_t)(colon - inner);
    int container = kind_len == 12 && memcmp(inner, "containerEnv", 12) == 0;
    int local = (kind_len == 8 && memcmp(inner, "localEnv", 8) == 0) ||
                (kind_len == 3 && memcmp(inner, "env", 3) == 0);
    if (!container && !local)
        return 0;
    const char *name = colon + 1;
    const char *end = inner + n;
    const char *sep = memchr(name, ':', (size_t)(end - name));
    size_t name_len = (size_t)((sep ? sep : end) - name);
    if (!env_name_ok(name, name_len))
        return 0;
    const char *value = container ? env_lookup(ctx->envp, name, name_len) : NULL;
    int rc;
    if (value)
        rc = envbuf_put(b, value, strlen(value));
    else if (sep)
        rc = envbuf_put(b, sep + 1, (size_t)(end - sep - 1));
    else
        rc = 0;
    return rc < 0 ? rc : 1;
}

/* Appends value with its ${...} forms replaced. Replacements are not scanned again, so
 * the result is bounded and a variable's value cannot inject forms. */
static int subst(struct envbuf *b, const char *v, const struct subst_ctx *ctx)
{
    for (;;) {
        const char *open = strstr(v, "${");
        const char *close = open ? strchr(open + 2, '}') : NULL;
        if (!close)
            return envbuf_put(b, v, strlen(v));
        int rc = envbuf_put(b, v, (size_t)(open - v));
        if (rc < 0)
            return rc;
        rc = subst_one(b, open + 2, (size_t)(close - open - 2), ctx);
        if (rc == 0)
            rc = envbuf_put(b, open, (size_t)(close + 1 - open));
        if (rc < 0)
            return rc;
        v = close + 1;
    }
}

static int env_entry(const char *name, const json_t *v, const struct subst_ctx *ctx, char **out,
                     char *err, size_t errlen)
{
    struct envbuf b = {0};
    const char *value = json_is_null(v) ? NULL : json_text(v);
    if (!json_is_null(v) && !value) {
        set_err(err, errlen, "remoteEnv.%s: must be a string (without NUL bytes) or null", name);
        return -1;
    }
    int rc = envbuf_put(&b, name, strlen(name));
    if (rc == 0 && value)
        rc = envbuf_put(&b, "=", 1);
    if (rc == 0 && value)
        rc = subst(&b, value, ctx);
    if (rc == 0 && !b.p)
        rc = -2;
    if (rc < 0) {
        free(b.p);
        if (rc == -1)
            set_err(err, errlen, "remoteEnv.%s: longer than %u bytes after substitution", name,
                    DEVCONTAINER_MAX_ENV_ENTRY);
        else
            set_err(err, errlen, "remoteEnv.%s: out of memory", name);
        return -1;
    }
    *out = b.p;
    return 0;
}

static int parse_env(const json_t *root, const struct subst_ctx *ctx, struct devcontainer *dc,
                     char *err, size_t errlen)
{
    const json_t *obj = json_object_get(root, "remoteEnv");
    size_t n = 0;
    if (obj && !json_is_null(obj)) {
        if (!json_is_object(obj)) {
            set_err(err, errlen, "remoteEnv: must be an object");
            return -1;
        }
        n = json_object_size(obj);
    }
    if (n > DEVCONTAINER_MAX_ENV) {
        set_err(err, errlen, "remoteEnv: %zu variables, at most %u", n, DEVCONTAINER_MAX_ENV);
        return -1;
    }
    dc->env = calloc(n + 1, sizeof(*dc->env));
    if (!dc->env) {
        set_err(err, errlen, "remoteEnv: out of memory");
        return -1;
    }
    if (n == 0)
        return 0;
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)obj, name, v)
    {
        if (!env_name_ok(name, strlen(name))) {
            char shown[SHOW_MAX + 4];
            show(name, shown, sizeof(shown));
            set_err(err, errlen,
                    "remoteEnv: \"%s\" is not a variable name ([A-Za-z_][A-Za-z0-9_]*)", shown);
            return -1;
        }
        if (env_entry(name, v, ctx, &dc->env[dc->n_env], err, errlen) < 0)
            return -1;
        dc->n_env++;
    }
    return 0;
}

/* ---- the file ---- */

void devcontainer_free(struct devcontainer *dc)
{
    if (!dc)
        return;
    free_commands(dc->post_start, dc->n_post_start);
    free_commands(dc->post_attach, dc->n_post_attach);
    free(dc->ports);
    if (dc->env) {
        for (size_t i = 0; i < dc->n_env; i++)
            free(dc->env[i]);
        free(dc->env);
    }
    free(dc);
}

static json_t *load_json(const char *text, size_t len, char *err, size_t errlen)
{
    if (len > DEVCONTAINER_MAX_BYTES) {
        set_err(err, errlen, "%zu bytes, at most %u", len, DEVCONTAINER_MAX_BYTES);
        return NULL;
    }
    char *copy = malloc(len ? len : 1);
    if (!copy) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    if (len)
        memcpy(copy, text, len);
    devcontainer_strip_jsonc(copy, len);
    /* Flags 0: duplicate members are accepted (the last one wins, as in JavaScript) and
     * \u0000 is refused. */
    json_error_t je;
    json_t *root = json_loadb(copy, len, 0, &je);
    free(copy);
    if (!root) {
        /* jansson quotes the input near the error, which may hold control bytes. */
        for (char *c = je.text; *c; c++) {
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
                *c = '?';
        }
        enum json_error_code code = json_error_code(&je);
        if (code == json_error_null_character || code == json_error_null_byte_in_key)
            set_err(err, errlen, "line %d, column %d: strings must not contain \\u0000", je.line,
                    je.column);
        else
            set_err(err, errlen, "line %d, column %d: %s", je.line, je.column, je.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        set_err(err, errlen, "the top level must be an object");
        json_decref(root);
        return NULL;
    }
    return root;
}

struct devcontainer *devcontainer_parse(const char *text, size_t len, const char *workspace_dir,
                                        char *const *envp, char *err, size_t errlen)
{
    json_t *root = load_json(text, len, err, errlen);
    if (!root)
        return NULL;
    struct devcontainer *dc = calloc(1, sizeof(*dc));
    if (!dc) {
        set_err(err, errlen, "out of memory");
        json_decref(root);
        return NULL;
    }
    const struct subst_ctx ctx = {workspace_dir, envp};
    if (parse_hook(root, "postStartCommand", &dc->post_start, &dc->n_post_start, err, errlen) < 0 ||
        parse_hook(root, "postAttachCommand", &dc->post_attach, &dc->n_post_attach, err, errlen) <
            0 ||
        parse_ports(root, dc, err, errlen) < 0 || parse_env(root, &ctx, dc, err, errlen) < 0) {
        devcontainer_free(dc);
        dc = NULL;
    }
    json_decref(root);
    return dc;
}

int devcontainer_load(const char *workspace_dir, char *const *envp, struct devcontainer **out,
                      char *err, size_t errlen)
{
    static const char *const names[] = {".devcontainer/devcontainer.json", ".devcontainer.json"};
    *out = NULL;
    if (!workspace_dir || !workspace_dir[0]) {
        set_err(err, errlen, "no workspace directory");
        return -1;
    }
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char path[PATH_MAX];
        if (snprintf(path, sizeof(path), "%s/%s", workspace_dir, names[i]) >= (int)sizeof(path)) {
            set_err(err, errlen, "%s/%s: path too long", workspace_dir, names[i]);
            return -1;
        }
        struct stat st;
        if (stat(path, &st) < 0) {
            /* ENOTDIR: .devcontainer is a file, so the first location is absent too. */
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            set_err(err, errlen, "%s: %s", path, strerror(errno));
            return -1;
        }
        if (!S_ISREG(st.st_mode)) {
            set_err(err, errlen, "%s: not a regular file", path);
            return -1;
        }
        if (st.st_size > (off_t)DEVCONTAINER_MAX_BYTES) {
            set_err(err, errlen, "%s: %lld bytes, at most %u", path, (long long)st.st_size,
                    DEVCONTAINER_MAX_BYTES);
            return -1;
        }
        /* Symlinks are followed: workspaces link the file from elsewhere. */
        size_t len;
        char *text = readfile_bounded(path, DEVCONTAINER_MAX_BYTES, &len, err, errlen);
        if (!text)
            return -1;
        char reason[512];
        *out = devcontainer_parse(text, len, workspace_dir, envp, reason, sizeof(reason));
        free(text);
        if (!*out) {
            set_err(err, errlen, "%s: %s", path, reason);
            return -1;
        }
        return 0;
    }
    return 0;
}
