/*
 * web_assets: the web terminal's page and assets, embedded at build time by
 * tunnel/web/embed.py (PROTOCOL.md 14.8). The array ends with an entry whose path is NULL.
 * web_assets_complete is 0 when the relay was built without the xterm.js files (no
 * `npm ci` in tunnel/web): then only the page's own files are present.
 */
#ifndef TETHER_WEB_ASSETS_H
#define TETHER_WEB_ASSETS_H

#include <stddef.h>

struct web_asset {
    const char *path; /* "/web/term.js", or "index.html" for the page itself */
    const char *content_type;
    const char *etag; /* quoted */
    const unsigned char *data;
    size_t len;
};

extern const struct web_asset web_assets[];
extern const int web_assets_complete;

/* The asset at this path, or NULL. */
const struct web_asset *web_asset_find(const char *path);

#endif
