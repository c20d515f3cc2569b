/*
 * sftp_wire: the packet codec of SFTP version 3 (draft-ietf-secsh-filexfer-02) with the
 * OpenSSH extensions tether serves. Pure functions: no I/O, no allocation.
 *
 * A packet on the wire is `uint32 length | byte type | payload`, where length counts the
 * type byte and the payload. Every request but INIT carries a uint32 request id after the
 * type. Strings are `uint32 length | bytes`. Decoded strings point into the caller's packet
 * buffer, so they live as long as it does.
 *
 * Every limit is checked before the caller allocates anything: sftp_wire_frame_length
 * rejects a length field outside [SFTP_WIRE_MIN_PACKET, SFTP_WIRE_MAX_PACKET] after the
 * first four bytes, and the decoders never read past the length they are given.
 */
#ifndef TETHER_SFTP_WIRE_H
#define TETHER_SFTP_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SFTP_WIRE_VERSION 3u

/* The largest WRITE payload a client may send; OpenSSH's own server allows the same. */
#define SFTP_WIRE_MAX_DATA (256u * 1024)
/* The largest length field accepted: SFTP_WIRE_MAX_DATA plus room for a WRITE's other
 * fields (type, id, handle, offset, string length). A larger one ends the session. */
#define SFTP_WIRE_MAX_PACKET (SFTP_WIRE_MAX_DATA + 1024u)
/* The smallest: a type byte and a uint32 (INIT's version or a request id). */
#define SFTP_WIRE_MIN_PACKET 5u
/* READ lengths are clamped to this (a shorter reply is legal; clients ask again). */
#define SFTP_WIRE_MAX_READ (64u * 1024)
/* What limits@openssh.com tells clients to send per WRITE (larger ones are accepted). */
#define SFTP_WIRE_MAX_WRITE (64u * 1024)
/* Paths (and symlink targets) longer than this are refused with SSH_FX_BAD_MESSAGE. */
#define SFTP_WIRE_MAX_PATH 4096u
/* The header of a DATA reply: length, type, id, data length. */
#define SFTP_WIRE_DATA_HEADER 13u

/* Packet types. */
enum {
    SSH_FXP_INIT = 1,
    SSH_FXP_VERSION = 2,
    SSH_FXP_OPEN = 3,
    SSH_FXP_CLOSE = 4,
    SSH_FXP_READ = 5,
    SSH_FXP_WRITE = 6,
    SSH_FXP_LSTAT = 7,
    SSH_FXP_FSTAT = 8,
    SSH_FXP_SETSTAT = 9,
    SSH_FXP_FSETSTAT = 10,
    SSH_FXP_OPENDIR = 11,
    SSH_FXP_READDIR = 12,
    SSH_FXP_REMOVE = 13,
    SSH_FXP_MKDIR = 14,
    SSH_FXP_RMDIR = 15,
    SSH_FXP_REALPATH = 16,
    SSH_FXP_STAT = 17,
    SSH_FXP_RENAME = 18,
    SSH_FXP_READLINK = 19,
    SSH_FXP_SYMLINK = 20,
    SSH_FXP_STATUS = 101,
    SSH_FXP_HANDLE = 102,
    SSH_FXP_DATA = 103,
    SSH_FXP_NAME = 104,
    SSH_FXP_ATTRS = 105,
    SSH_FXP_EXTENDED = 200,
    SSH_FXP_EXTENDED_REPLY = 201,
};

/* Status codes. */
enum {
    SSH_FX_OK = 0,
    SSH_FX_EOF = 1,
    SSH_FX_NO_SUCH_FILE = 2,
    SSH_FX_PERMISSION_DENIED = 3,
    SSH_FX_FAILURE = 4,
    SSH_FX_BAD_MESSAGE = 5,
    SSH_FX_NO_CONNECTION = 6,
    SSH_FX_CONNECTION_LOST = 7,
    SSH_FX_OP_UNSUPPORTED = 8,
};

/* OPEN's pflags. */
enum {
    SSH_FXF_READ = 0x01,
    SSH_FXF_WRITE = 0x02,
    SSH_FXF_APPEND = 0x04,
    SSH_FXF_CREAT = 0x08,
    SSH_FXF_TRUNC = 0x10,
    SSH_FXF_EXCL = 0x20,
};

/* Which fields of struct sftp_wire_attrs are present. */
enum {
    SSH_FILEXFER_ATTR_SIZE = 0x01,
    SSH_FILEXFER_ATTR_UIDGID = 0x02,
    SSH_FILEXFER_ATTR_PERMISSIONS = 0x04,
    SSH_FILEXFER_ATTR_ACMODTIME = 0x08,
    SSH_FILEXFER_ATTR_EXTENDED = 0x80000000u,
};

/* The EXTENDED requests tether knows; anything else is SFTP_EXT_UNKNOWN. */
enum sftp_wire_ext {
    SFTP_EXT_NONE = 0, /* not an EXTENDED request */
    SFTP_EXT_UNKNOWN,
    SFTP_EXT_POSIX_RENAME, /* posix-rename@openssh.com: path, path2 */
    SFTP_EXT_STATVFS,      /* statvfs@openssh.com: path */
    SFTP_EXT_HARDLINK,     /* hardlink@openssh.com: path (existing), path2 (new link) */
    SFTP_EXT_FSYNC,        /* fsync@openssh.com: handle */
    SFTP_EXT_LIMITS,       /* limits@openssh.com: nothing */
    SFTP_EXT_EXPAND_PATH,  /* expand-path@openssh.com: path */
};

/* Decoder results. */
enum {
    SFTP_WIRE_OK = 0,
    SFTP_WIRE_EMALFORMED = -1, /* framing or a field overruns the packet: end the session */
    SFTP_WIRE_EINVAL = -2,     /* well framed, but a path is too long or holds a NUL byte:
                                  answer SSH_FX_BAD_MESSAGE (type and id are valid) */
};

struct sftp_wire_str {
    const uint8_t *p;
    uint32_t len;
};

struct sftp_wire_attrs {
    uint32_t flags; /* as received; unknown bits are ignored by the server */
    uint64_t size;
    uint32_t uid, gid;
    uint32_t perm;
    uint32_t atime, mtime;
    uint32_t ext_count;       /* with SSH_FILEXFER_ATTR_EXTENDED: name/value pairs ... */
    struct sftp_wire_str ext; /* ... kept raw (validated, not interpreted) */
};

/*
 * One decoded client packet. Only the fields of its type are set; the others are zero.
 * Path fields never contain NUL and are at most SFTP_WIRE_MAX_PATH bytes.
 */
struct sftp_wire_request {
    uint8_t type;
    uint32_t id; /* INIT: the client's version */
    enum sftp_wire_ext ext;
    struct sftp_wire_str ext_name; /* EXTENDED: the request name */
    struct sftp_wire_str path;     /* first path (SYMLINK: OpenSSH's order, the target) */
    struct sftp_wire_str path2;    /* second path (SYMLINK: the link to create) */
    struct sftp_wire_str handle;
    struct sftp_wire_str data;    /* WRITE */
    uint64_t offset;              /* READ, WRITE */
    uint32_t len;                 /* READ: as asked, not clamped */
    uint32_t pflags;              /* OPEN */
    struct sftp_wire_attrs attrs; /* OPEN, SETSTAT, FSETSTAT, MKDIR */
};

/*
 * Reads a packet's length field (4 bytes). Returns SFTP_WIRE_OK and the length (type byte
 * plus payload, what follows the field), or SFTP_WIRE_EMALFORMED when it is out of bounds.
 */
int sftp_wire_frame_length(const uint8_t hdr[4], uint32_t *len);

/*
 * Decodes one packet body (p points at the type byte, len is the length field's value).
 * Unknown packet types and unknown EXTENDED names decode successfully (type and id set)
 * so that the server can answer SSH_FX_OP_UNSUPPORTED. Bytes after the last field of a
 * known request are ignored, as OpenSSH does; *used (may be NULL) says where the fields
 * ended. Returns SFTP_WIRE_OK, SFTP_WIRE_EINVAL or SFTP_WIRE_EMALFORMED. On EINVAL,
 * type and id are valid; on EMALFORMED nothing is.
 */
int sftp_wire_decode(const uint8_t *p, size_t len, struct sftp_wire_request *r, size_t *used);

/*
 * A bounded writer. Encoding past cap sets overflow and writes nothing more, so a caller
 * checks once at the end (sftp_wire_end) instead of after every field.
 */
struct sftp_wire_out {
    uint8_t *p;
    size_t cap;
    size_t len;
    size_t start; /* where the packet being written begins */
    bool overflow;
};

void sftp_wire_out_init(struct sftp_wire_out *o, uint8_t *buf, size_t cap);
/* Starts a packet: a length placeholder and the type byte. */
void sftp_wire_begin(struct sftp_wire_out *o, uint8_t type);
void sftp_wire_put_u32(struct sftp_wire_out *o, uint32_t v);
void sftp_wire_put_u64(struct sftp_wire_out *o, uint64_t v);
void sftp_wire_put_str(struct sftp_wire_out *o, const void *p, size_t n);
void sftp_wire_put_attrs(struct sftp_wire_out *o, const struct sftp_wire_attrs *a);
/* Patches the length of the packet begun last. Returns 0, or -1 if anything overflowed. */
int sftp_wire_end(struct sftp_wire_out *o);

/* Whole replies. Each returns 0 or -1 (overflow). */
int sftp_wire_version(struct sftp_wire_out *o);
int sftp_wire_status(struct sftp_wire_out *o, uint32_t id, uint32_t code, const char *msg);
int sftp_wire_handle(struct sftp_wire_out *o, uint32_t id, const void *h, size_t n);
int sftp_wire_attrs_reply(struct sftp_wire_out *o, uint32_t id, const struct sftp_wire_attrs *a);

/*
 * A NAME reply built one entry at a time: sftp_wire_name_begin, sftp_wire_name_add for each
 * entry, then sftp_wire_name_end with the number added.
 */
void sftp_wire_name_begin(struct sftp_wire_out *o, uint32_t id);
void sftp_wire_name_add(struct sftp_wire_out *o, const char *name, const char *longname,
                        const struct sftp_wire_attrs *a);
int sftp_wire_name_end(struct sftp_wire_out *o, uint32_t count);

/* Writes the header of a DATA reply carrying n bytes into out[SFTP_WIRE_DATA_HEADER]. */
void sftp_wire_data_header(uint8_t *out, uint32_t id, uint32_t n);

/* statvfs@openssh.com's reply: these eleven values, in this order, as uint64. */
struct sftp_wire_statvfs {
    uint64_t bsize, frsize, blocks, bfree, bavail, files, ffree, favail, fsid, flag, namemax;
};
int sftp_wire_statvfs_reply(struct sftp_wire_out *o, uint32_t id,
                            const struct sftp_wire_statvfs *st);
/* limits@openssh.com's reply, from the constants above and max_handles. */
int sftp_wire_limits_reply(struct sftp_wire_out *o, uint32_t id, uint64_t max_handles);

/* Encodes a client request (tests and fuzzing use it to build packets). 0 or -1. */
int sftp_wire_encode_request(struct sftp_wire_out *o, const struct sftp_wire_request *r);

/* The SSH_FX_* status for a (positive) errno value, as OpenSSH's sftp-server maps them. */
uint32_t sftp_wire_status_from_errno(int errnum);
/* The generic text of a status code ("No such file", ...). */
const char *sftp_wire_status_text(uint32_t code);

/* What an `ls -l` line is made of. */
struct sftp_wire_lsinfo {
    uint32_t mode; /* st_mode, type bits included */
    uint64_t nlink;
    const char *user;  /* name, or the number as text */
    const char *group; /* name, or the number as text */
    uint64_t size;
    int64_t mtime;
    int64_t now; /* for the "recent file" format, as ls does */
};
/*
 * Formats an `ls -l` style line for READDIR's longname ("-rw-r--r--    1 alice staff ...
 * name"), in local time. Always NUL-terminates (when cap > 0); returns the length written.
 */
size_t sftp_wire_longname(char *out, size_t cap, const struct sftp_wire_lsinfo *ls,
                          const char *name);

#endif
