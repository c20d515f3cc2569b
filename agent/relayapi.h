/*
 * relayapi: one GET of the relay's JSON API (PROTOCOL.md §14) for the command-line tools
 * that need an answer before they go on (status, config-ssh).
 */
#ifndef TETHER_RELAYAPI_H
#define TETHER_RELAYAPI_H

#include <jansson.h>

#include "cli.h"

/* The relay's answer is cut off above this and reported as an error. */
#define RELAYAPI_MAX_BODY (64u * 1024 * 1024)

/*
 * GETs path (e.g. "/api/v1/workspaces") with the client's token, on a loop and lws context
 * of its own, and waits for the whole answer (SIGINT/SIGTERM give up).
 * Returns EXIT_OK and *doc (the caller json_decref's it) for HTTP 200 with a JSON body;
 * otherwise prints one "tether:" line and returns EXIT_FAIL.
 */
int relayapi_get(const struct cli_client *cc, const char *path, json_t **doc);

#endif
