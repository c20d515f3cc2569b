/*
 * url: the relay's address as users write it: ws://HOST:PORT[/PREFIX] or wss://...
 * (http:// and https:// mean the same). The path is a prefix that endpoint paths are
 * appended to; a URL that already ends in an endpoint path is accepted as it is.
 */
#ifndef TETHER_URL_H
#define TETHER_URL_H

#include <stdbool.h>

struct tether_url {
    bool tls;
    char host[256]; /* without brackets for IPv6 literals */
    int port;
    char prefix[512]; /* "" or "/something", never ending in '/' */
};

/* Returns 0, or -1 with a one-line reason in err. */
int url_parse(const char *text, struct tether_url *out, char *err, size_t errlen);

/* Writes prefix + path into out, dropping a trailing copy of path already in the prefix. */
int url_path(const struct tether_url *u, const char *path, char *out, size_t outlen);

#endif
