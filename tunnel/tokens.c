#include "tokens.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

struct tokens {
    json_t *agents; /* token -> workspace */
    json_t *users;  /* token -> [workspace...] */
    json_t *names;  /* workspace names from agents, in order, unique */
};

/* Compares without an early exit, so timing does not tell how much of a token matched. */
static bool secret_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned diff = (unsigned)(la ^ lb);
    for (size_t i = 0; i < la && i < lb; i++)
        diff |= (unsigned)(a[i] ^ b[i]);
    return diff == 0;
}

/* Finds token among an object's keys by constant-time comparison of every key. */
static json_t *lookup(json_t *obj, const char *token)
{
    json_t *found = NULL, *v;
    const char *k;
    if (!token || !*token)
        return NULL;
    json_object_foreach(obj, k, v)
    {
        if (secret_equal(k, token))
            found = v;
    }
    return found;
}

bool tokens_name_valid(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > TOKENS_MAX_NAME)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '-' || c == '_'))
            return false;
    }
    return true;
}

char *tokens_read_secret(const char *path, size_t max, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s is not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        snprintf(err, errlen, "%s may be read by group or others (mode %03o): chmod 600 it", path,
                 (unsigned)(st.st_mode & 0777));
        close(fd);
        return NULL;
    }
    if ((uint64_t)st.st_size > max) {
        snprintf(err, errlen, "%s is larger than %zu bytes", path, max);
        close(fd);
        return NULL;
    }
    char *buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        close(fd);
        return NULL;
    }
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == '\r' || buf[got - 1] == ' ' ||
                       buf[got - 1] == '\t'))
        got--;
    buf[got] = '\0';
    return buf;
}

static int fail(char *err, size_t errlen, const char *path, const char *what)
{
    snprintf(err, errlen, "%s: %s", path, what);
    return -1;
}

static int check(struct tokens *t, const char *path, char *err, size_t errlen)
{
    const char *k;
    json_t *v;
    if (!json_is_object(t->agents) || !json_is_object(t->users))
        return fail(err, errlen, path, "needs objects \"agents\" and \"users\"");
    json_object_foreach(t->agents, k, v)
    {
        if (!*k || !json_is_string(v) || !tokens_name_valid(json_string_value(v)))
            return fail(err, errlen, path,
                        "\"agents\" maps each token to a workspace name ([A-Za-z0-9._-], 1-64)");
        bool seen = false;
        size_t i;
        json_t *n;
        json_array_foreach(t->names, i, n)
        {
            if (strcmp(json_string_value(n), json_string_value(v)) == 0)
                seen = true;
        }
        if (!seen)
            json_array_append(t->names, v);
    }
    json_object_foreach(t->users, k, v)
    {
        size_t i;
        json_t *n;
        if (!*k || !json_is_array(v))
            return fail(err, errlen, path, "\"users\" maps each token to an array of workspaces");
        json_array_foreach(v, i, n)
        {
            if (!json_is_string(n) || (strcmp(json_string_value(n), "*") != 0 &&
                                       !tokens_name_valid(json_string_value(n))))
                return fail(err, errlen, path,
                            "\"users\" lists workspace names or \"*\" for every workspace");
        }
    }
    return 0;
}

struct tokens *tokens_load(const char *path, char *err, size_t errlen)
{
    char *text = tokens_read_secret(path, TOKENS_MAX_FILE, err, errlen);
    if (!text)
        return NULL;
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root) {
        snprintf(err, errlen, "%s: invalid JSON at line %d: %s", path, jerr.line, jerr.text);
        return NULL;
    }
    struct tokens *t = calloc(1, sizeof(*t));
    if (!t) {
        json_decref(root);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    t->agents = json_incref(json_object_get(root, "agents"));
    t->users = json_incref(json_object_get(root, "users"));
    t->names = json_array();
    json_decref(root);
    if (check(t, path, err, errlen) < 0) {
        tokens_free(t);
        return NULL;
    }
    return t;
}

void tokens_free(struct tokens *t)
{
    if (!t)
        return;
    json_decref(t->agents);
    json_decref(t->users);
    json_decref(t->names);
    free(t);
}

const char *tokens_agent_workspace(const struct tokens *t, const char *token)
{
    json_t *v = lookup(t->agents, token);
    return v ? json_string_value(v) : NULL;
}

bool tokens_user_valid(const struct tokens *t, const char *token)
{
    return lookup(t->users, token) != NULL;
}

bool tokens_user_allows(const struct tokens *t, const char *token, const char *workspace)
{
    json_t *list = lookup(t->users, token), *n;
    size_t i;
    if (!list)
        return false;
    json_array_foreach(list, i, n)
    {
        const char *s = json_string_value(n);
        if (strcmp(s, "*") == 0 || strcmp(s, workspace) == 0)
            return true;
    }
    return false;
}

size_t tokens_workspace_count(const struct tokens *t)
{
    return json_array_size(t->names);
}

const char *tokens_workspace_name(const struct tokens *t, size_t i)
{
    return json_string_value(json_array_get(t->names, i));
}
