#include "sftp_wire.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---- decoding ---- */

/* A cursor over one packet body; any read past the end sets bad and yields zeros. */
struct reader {
    const uint8_t *p;
    size_t len;
    size_t off;
    bool bad;
};

static bool have(struct reader *r, size_t n)
{
    if (r->bad || r->len - r->off < n) {
        r->bad = true;
        return false;
    }
    return true;
}

static uint8_t get_u8(struct reader *r)
{
    return have(r, 1) ? r->p[r->off++] : 0;
}

static uint32_t get_u32(struct reader *r)
{
    if (!have(r, 4))
        return 0;
    const uint8_t *b = r->p + r->off;
    r->off += 4;
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static uint64_t get_u64(struct reader *r)
{
    uint64_t hi = get_u32(r);
    return hi << 32 | get_u32(r);
}

static struct sftp_wire_str get_str(struct reader *r)
{
    struct sftp_wire_str s = {NULL, 0};
    uint32_t n = get_u32(r);
    if (!have(r, n))
        return s;
    s.p = r->p + r->off;
    s.len = n;
    r->off += n;
    return s;
}

/* A path: a string that is short enough and has no NUL; *invalid records a violation. */
static struct sftp_wire_str get_path(struct reader *r, bool *invalid)
{
    struct sftp_wire_str s = get_str(r);
    if (!r->bad && (s.len > SFTP_WIRE_MAX_PATH || memchr(s.p, 0, s.len)))
        *invalid = true;
    return s;
}

static void get_attrs(struct reader *r, struct sftp_wire_attrs *a)
{
    a->flags = get_u32(r);
    if (a->flags & SSH_FILEXFER_ATTR_SIZE)
        a->size = get_u64(r);
    if (a->flags & SSH_FILEXFER_ATTR_UIDGID) {
        a->uid = get_u32(r);
        a->gid = get_u32(r);
    }
    if (a->flags & SSH_FILEXFER_ATTR_PERMISSIONS)
        a->perm = get_u32(r);
    if (a->flags & SSH_FILEXFER_ATTR_ACMODTIME) {
        a->atime = get_u32(r);
        a->mtime = get_u32(r);
    }
    if (a->flags & SSH_FILEXFER_ATTR_EXTENDED) {
        a->ext_count = get_u32(r);
        size_t start = r->off;
        /* Each pair takes at least 8 bytes, so a lying count stops at the packet's end. */
        for (uint32_t i = 0; i < a->ext_count && !r->bad; i++) {
            get_str(r);
            get_str(r);
        }
        if (!r->bad) {
            a->ext.p = r->p + start;
            a->ext.len = (uint32_t)(r->off - start);
        }
    }
}

int sftp_wire_frame_length(const uint8_t hdr[4], uint32_t *len)
{
    uint32_t n = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
    if (n < SFTP_WIRE_MIN_PACKET || n > SFTP_WIRE_MAX_PACKET)
        return SFTP_WIRE_EMALFORMED;
    *len = n;
    return SFTP_WIRE_OK;
}

static const struct {
    const char *name;
    enum sftp_wire_ext ext;
} known_exts[] = {
    {"posix-rename@openssh.com", SFTP_EXT_POSIX_RENAME},
    {"statvfs@openssh.com", SFTP_EXT_STATVFS},
    {"hardlink@openssh.com", SFTP_EXT_HARDLINK},
    {"fsync@openssh.com", SFTP_EXT_FSYNC},
    {"limits@openssh.com", SFTP_EXT_LIMITS},
    {"expand-path@openssh.com", SFTP_EXT_EXPAND_PATH},
};

static enum sftp_wire_ext ext_lookup(struct sftp_wire_str name)
{
    for (size_t i = 0; i < sizeof(known_exts) / sizeof(known_exts[0]); i++)
        if (strlen(known_exts[i].name) == name.len &&
            memcmp(known_exts[i].name, name.p, name.len) == 0)
            return known_exts[i].ext;
    return SFTP_EXT_UNKNOWN;
}

static void decode_extended(struct reader *rd, struct sftp_wire_request *r, bool *invalid)
{
    r->ext_name = get_str(rd);
    if (rd->bad)
        return;
    r->ext = ext_lookup(r->ext_name);
    switch (r->ext) {
    case SFTP_EXT_POSIX_RENAME:
    case SFTP_EXT_HARDLINK:
        r->path = get_path(rd, invalid);
        r->path2 = get_path(rd, invalid);
        break;
    case SFTP_EXT_STATVFS:
    case SFTP_EXT_EXPAND_PATH:
        r->path = get_path(rd, invalid);
        break;
    case SFTP_EXT_FSYNC:
        r->handle = get_str(rd);
        break;
    default: /* LIMITS has no fields; an unknown request's fields are not ours to read */
        break;
    }
}

/* The fields after the id, by type. Returns false for a type the codec does not know. */
static bool decode_fields(struct reader *rd, struct sftp_wire_request *r, bool *invalid)
{
    switch (r->type) {
    case SSH_FXP_OPEN:
        r->path = get_path(rd, invalid);
        r->pflags = get_u32(rd);
        get_attrs(rd, &r->attrs);
        return true;
    case SSH_FXP_CLOSE:
    case SSH_FXP_FSTAT:
    case SSH_FXP_READDIR:
        r->handle = get_str(rd);
        return true;
    case SSH_FXP_READ:
        r->handle = get_str(rd);
        r->offset = get_u64(rd);
        r->len = get_u32(rd);
        return true;
    case SSH_FXP_WRITE:
        r->handle = get_str(rd);
        r->offset = get_u64(rd);
        r->data = get_str(rd);
        return true;
    case SSH_FXP_LSTAT:
    case SSH_FXP_STAT:
    case SSH_FXP_OPENDIR:
    case SSH_FXP_REMOVE:
    case SSH_FXP_RMDIR:
    case SSH_FXP_REALPATH:
    case SSH_FXP_READLINK:
        r->path = get_path(rd, invalid);
        return true;
    case SSH_FXP_SETSTAT:
    case SSH_FXP_MKDIR:
        r->path = get_path(rd, invalid);
        get_attrs(rd, &r->attrs);
        return true;
    case SSH_FXP_FSETSTAT:
        r->handle = get_str(rd);
        get_attrs(rd, &r->attrs);
        return true;
    case SSH_FXP_RENAME:
    case SSH_FXP_SYMLINK:
        r->path = get_path(rd, invalid);
        r->path2 = get_path(rd, invalid);
        return true;
    case SSH_FXP_EXTENDED:
        decode_extended(rd, r, invalid);
        return true;
    default:
        return false;
    }
}

int sftp_wire_decode(const uint8_t *p, size_t len, struct sftp_wire_request *r, size_t *used)
{
    memset(r, 0, sizeof(*r));
    struct reader rd = {p, len, 0, false};
    bool invalid = false;
    r->type = get_u8(&rd);
    r->id = get_u32(&rd); /* INIT: the version */
    if (r->type != SSH_FXP_INIT)
        decode_fields(&rd, r, &invalid);
    if (rd.bad) {
        memset(r, 0, sizeof(*r));
        return SFTP_WIRE_EMALFORMED;
    }
    if (used)
        *used = rd.off;
    return invalid ? SFTP_WIRE_EINVAL : SFTP_WIRE_OK;
}

/* ---- encoding ---- */

void sftp_wire_out_init(struct sftp_wire_out *o, uint8_t *buf, size_t cap)
{
    o->p = buf;
    o->cap = cap;
    o->len = 0;
    o->start = 0;
    o->overflow = false;
}

static void put(struct sftp_wire_out *o, const void *p, size_t n)
{
    if (o->overflow || o->cap - o->len < n) {
        o->overflow = true;
        return;
    }
    if (n)
        memcpy(o->p + o->len, p, n);
    o->len += n;
}

static void be32(uint8_t *b, uint32_t v)
{
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

void sftp_wire_put_u32(struct sftp_wire_out *o, uint32_t v)
{
    uint8_t b[4];
    be32(b, v);
    put(o, b, 4);
}

void sftp_wire_put_u64(struct sftp_wire_out *o, uint64_t v)
{
    sftp_wire_put_u32(o, (uint32_t)(v >> 32));
    sftp_wire_put_u32(o, (uint32_t)v);
}

void sftp_wire_put_str(struct sftp_wire_out *o, const void *p, size_t n)
{
    if (n > UINT32_MAX) {
        o->overflow = true;
        return;
    }
    sftp_wire_put_u32(o, (uint32_t)n);
    put(o, p, n);
}

static void put_cstr(struct sftp_wire_out *o, const char *s)
{
    sftp_wire_put_str(o, s, strlen(s));
}

void sftp_wire_put_attrs(struct sftp_wire_out *o, const struct sftp_wire_attrs *a)
{
    sftp_wire_put_u32(o, a->flags);
    if (a->flags & SSH_FILEXFER_ATTR_SIZE)
        sftp_wire_put_u64(o, a->size);
    if (a->flags & SSH_FILEXFER_ATTR_UIDGID) {
        sftp_wire_put_u32(o, a->uid);
        sftp_wire_put_u32(o, a->gid);
    }
    if (a->flags & SSH_FILEXFER_ATTR_PERMISSIONS)
        sftp_wire_put_u32(o, a->perm);
    if (a->flags & SSH_FILEXFER_ATTR_ACMODTIME) {
        sftp_wire_put_u32(o, a->atime);
        sftp_wire_put_u32(o, a->mtime);
    }
    if (a->flags & SSH_FILEXFER_ATTR_EXTENDED) {
        sftp_wire_put_u32(o, a->ext_count);
        put(o, a->ext.p, a->ext.len);
    }
}

void sftp_wire_begin(struct sftp_wire_out *o, uint8_t type)
{
    o->start = o->len;
    sftp_wire_put_u32(o, 0);
    put(o, &type, 1);
}

int sftp_wire_end(struct sftp_wire_out *o)
{
    if (o->overflow || o->len - o->start - 4 > SFTP_WIRE_MAX_PACKET) {
        o->overflow = true;
        return -1;
    }
    be32(o->p + o->start, (uint32_t)(o->len - o->start - 4));
    return 0;
}

/* What VERSION advertises: name and revision of each extension served. */
static const char *const version_exts[][2] = {
    {"posix-rename@openssh.com", "1"}, {"statvfs@openssh.com", "2"},
    {"hardlink@openssh.com", "1"},     {"fsync@openssh.com", "1"},
    {"limits@openssh.com", "1"},       {"expand-path@openssh.com", "1"},
};

int sftp_wire_version(struct sftp_wire_out *o)
{
    sftp_wire_begin(o, SSH_FXP_VERSION);
    sftp_wire_put_u32(o, SFTP_WIRE_VERSION);
    for (size_t i = 0; i < sizeof(version_exts) / sizeof(version_exts[0]); i++) {
        put_cstr(o, version_exts[i][0]);
        put_cstr(o, version_exts[i][1]);
    }
    return sftp_wire_end(o);
}

int sftp_wire_status(struct sftp_wire_out *o, uint32_t id, uint32_t code, const char *msg)
{
    sftp_wire_begin(o, SSH_FXP_STATUS);
    sftp_wire_put_u32(o, id);
    sftp_wire_put_u32(o, code);
    put_cstr(o, msg ? msg : sftp_wire_status_text(code));
    put_cstr(o, "");
    return sftp_wire_end(o);
}

int sftp_wire_handle(struct sftp_wire_out *o, uint32_t id, const void *h, size_t n)
{
    sftp_wire_begin(o, SSH_FXP_HANDLE);
    sftp_wire_put_u32(o, id);
    sftp_wire_put_str(o, h, n);
    return sftp_wire_end(o);
}

int sftp_wire_attrs_reply(struct sftp_wire_out *o, uint32_t id, const struct sftp_wire_attrs *a)
{
    sftp_wire_begin(o, SSH_FXP_ATTRS);
    sftp_wire_put_u32(o, id);
    sftp_wire_put_attrs(o, a);
    return sftp_wire_end(o);
}

void sftp_wire_name_begin(struct sftp_wire_out *o, uint32_t id)
{
    sftp_wire_begin(o, SSH_FXP_NAME);
    sftp_wire_put_u32(o, id);
    sftp_wire_put_u32(o, 0); /* the count, patched by sftp_wire_name_end */
}

void sftp_wire_name_add(struct sftp_wire_out *o, const char *name, const char *longname,
                        const struct sftp_wire_attrs *a)
{
    put_cstr(o, name);
    put_cstr(o, longname);
    sftp_wire_put_attrs(o, a);
}

int sftp_wire_name_end(struct sftp_wire_out *o, uint32_t count)
{
    if (o->overflow)
        return -1;
    be32(o->p + o->start + 9, count); /* after length, type and id */
    return sftp_wire_end(o);
}

void sftp_wire_data_header(uint8_t *out, uint32_t id, uint32_t n)
{
    be32(out, n + 9); /* type, id, string length */
    out[4] = SSH_FXP_DATA;
    be32(out + 5, id);
    be32(out + 9, n);
}

int sftp_wire_statvfs_reply(struct sftp_wire_out *o, uint32_t id,
                            const struct sftp_wire_statvfs *st)
{
    const uint64_t v[] = {st->bsize, st->frsize, st->blocks, st->bfree, st->bavail, st->files,
                          st->ffree, st->favail, st->fsid,   st->flag,  st->namemax};
    sftp_wire_begin(o, SSH_FXP_EXTENDED_REPLY);
    sftp_wire_put_u32(o, id);
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        sftp_wire_put_u64(o, v[i]);
    return sftp_wire_end(o);
}

int sftp_wire_limits_reply(struct sftp_wire_out *o, uint32_t id, uint64_t max_handles)
{
    sftp_wire_begin(o, SSH_FXP_EXTENDED_REPLY);
    sftp_wire_put_u32(o, id);
    sftp_wire_put_u64(o, SFTP_WIRE_MAX_PACKET);
    sftp_wire_put_u64(o, SFTP_WIRE_MAX_READ);
    sftp_wire_put_u64(o, SFTP_WIRE_MAX_WRITE);
    sftp_wire_put_u64(o, max_handles);
    return sftp_wire_end(o);
}

static void put_wstr(struct sftp_wire_out *o, struct sftp_wire_str s)
{
    sftp_wire_put_str(o, s.p, s.len);
}

static void encode_extended(struct sftp_wire_out *o, const struct sftp_wire_request *r)
{
    put_wstr(o, r->ext_name);
    switch (r->ext) {
    case SFTP_EXT_POSIX_RENAME:
    case SFTP_EXT_HARDLINK:
        put_wstr(o, r->path);
        put_wstr(o, r->path2);
        break;
    case SFTP_EXT_STATVFS:
    case SFTP_EXT_EXPAND_PATH:
        put_wstr(o, r->path);
        break;
    case SFTP_EXT_FSYNC:
        put_wstr(o, r->handle);
        break;
    default:
        break;
    }
}

int sftp_wire_encode_request(struct sftp_wire_out *o, const struct sftp_wire_request *r)
{
    sftp_wire_begin(o, r->type);
    sftp_wire_put_u32(o, r->id);
    switch (r->type) {
    case SSH_FXP_OPEN:
        put_wstr(o, r->path);
        sftp_wire_put_u32(o, r->pflags);
        sftp_wire_put_attrs(o, &r->attrs);
        break;
    case SSH_FXP_CLOSE:
    case SSH_FXP_FSTAT:
    case SSH_FXP_READDIR:
        put_wstr(o, r->handle);
        break;
    case SSH_FXP_READ:
        put_wstr(o, r->handle);
        sftp_wire_put_u64(o, r->offset);
        sftp_wire_put_u32(o, r->len);
        break;
    case SSH_FXP_WRITE:
        put_wstr(o, r->handle);
        sftp_wire_put_u64(o, r->offset);
        put_wstr(o, r->data);
        break;
    case SSH_FXP_LSTAT:
    case SSH_FXP_STAT:
    case SSH_FXP_OPENDIR:
    case SSH_FXP_REMOVE:
    case SSH_FXP_RMDIR:
    case SSH_FXP_REALPATH:
    case SSH_FXP_READLINK:
        put_wstr(o, r->path);
        break;
    case SSH_FXP_SETSTAT:
    case SSH_FXP_MKDIR:
        put_wstr(o, r->path);
        sftp_wire_put_attrs(o, &r->attrs);
        break;
    case SSH_FXP_FSETSTAT:
        put_wstr(o, r->handle);
        sftp_wire_put_attrs(o, &r->attrs);
        break;
    case SSH_FXP_RENAME:
    case SSH_FXP_SYMLINK:
        put_wstr(o, r->path);
        put_wstr(o, r->path2);
        break;
    case SSH_FXP_EXTENDED:
        encode_extended(o, r);
        break;
    default: /* INIT (id is the version) and unknown types: nothing more */
        break;
    }
    return sftp_wire_end(o);
}

/* ---- status codes ---- */

uint32_t sftp_wire_status_from_errno(int errnum)
{
    switch (errnum) {
    case 0:
        return SSH_FX_OK;
    case ENOENT:
    case ENOTDIR:
    case EBADF:
    case ELOOP:
        return SSH_FX_NO_SUCH_FILE;
    case EPERM:
    case EACCES:
    case EFAULT:
        return SSH_FX_PERMISSION_DENIED;
    case ENAMETOOLONG:
    case EINVAL:
        return SSH_FX_BAD_MESSAGE;
    case ENOSYS:
    case EOPNOTSUPP:
        return SSH_FX_OP_UNSUPPORTED;
    default:
        return SSH_FX_FAILURE;
    }
}

const char *sftp_wire_status_text(uint32_t code)
{
    static const char *const text[] = {
        "Success",     "End of file",   "No such file",    "Permission denied",     "Failure",
        "Bad message", "No connection", "Connection lost", "Operation unsupported",
    };
    return code < sizeof(text) / sizeof(text[0]) ? text[code] : "Unknown error";
}

/* ---- ls -l lines ---- */

static char type_char(uint32_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFDIR:
        return 'd';
    case S_IFLNK:
        return 'l';
    case S_IFCHR:
        return 'c';
    case S_IFBLK:
        return 'b';
    case S_IFIFO:
        return 'p';
    case S_IFSOCK:
        return 's';
    case S_IFREG:
        return '-';
    default:
        return '?';
    }
}

/* "rwxr-xr-x" with setuid, setgid and sticky bits shown as ls shows them. */
static void perm_chars(uint32_t mode, char out[9])
{
    static const char rwx[] = "rwx";
    for (int i = 0; i < 9; i++)
        out[i] = mode & (0400u >> i) ? rwx[i % 3] : '-';
    if (mode & S_ISUID)
        out[2] = out[2] == 'x' ? 's' : 'S';
    if (mode & S_ISGID)
        out[5] = out[5] == 'x' ? 's' : 'S';
    if (mode & S_ISVTX)
        out[8] = out[8] == 'x' ? 't' : 'T';
}

size_t sftp_wire_longname(char *out, size_t cap, const struct sftp_wire_lsinfo *ls,
                          const char *name)
{
    if (cap == 0)
        return 0;
    char mode[11];
    mode[0] = type_char(ls->mode);
    perm_chars(ls->mode, mode + 1);
    mode[10] = '\0';

    /* Like ls: the time of day for files changed in the last six months, else the year. */
    char when[32] = "";
    time_t t = (time_t)ls->mtime;
    struct tm tm;
    if (localtime_r(&t, &tm)) {
        bool recent = ls->mtime <= ls->now && ls->now - ls->mtime < 365 * 24 * 3600 / 2;
        strftime(when, sizeof(when), recent ? "%b %e %H:%M" : "%b %e  %Y", &tm);
    }
    int n = snprintf(out, cap, "%s %4" PRIu64 " %-8.32s %-8.32s %8" PRIu64 " %s %s", mode,
                     ls->nlink, ls->user, ls->group, ls->size, when, name);
    if (n < 0) {
        out[0] = '\0';
        return 0;
    }
    return (size_t)n < cap ? (size_t)n : cap - 1;
}
