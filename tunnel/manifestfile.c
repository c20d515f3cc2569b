#include "manifestfile.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"
#include "readfile.h"

struct manifestfile {
    json_t *root; /* checked: "*" and workspace names -> objects of the members below */
};

/* The members a file may set, in the order they go into a manifest. */
static const char *const members[] = {
    "owner", "directory", "motd", "env", "authorized_keys", "scripts", "metadata",
};
#define NMEMBERS (sizeof(members) / sizeof(members[0]))

/* What the relay's own members can add to a manifest's JSON, at most (see merged_size). */
#define MANIFEST_FIXED_MAX                                                                         \
    (sizeof("{\"type\":\"manifest\",\"workspace\":\"\",\"stats_interval\":}") + TOKENS_MAX_NAME +  \
     20)

/* Bytes of v's compact JSON, as mux_send_control will write it. */
static size_t dump_size(const json_t *v)
{
    return json_dumpb(v, NULL, 0, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* How errors name an entry: workspace "NAME", or entry "*". */
static void entry_label(const char *key, char *buf, size_t len)
{
    if (strcmp(key, "*") == 0)
        snprintf(buf, len, "entry \"*\" (every workspace)");
    else
        snprintf(buf, len, "workspace \"%s\"", key);
}

/*
 * One entry: an object of known members that makes a valid manifest on its own. Validating
 * entries one by one is validating every merge: each member of a merged manifest is one
 * entry's, whole.
 */
static int check_entry(const char *path, const char *key, json_t *entry, char *err, size_t errlen)
{
    char label[TOKENS_MAX_NAME + 40], why[300];
    entry_label(key, label, sizeof(label));
    if (!json_is_object(entry)) {
        snprintf(err, errlen, "manifest file %s: %s: must be an object of manifest members", path,
                 label);
        return -1;
    }
    const char *k;
    json_t *v;
    json_object_foreach(entry, k, v)
    {
        size_t i = 0;
        while (i < NMEMBERS && strcmp(k, members[i]) != 0)
            i++;
        if (i == NMEMBERS) {
            snprintf(err, errlen,
                     "manifest file %s: %s: unknown member \"%.64s\" (a manifest file sets "
                     "owner, directory, motd, env, authorized_keys, scripts, metadata)",
                     path, label, k);
            return -1;
        }
    }
    json_t *msg = json_deep_copy(entry);
    if (!msg || json_object_set_new(msg, "type", json_string("manifest")) ||
        json_object_set_new(msg, "workspace", json_string(key))) {
        json_decref(msg);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = proto_control_validate(msg, why, sizeof(why));
    json_decref(msg);
    if (rc < 0) {
        snprintf(err, errlen, "manifest file %s: %s: %s", path, label, why);
        return -1;
    }
    return 0;
}

/*
 * The largest a merged manifest's JSON can be: the relay's members, and each file member
 * from the entry (or "*"), with its key, quotes, colon and comma. star_sizes[i] is member
 * i's in "*" (0 if absent).
 */
static size_t merged_size(const json_t *entry, const size_t star_sizes[NMEMBERS])
{
    size_t total = MANIFEST_FIXED_MAX;
    for (size_t i = 0; i < NMEMBERS; i++) {
        const json_t *v = entry ? json_object_get(entry, members[i]) : NULL;
        size_t n = v ? dump_size(v) : star_sizes[i];
        if (n)
            total += strlen(members[i]) + 4 + n;
    }
    return total;
}

static int check_sizes(const char *path, json_t *root, char *err, size_t errlen)
{
    size_t star_sizes[NMEMBERS] = {0};
    json_t *star = json_object_get(root, "*");
    for (size_t i = 0; star && i < NMEMBERS; i++) {
        json_t *v = json_object_get(star, members[i]);
        star_sizes[i] = v ? dump_size(v) : 0;
    }
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v)
    {
        size_t n = merged_size(strcmp(k, "*") == 0 ? NULL : v, star_sizes);
        if (n > PROTO_MAX_CONTROL) {
            char label[TOKENS_MAX_NAME + 40];
            entry_label(k, label, sizeof(label));
            snprintf(err, errlen,
                     "manifest file %s: %s: the manifest would be %zu bytes, over the %u a "
                     "control message may have",
                     path, label, n, PROTO_MAX_CONTROL);
            return -1;
        }
    }
    return 0;
}

static int check(const char *path, json_t *root, const struct tokens *tokens, char *err,
                 size_t errlen)
{
    if (!json_is_object(root)) {
        snprintf(err, errlen,
                 "manifest file %s: must be a JSON object of workspace names (or \"*\") to "
                 "manifest members",
                 path);
        return -1;
    }
    /* The tokens file's workspaces as a set: every key is looked up once. */
    json_t *known = json_object();
    if (!known) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < tokens_workspace_count(tokens); i++)
        json_object_set_new(known, tokens_workspace_name(tokens, i), json_true());
    int rc = 0;
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v)
    {
        if (strcmp(k, "*") != 0 && !json_object_get(known, k)) {
            snprintf(err, errlen,
                     "manifest file %s: workspace \"%.64s%s\" is not in the tokens file (a key "
                     "is a workspace name or \"*\")",
                     path, k, strlen(k) > 64 ? "..." : "");
            rc = -1;
            break;
        }
        if ((rc = check_entry(path, k, v, err, errlen)) < 0)
            break;
    }
    json_decref(known);
    return rc < 0 ? rc : check_sizes(path, root, err, errlen);
}

struct manifestfile *manifestfile_load(const char *path, const struct tokens *tokens, char *err,
                                       size_t errlen)
{
    size_t len;
    char why[512];
    char *text = readfile_bounded(path, MANIFESTFILE_MAX, &len, why, sizeof(why));
    if (!text) {
        snprintf(err, errlen, "manifest file: %s", why);
        return NULL;
    }
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root) {
        snprintf(err, errlen, "manifest file %s: invalid JSON at line %d: %s", path, jerr.line,
                 jerr.text);
        return NULL;
    }
    struct manifestfile *m = NULL;
    if (check(path, root, tokens, err, errlen) == 0 && !(m = malloc(sizeof(*m))))
        snprintf(err, errlen, "out of memory");
    if (!m) {
        json_decref(root);
        return NULL;
    }
    m->root = root;
    return m;
}

void manifestfile_free(struct manifestfile *m)
{
    if (!m)
        return;
    json_decref(m->root);
    free(m);
}

json_t *manifestfile_manifest(const struct manifestfile *m, const char *workspace,
                              unsigned stats_interval)
{
    json_t *o = json_pack("{s:s, s:s, s:I}", "type", "manifest", "workspace", workspace,
                          "stats_interval", (json_int_t)stats_interval);
    if (!o || !m)
        return o;
    json_t *own = json_object_get(m->root, workspace);
    json_t *star = json_object_get(m->root, "*");
    for (size_t i = 0; i < NMEMBERS; i++) {
        json_t *v = own ? json_object_get(own, members[i]) : NULL;
        if (!v && star)
            v = json_object_get(star, members[i]);
        /* Shared with the file's tree, which nobody changes: no copy needed. */
        if (v && json_object_set(o, members[i], v) < 0) {
            json_decref(o);
            return NULL;
        }
    }
    return o;
}
