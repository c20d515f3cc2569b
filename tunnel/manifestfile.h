/*
 * manifestfile: `tether relay --manifest FILE`, what the relay adds to each agent's manifest
 * (PROTOCOL.md 12.3).
 *
 * The file is one JSON object. Its keys are workspace names, or "*" for every workspace; its
 * values are objects of manifest members: owner, directory, motd, env, authorized_keys,
 * scripts, metadata. A workspace's manifest takes each member from the workspace's own entry
 * if it has it, else from "*". The relay sets type, workspace and stats_interval itself.
 */
#ifndef TETHER_MANIFESTFILE_H
#define TETHER_MANIFESTFILE_H

#include <stddef.h>

#include <jansson.h>

#include "tokens.h"

/*
 * The file's size, read whole (a relay of many workspaces may list keys for each). Each
 * workspace's merged manifest must fit in one CONTROL frame (PROTO_MAX_CONTROL): checked too.
 */
#define MANIFESTFILE_MAX (16u * 1024 * 1024)

struct manifestfile;

/*
 * Reads and checks the file: valid JSON, every key "*" or a workspace of the tokens file,
 * every entry an object of the members above, each as valid as on the wire, every merged
 * manifest within PROTO_MAX_CONTROL. NULL with the problem (naming the entry and the member)
 * in err. Free with manifestfile_free.
 */
struct manifestfile *manifestfile_load(const char *path, const struct tokens *tokens, char *err,
                                       size_t errlen);
void manifestfile_free(struct manifestfile *m);

/*
 * The manifest message for workspace: type, workspace, stats_interval, and the file's
 * members for it (m may be NULL: no file). A new reference, or NULL (out of memory).
 */
json_t *manifestfile_manifest(const struct manifestfile *m, const char *workspace,
                              unsigned stats_interval);

#endif
