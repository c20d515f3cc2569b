/* tether status: GET /api/v1/workspaces[/NAME] from the relay and print the JSON. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli.h"
#include "commands.h"
#include "relayapi.h"
#include "tunnel/tokens.h"

static const char status_usage[] =
    "usage: tether status --url URL --token-file FILE [WORKSPACE]\n"
    "\n"
    "Prints the relay's JSON for every workspace the token may see, or for one.\n"
    "\n"
    "  --url URL           the relay (or set TETHER_URL)\n"
    "  --token-file FILE   a user token (or TETHER_TOKEN_FILE, or TETHER_TOKEN)\n"
    "  --ca-file FILE      trust these CAs for https:// instead of the system's\n"
    "  --insecure          do not check the relay's certificate (development only)\n"
    "  --log-level LEVEL   error, warn, info (default) or debug\n"
    "  -h, --help          this text\n";

int cmd_status(int argc, char **argv)
{
    static const struct option opts[] = {CLI_OPTS_CLIENT, CLI_OPTS_END};
    struct cli_client cc;
    memset(&cc, 0, sizeof(cc));
    const struct cli_shared sh = {.command = "status", .usage = status_usage, .client = &cc};
    int c;
    while ((c = cli_getopt(argc, argv, opts)) != -1) {
        int rc = cli_shared_option(&sh, c, argv);
        if (rc != CLI_NEXT)
            return rc;
    }
    if (argc - optind > 1) {
        cli_error("status takes at most one WORKSPACE");
        return EXIT_USAGE;
    }
    char path[128] = "/api/v1/workspaces";
    if (argc - optind == 1) {
        const char *name = argv[optind];
        if (!tokens_name_valid(name)) {
            cli_error("'%s' is not a workspace name", name);
            return EXIT_USAGE;
        }
        snprintf(path, sizeof(path), "/api/v1/workspaces/%s", name);
    }
    int rc = cli_client_resolve(&cc);
    if (rc != EXIT_OK) {
        cli_client_free(&cc);
        return rc;
    }
    json_t *doc;
    rc = relayapi_get(&cc, path, &doc);
    if (rc == EXIT_OK) {
        json_dumpf(doc, stdout, JSON_INDENT(2));
        fputc('\n', stdout);
        json_decref(doc);
    }
    cli_client_free(&cc);
    return rc;
}
