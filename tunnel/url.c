#include <stddef.h>
#include "url.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int url_parse(const char *text, struct tether_url *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const char *p;
    if (strncmp(text, "ws://", 5) == 0 || strncmp(text, "http://", 7) == 0) {
        p = strstr(text, "://") + 3;
    } else if (strncmp(text, "wss://", 6) == 0 || strncmp(text, "https://", 8) == 0) {
        out->tls = true;
        p = strstr(text, "://") + 3;
    } else {
        snprintf(err, errlen, "URL '%s' must start with ws://, wss://, http:// or https://", text);
        return -1;
    }
    const char *host = p, *host_end, *after;
    if (*p == '[') {
        host = p + 1;
        host_end = strchr(host, ']');
        if (!host_end) {
            snprintf(err, errlen, "URL '%s': unterminated IPv6 address", text);
            return -1;
        }
        after = host_end + 1;
    } else {
        host_end = p + strcspn(p, ":/?#");
        after = host_end;
    }
    size_t hl = (size_t)(host_end - host);
    if (hl == 0 || hl >= sizeof(out->host)) {
        snprintf(err, errlen, "URL '%s' has no usable host", text);
        return -1;
    }
    memcpy(out->host, host, hl);
    out->port = out->tls ? 443 : 80;
    if (*after == ':') {
        char *end;
        long port = strtol(after + 1, &end, 10);
        if (end == after + 1 || port < 1 || port > 65535 || (*end && *end != '/')) {
            snprintf(err, errlen, "URL '%s' has a bad port", text);
            return -1;
        }
        out->port = (int)port;
        after = end;
    }
    if (*after && *after != '/') {
        snprintf(err, errlen, "URL '%s': unexpected '%c' after the host", text, *after);
        return -1;
    }
    size_t pl = strcspn(after, "?#");
    while (pl > 0 && after[pl - 1] == '/')
        pl--;
    if (pl >= sizeof(out->prefix)) {
        snprintf(err, errlen, "URL '%s' has a path that is too long", text);
        return -1;
    }
    memcpy(out->prefix, after, pl);
    return 0;
}

int url_path(const struct tether_url *u, const char *path, char *out, size_t outlen)
{
    size_t pl = strlen(u->prefix), l = strlen(path);
    /* "ws://relay/api/v1/agent" given as the agent's URL: the endpoint is already there. */
    if (pl >= l && strcmp(u->prefix + pl - l, path) == 0)
        pl -= l;
    int n = snprintf(out, outlen, "%.*s%s", (int)pl, u->prefix, path);
    return (n < 0 || (size_t)n >= outlen) ? -1 : 0;
}
