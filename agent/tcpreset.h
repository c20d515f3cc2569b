/*
 * tcpreset: telling a peer's reset from its end of file.
 *
 * libuv 1.44 reports a reset as UV_EOF when the socket still had unread data queued; the
 * socket's pending error (SO_ERROR) still says ECONNRESET. Passing such an end on as a
 * clean FIN would make a cut transfer look complete, so callers check this on UV_EOF.
 */
#ifndef TETHER_TCPRESET_H
#define TETHER_TCPRESET_H

#include <stdbool.h>
#include <sys/socket.h>

#include <uv.h>

static inline bool tcp_was_reset(uv_tcp_t *tcp)
{
    uv_os_fd_t fd;
    int err = 0;
    socklen_t len = sizeof(err);
    if (uv_fileno((const uv_handle_t *)tcp, &fd) < 0 ||
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return false;
    return err != 0;
}

#endif
