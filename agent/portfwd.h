/*
 * portfwd: tunnel streams of kind tcp, served by the agent: each one is a TCP connection
 * from the agent to host:port (the relay asks for 127.0.0.1:PORT). Bytes flow both ways
 * under the stream's credit; a half-close on either side becomes FIN on the other. A
 * target the forward policy does not allow is refused with OPEN_FAIL FORBIDDEN.
 */
#ifndef TETHER_PORTFWD_H
#define TETHER_PORTFWD_H

#include <stdint.h>

#include <uv.h>

#include "activity.h"
#include "fwdpolicy.h"
#include "proto/proto.h"
#include "tunnel/mux.h"

/* Largest single read from a target socket. */
#define PORTFWD_READ_MAX (64u * 1024)

/* Shared by every forwarded connection of one agent: reads are consumed at once. */
struct portfwd_shared {
    uv_loop_t *loop;
    struct activity *activity; /* forwards' bytes count as activity (SSH's pipes do not) */
    /* Which targets a tcp OPEN may reach (--forward-allow); NULL: loopback only. Not owned:
     * it must outlive the agent. */
    const struct fwdpolicy *policy;
    unsigned forwards; /* open tcp forwards */
    uint8_t read_buf[PORTFWD_READ_MAX];
};

/*
 * Starts dialing for a tcp OPEN on stream id. The stream is accepted once the connection
 * is up, or rejected with a reason (connection refused, unreachable, not allowed, ...). The
 * object becomes the stream's user pointer (a struct agent_stream) and frees itself.
 */
void portfwd_open(struct portfwd_shared *sh, struct mux *m, uint32_t id,
                  const struct proto_open *o);

/*
 * Accepts stream id at once and joins it to the stream socket fd (the agent's end of a
 * socketpair), exactly as a forward joins its target. fd belongs to the stream from this
 * call on, also when it fails (a negative UV error): then the caller rejects the stream.
 */
int portfwd_attach_fd(struct portfwd_shared *sh, struct mux *m, uint32_t id, int fd);

#endif
