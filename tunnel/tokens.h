/*
 * tokens: the relay's token file.
 *
 *   {"agents": {"AGENT_TOKEN": "WORKSPACE", ...},
 *    "users":  {"USER_TOKEN": ["WORKSPACE", ...], ...}}     ("*" = every workspace)
 *
 * Tokens are compared in constant time and never logged.
 */
#ifndef TETHER_TOKENS_H
#define TETHER_TOKENS_H

#include <stdbool.h>
#include <stddef.h>

#define TOKENS_MAX_FILE (4u * 1024 * 1024)
#define TOKENS_MAX_NAME 64u /* workspace names: [A-Za-z0-9._-], 1..64 bytes */

struct tokens;

/* Loads and checks the file. Returns NULL with a one-line reason in err. */
struct tokens *tokens_load(const char *path, char *err, size_t errlen);
void tokens_free(struct tokens *t);

/* The workspace an agent token belongs to, or NULL. */
const char *tokens_agent_workspace(const struct tokens *t, const char *token);
/* Is this a user token at all? */
bool tokens_user_valid(const struct tokens *t, const char *token);
/* May this user token reach this workspace? */
bool tokens_user_allows(const struct tokens *t, const char *token, const char *workspace);
/* Workspaces named by agent tokens, in file order. */
size_t tokens_workspace_count(const struct tokens *t);
const char *tokens_workspace_name(const struct tokens *t, size_t i);

/* Is name a valid workspace name? */
bool tokens_name_valid(const char *name);

/*
 * Reads a file that holds a secret (a token, or the token file). Refuses one that group or
 * others may read, or one over max bytes. Trailing whitespace is dropped. Returns a string
 * the caller frees, or NULL with a one-line reason in err.
 */
char *tokens_read_secret(const char *path, size_t max, char *err, size_t errlen);

#endif
