/* sftp_wire: every request survives encode/decode; every malformed packet is refused. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <cmocka.h>

#include "agent/sftp_wire.h"

#define S(lit) ((struct sftp_wire_str){(const uint8_t *)(lit), sizeof(lit) - 1})

static uint8_t buf[SFTP_WIRE_MAX_PACKET + 4];

/* Encodes r into buf; returns the packet length including the length field. */
static size_t encode(const struct sftp_wire_request *r)
{
    struct sftp_wire_out o;
    sftp_wire_out_init(&o, buf, sizeof(buf));
    assert_int_equal(sftp_wire_encode_request(&o, r), 0);
    uint32_t len;
    assert_int_equal(sftp_wire_frame_length(buf, &len), SFTP_WIRE_OK);
    assert_int_equal(len + 4, o.len);
    return o.len;
}

static void assert_str_eq(struct sftp_wire_str a, struct sftp_wire_str b)
{
    assert_int_equal(a.len, b.len);
    if (a.len)
        assert_memory_equal(a.p, b.p, a.len);
}

static void assert_attrs_eq(const struct sftp_wire_attrs *a, const struct sftp_wire_attrs *b)
{
    assert_int_equal(a->flags, b->flags);
    assert_true(a->size == b->size);
    assert_int_equal(a->uid, b->uid);
    assert_int_equal(a->gid, b->gid);
    assert_int_equal(a->perm, b->perm);
    assert_int_equal(a->atime, b->atime);
    assert_int_equal(a->mtime, b->mtime);
    assert_int_equal(a->ext_count, b->ext_count);
    assert_str_eq(a->ext, b->ext);
}

static void assert_request_eq(const struct sftp_wire_request *a, const struct sftp_wire_request *b)
{
    assert_int_equal(a->type, b->type);
    assert_int_equal(a->id, b->id);
    assert_int_equal(a->ext, b->ext);
    assert_str_eq(a->ext_name, b->ext_name);
    assert_str_eq(a->path, b->path);
    assert_str_eq(a->path2, b->path2);
    assert_str_eq(a->handle, b->handle);
    assert_str_eq(a->data, b->data);
    assert_true(a->offset == b->offset);
    assert_int_equal(a->len, b->len);
    assert_int_equal(a->pflags, b->pflags);
    assert_attrs_eq(&a->attrs, &b->attrs);
}

/* A raw extended-attribute block: count 2, ("a", "1"), ("user.x", "") */
static const uint8_t ext_pairs[] = {0, 0, 0,   1,   'a', 0,   0,   0,   1, '1', 0, 0,
                                    0, 6, 'u', 's', 'e', 'r', '.', 'x', 0, 0,   0, 0};

static const struct sftp_wire_attrs all_attrs = {
    .flags = SSH_FILEXFER_ATTR_SIZE | SSH_FILEXFER_ATTR_UIDGID | SSH_FILEXFER_ATTR_PERMISSIONS |
             SSH_FILEXFER_ATTR_ACMODTIME | SSH_FILEXFER_ATTR_EXTENDED,
    .size = 0x0102030405060708ull,
    .uid = 1000,
    .gid = 100,
    .perm = 0100644,
    .atime = 1700000000,
    .mtime = 0xfffffffe,
    .ext_count = 2,
    .ext = {ext_pairs, sizeof(ext_pairs)},
};

static uint8_t write_data[SFTP_WIRE_MAX_DATA];

/* One of every request the server understands, and two it does not. */
static size_t sample_requests(struct sftp_wire_request *r, size_t cap)
{
    const struct sftp_wire_str h = S("\x00\x00\x00\x01\x00\x00\x00\x07");
    struct sftp_wire_request all[] = {
        {.type = SSH_FXP_INIT, .id = 3},
        {.type = SSH_FXP_OPEN, .id = 1, .path = S("dir/file"), .pflags = 0x3f, .attrs = all_attrs},
        {.type = SSH_FXP_OPEN, .id = 2, .path = S(""), .pflags = SSH_FXF_READ},
        {.type = SSH_FXP_CLOSE, .id = 3, .handle = h},
        {.type = SSH_FXP_READ, .id = 4, .handle = h, .offset = ~0ull, .len = 1u << 31},
        {.type = SSH_FXP_WRITE, .id = 5, .handle = h, .offset = 7, .data = S("data")},
        {.type = SSH_FXP_WRITE, .id = 6, .handle = h, .data = {write_data, sizeof(write_data)}},
        {.type = SSH_FXP_LSTAT, .id = 7, .path = S("/etc")},
        {.type = SSH_FXP_FSTAT, .id = 8, .handle = h},
        {.type = SSH_FXP_SETSTAT, .id = 9, .path = S("f"), .attrs = all_attrs},
        {.type = SSH_FXP_SETSTAT,
         .id = 9,
         .path = S("f"),
         .attrs = {.flags = SSH_FILEXFER_ATTR_PERMISSIONS, .perm = 0600}},
        {.type = SSH_FXP_FSETSTAT, .id = 10, .handle = h, .attrs = all_attrs},
        {.type = SSH_FXP_OPENDIR, .id = 11, .path = S(".")},
        {.type = SSH_FXP_READDIR, .id = 12, .handle = S("")},
        {.type = SSH_FXP_REMOVE, .id = 13, .path = S("x")},
        {.type = SSH_FXP_MKDIR, .id = 14, .path = S("d"), .attrs = {.flags = 0}},
        {.type = SSH_FXP_RMDIR, .id = 15, .path = S("d")},
        {.type = SSH_FXP_REALPATH, .id = 16, .path = S("..")},
        {.type = SSH_FXP_STAT, .id = 17, .path = S("a b")},
        {.type = SSH_FXP_RENAME, .id = 18, .path = S("old"), .path2 = S("new")},
        {.type = SSH_FXP_READLINK, .id = 19, .path = S("l")},
        {.type = SSH_FXP_SYMLINK, .id = 20, .path = S("target"), .path2 = S("link")},
        {.type = SSH_FXP_EXTENDED,
         .id = 21,
         .ext = SFTP_EXT_POSIX_RENAME,
         .ext_name = S("posix-rename@openssh.com"),
         .path = S("a"),
         .path2 = S("b")},
        {.type = SSH_FXP_EXTENDED,
         .id = 22,
         .ext = SFTP_EXT_STATVFS,
         .ext_name = S("statvfs@openssh.com"),
         .path = S("/")},
        {.type = SSH_FXP_EXTENDED,
         .id = 23,
         .ext = SFTP_EXT_HARDLINK,
         .ext_name = S("hardlink@openssh.com"),
         .path = S("a"),
         .path2 = S("b")},
        {.type = SSH_FXP_EXTENDED,
         .id = 24,
         .ext = SFTP_EXT_FSYNC,
         .ext_name = S("fsync@openssh.com"),
         .handle = h},
        {.type = SSH_FXP_EXTENDED,
         .id = 25,
         .ext = SFTP_EXT_LIMITS,
         .ext_name = S("limits@openssh.com")},
        {.type = SSH_FXP_EXTENDED,
         .id = 26,
         .ext = SFTP_EXT_EXPAND_PATH,
         .ext_name = S("expand-path@openssh.com"),
         .path = S("~/x")},
        {.type = SSH_FXP_EXTENDED, .id = 27, .ext = SFTP_EXT_UNKNOWN, .ext_name = S("copy-data")},
        {.type = 99, .id = 28},
    };
    size_t n = sizeof(all) / sizeof(all[0]);
    assert_true(n <= cap);
    memcpy(r, all, sizeof(all));
    return n;
}

static void test_frame_length_bounds(void **state)
{
    (void)state;
    const struct {
        uint32_t v;
        int rc;
    } cases[] = {
        {0, SFTP_WIRE_EMALFORMED},
        {4, SFTP_WIRE_EMALFORMED},
        {SFTP_WIRE_MIN_PACKET, SFTP_WIRE_OK},
        {SFTP_WIRE_MAX_PACKET, SFTP_WIRE_OK},
        {SFTP_WIRE_MAX_PACKET + 1, SFTP_WIRE_EMALFORMED},
        {0x7fffffff, SFTP_WIRE_EMALFORMED},
        {0xffffffff, SFTP_WIRE_EMALFORMED},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint8_t hdr[4] = {(uint8_t)(cases[i].v >> 24), (uint8_t)(cases[i].v >> 16),
                          (uint8_t)(cases[i].v >> 8), (uint8_t)cases[i].v};
        uint32_t len = 12345;
        assert_int_equal(sftp_wire_frame_length(hdr, &len), cases[i].rc);
        if (cases[i].rc == SFTP_WIRE_OK)
            assert_int_equal(len, cases[i].v);
        else
            assert_int_equal(len, 12345); /* untouched */
    }
}

static void test_requests_round_trip(void **state)
{
    (void)state;
    memset(write_data, 0xa5, sizeof(write_data));
    struct sftp_wire_request reqs[40], got;
    size_t n = sample_requests(reqs, 40);
    for (size_t i = 0; i < n; i++) {
        size_t len = encode(&reqs[i]);
        size_t used = 0;
        assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, &used), SFTP_WIRE_OK);
        assert_int_equal(used, len - 4);
        assert_request_eq(&got, &reqs[i]);
    }
}

/* Cutting any known request anywhere short of its end overruns a field. */
static void test_every_truncation_is_malformed(void **state)
{
    (void)state;
    struct sftp_wire_request reqs[40], got;
    size_t n = sample_requests(reqs, 40);
    for (size_t i = 0; i < n; i++) {
        if (reqs[i].data.len > 100) /* the big WRITE: same code path, too slow byte by byte */
            continue;
        size_t len = encode(&reqs[i]);
        size_t needed = len - 4;
        if (reqs[i].type == SSH_FXP_INIT || reqs[i].ext == SFTP_EXT_UNKNOWN || reqs[i].type == 99)
            needed = reqs[i].ext == SFTP_EXT_UNKNOWN ? 5 + 4 + reqs[i].ext_name.len : 5;
        for (size_t cut = 0; cut < needed; cut++) {
            /* A copy of exactly cut bytes, so a sanitizer would see any over-read. */
            uint8_t *p = malloc(cut ? cut : 1);
            memcpy(p, buf + 4, cut);
            got.type = 77;
            assert_int_equal(sftp_wire_decode(p, cut, &got, NULL), SFTP_WIRE_EMALFORMED);
            assert_int_equal(got.type, 0); /* nothing half-decoded is left behind */
            free(p);
        }
    }
}

/* Writes a big-endian uint32 at p. */
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* String lengths that claim more than the packet holds, however large. */
static void test_string_length_lies(void **state)
{
    (void)state;
    struct sftp_wire_request r = {.type = SSH_FXP_RENAME, .id = 1, .path = S("a"), .path2 = S("b")},
                             got;
    size_t len = encode(&r);
    const uint32_t lies[] = {3, 0x100, 0x7fffffff, 0x80000000, 0xfffffffb, 0xffffffff};
    for (size_t i = 0; i < sizeof(lies) / sizeof(lies[0]); i++) {
        for (size_t at = 5; at <= 10; at += 5) { /* the first and the second string */
            encode(&r);
            put32(buf + 4 + at, lies[i]);
            assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_EMALFORMED);
        }
    }
}

/* Attributes: flags that announce fields not there; an extended count larger than the
 * pairs that follow; a pair whose value overruns. */
static void test_attrs_lies(void **state)
{
    (void)state;
    struct sftp_wire_request got;
    struct sftp_wire_request r = {
        .type = SSH_FXP_SETSTAT, .id = 1, .path = S("f"), .attrs = all_attrs};
    size_t len = encode(&r);
    size_t ext_count_at = len - sizeof(ext_pairs) - 4; /* the count before the pairs */
    const uint32_t counts[] = {3, 1000, 0xffffffff};
    for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
        encode(&r);
        put32(buf + ext_count_at, counts[i]);
        assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_EMALFORMED);
    }
    /* A count of 1 leaves the second pair as trailing bytes: accepted, not consumed. */
    encode(&r);
    put32(buf + ext_count_at, 1);
    size_t used;
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, &used), SFTP_WIRE_OK);
    assert_int_equal(got.attrs.ext_count, 1);
    assert_int_equal(got.attrs.ext.len, 10);
    assert_true(used < len - 4);

    /* Flags announcing every field, with none present. */
    struct sftp_wire_request bare = {.type = SSH_FXP_SETSTAT, .id = 1, .path = S("f")};
    len = encode(&bare);
    put32(buf + len - 4, all_attrs.flags);
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_EMALFORMED);
}

static void test_paths_too_long_or_with_nul(void **state)
{
    (void)state;
    static uint8_t longpath[SFTP_WIRE_MAX_PATH + 1];
    memset(longpath, 'a', sizeof(longpath));
    struct sftp_wire_request got;

    struct sftp_wire_request r = {
        .type = SSH_FXP_STAT, .id = 42, .path = {longpath, SFTP_WIRE_MAX_PATH}};
    size_t len = encode(&r);
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_OK);

    r.path.len = SFTP_WIRE_MAX_PATH + 1;
    len = encode(&r);
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_EINVAL);
    assert_int_equal(got.type, SSH_FXP_STAT); /* so the server can answer this request */
    assert_int_equal(got.id, 42);

    struct sftp_wire_request nul = {
        .type = SSH_FXP_SYMLINK, .id = 43, .path = S("ok"), .path2 = S("bad\0name")};
    len = encode(&nul);
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_EINVAL);
    assert_int_equal(got.id, 43);

    struct sftp_wire_request ext = {.type = SSH_FXP_EXTENDED,
                                    .id = 44,
                                    .ext = SFTP_EXT_STATVFS,
                                    .ext_name = S("statvfs@openssh.com"),
                                    .path = S("\0")};
    len = encode(&ext);
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_EINVAL);

    /* Handles and data are bytes, not paths: NULs are fine there. */
    struct sftp_wire_request w = {
        .type = SSH_FXP_WRITE, .id = 45, .handle = S("\0\0"), .data = S("\0")};
    len = encode(&w);
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4, &got, NULL), SFTP_WIRE_OK);
}

/* Later protocol versions add fields; OpenSSH ignores what follows the fields it knows. */
static void test_trailing_bytes_and_unknown_types(void **state)
{
    (void)state;
    struct sftp_wire_request got;
    struct sftp_wire_request r = {.type = SSH_FXP_STAT, .id = 9, .path = S("x")};
    size_t len = encode(&r);
    memcpy(buf + len, "\x00\x00\x00\x01", 4); /* v4's flags field */
    size_t used;
    assert_int_equal(sftp_wire_decode(buf + 4, len - 4 + 4, &got, &used), SFTP_WIRE_OK);
    assert_int_equal(used, len - 4);

    const uint8_t unknown[] = {150, 0, 0, 1, 2, 0xde, 0xad};
    assert_int_equal(sftp_wire_decode(unknown, sizeof(unknown), &got, NULL), SFTP_WIRE_OK);
    assert_int_equal(got.type, 150);
    assert_int_equal(got.id, 0x102);

    const uint8_t ext[] = {SSH_FXP_EXTENDED, 0, 0, 0, 5, 0, 0, 0, 3, 'f', 'o', 'o', 1, 2, 3};
    assert_int_equal(sftp_wire_decode(ext, sizeof(ext), &got, NULL), SFTP_WIRE_OK);
    assert_int_equal(got.ext, SFTP_EXT_UNKNOWN);
    assert_int_equal(got.ext_name.len, 3);

    /* A known name that is a prefix of another is not that other. */
    const uint8_t prefix[] = {
        SSH_FXP_EXTENDED, 0, 0, 0, 5, 0, 0, 0, 7, 'l', 'i', 'm', 'i', 't', 's', '@'};
    assert_int_equal(sftp_wire_decode(prefix, sizeof(prefix), &got, NULL), SFTP_WIRE_OK);
    assert_int_equal(got.ext, SFTP_EXT_UNKNOWN);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void test_replies(void **state)
{
    (void)state;
    struct sftp_wire_out o;

    sftp_wire_out_init(&o, buf, sizeof(buf));
    assert_int_equal(sftp_wire_status(&o, 7, SSH_FX_NO_SUCH_FILE, NULL), 0);
    const uint8_t status[] = {0,   0,   0,   29,  SSH_FXP_STATUS,
                              0,   0,   0,   7,   0,
                              0,   0,   2,   0,   0,
                              0,   12,  'N', 'o', ' ',
                              's', 'u', 'c', 'h', ' ',
                              'f', 'i', 'l', 'e', 0,
                              0,   0,   0};
    assert_int_equal(o.len, sizeof(status));
    assert_memory_equal(buf, status, sizeof(status));

    /* VERSION: 3, then name/revision pairs including the extensions OpenSSH clients use. */
    sftp_wire_out_init(&o, buf, sizeof(buf));
    assert_int_equal(sftp_wire_version(&o), 0);
    assert_int_equal(get32(buf), o.len - 4);
    assert_int_equal(buf[4], SSH_FXP_VERSION);
    assert_int_equal(get32(buf + 5), 3);
    assert_non_null(memmem(buf, o.len,
                           "\0\0\0\x18posix-rename@openssh.com\0\0\0\x01"
                           "1",
                           33));
    assert_non_null(memmem(buf, o.len, "limits@openssh.com", 18));
    assert_non_null(memmem(buf, o.len,
                           "statvfs@openssh.com\0\0\0\x01"
                           "2",
                           24));

    /* NAME, built entry by entry: the count is patched in. */
    sftp_wire_out_init(&o, buf, sizeof(buf));
    struct sftp_wire_attrs none = {0};
    sftp_wire_name_begin(&o, 5);
    sftp_wire_name_add(&o, "a", "la", &none);
    sftp_wire_name_add(&o, "b", "lb", &all_attrs);
    assert_int_equal(sftp_wire_name_end(&o, 2), 0);
    assert_int_equal(get32(buf), o.len - 4);
    assert_int_equal(get32(buf + 9), 2);
    struct sftp_wire_out o2;
    static uint8_t again[1024];
    sftp_wire_out_init(&o2, again, sizeof(again));
    sftp_wire_put_attrs(&o2, &all_attrs);
    assert_memory_equal(buf + o.len - o2.len, again, o2.len);

    /* DATA's header, for data read in place behind it. */
    uint8_t hdr[SFTP_WIRE_DATA_HEADER];
    sftp_wire_data_header(hdr, 0x01020304, 65536);
    const uint8_t want[] = {0, 1, 0, 9, SSH_FXP_DATA, 1, 2, 3, 4, 0, 1, 0, 0};
    assert_memory_equal(hdr, want, sizeof(want));

    /* limits@openssh.com: four uint64. */
    sftp_wire_out_init(&o, buf, sizeof(buf));
    assert_int_equal(sftp_wire_limits_reply(&o, 3, 64), 0);
    assert_int_equal(o.len, 4 + 1 + 4 + 32);
    assert_int_equal(buf[4], SSH_FXP_EXTENDED_REPLY);
    assert_int_equal(get32(buf + 9 + 4), SFTP_WIRE_MAX_PACKET);
    assert_int_equal(get32(buf + 17 + 4), SFTP_WIRE_MAX_READ);
    assert_int_equal(get32(buf + 25 + 4), SFTP_WIRE_MAX_WRITE);
    assert_int_equal(get32(buf + 33 + 4), 64);

    struct sftp_wire_statvfs sv = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    sftp_wire_out_init(&o, buf, sizeof(buf));
    assert_int_equal(sftp_wire_statvfs_reply(&o, 3, &sv), 0);
    assert_int_equal(o.len, 4 + 1 + 4 + 88);
    for (uint32_t i = 0; i < 11; i++)
        assert_int_equal(get32(buf + 9 + 8 * i + 4), i + 1);
}

/* A reply that does not fit says so and writes nothing past the buffer. */
static void test_reply_overflow(void **state)
{
    (void)state;
    uint8_t small[40];
    memset(small, 0xee, sizeof(small));
    struct sftp_wire_out o;
    sftp_wire_out_init(&o, small, 32);
    assert_int_equal(sftp_wire_status(&o, 1, SSH_FX_FAILURE, "a message that is too long"), -1);
    assert_true(o.overflow);
    assert_true(o.len <= 32);
    for (size_t i = 32; i < sizeof(small); i++)
        assert_int_equal(small[i], 0xee);
    sftp_wire_out_init(&o, small, 12);
    sftp_wire_name_begin(&o, 1);
    sftp_wire_name_add(&o, "x", "x", &all_attrs);
    assert_int_equal(sftp_wire_name_end(&o, 1), -1);
}

static void test_errno_mapping(void **state)
{
    (void)state;
    assert_int_equal(sftp_wire_status_from_errno(0), SSH_FX_OK);
    assert_int_equal(sftp_wire_status_from_errno(ENOENT), SSH_FX_NO_SUCH_FILE);
    assert_int_equal(sftp_wire_status_from_errno(ENOTDIR), SSH_FX_NO_SUCH_FILE);
    assert_int_equal(sftp_wire_status_from_errno(EACCES), SSH_FX_PERMISSION_DENIED);
    assert_int_equal(sftp_wire_status_from_errno(EPERM), SSH_FX_PERMISSION_DENIED);
    assert_int_equal(sftp_wire_status_from_errno(EINVAL), SSH_FX_BAD_MESSAGE);
    assert_int_equal(sftp_wire_status_from_errno(ENOSYS), SSH_FX_OP_UNSUPPORTED);
    assert_int_equal(sftp_wire_status_from_errno(EEXIST), SSH_FX_FAILURE);
    assert_int_equal(sftp_wire_status_from_errno(ENOSPC), SSH_FX_FAILURE);
    assert_string_equal(sftp_wire_status_text(SSH_FX_NO_SUCH_FILE), "No such file");
    assert_string_equal(sftp_wire_status_text(SSH_FX_PERMISSION_DENIED), "Permission denied");
    assert_string_equal(sftp_wire_status_text(1000), "Unknown error");
}

static void test_longname(void **state)
{
    (void)state;
    setenv("TZ", "UTC", 1);
    tzset();
    char out[512];
    struct sftp_wire_lsinfo ls = {.mode = S_IFREG | 0644,
                                  .nlink = 1,
                                  .user = "alice",
                                  .group = "staff",
                                  .size = 1234,
                                  .mtime = 1700000000,
                                  .now = 1700000000 + 3600};
    sftp_wire_longname(out, sizeof(out), &ls, "notes.txt");
    assert_string_equal(out, "-rw-r--r--    1 alice    staff        1234 Nov 14 22:13 notes.txt");

    /* Older than six months: the year instead of the time. Special bits as ls shows them. */
    ls.mode = S_IFDIR | S_ISVTX | 0777;
    ls.now = 1700000000 + 200 * 24 * 3600;
    sftp_wire_longname(out, sizeof(out), &ls, "tmp");
    assert_string_equal(out, "drwxrwxrwt    1 alice    staff        1234 Nov 14  2023 tmp");
    ls.mode = S_IFREG | S_ISUID | S_ISGID | 0644;
    sftp_wire_longname(out, sizeof(out), &ls, "x");
    assert_memory_equal(out, "-rwSr-Sr--", 10);
    ls.mode = S_IFLNK | 0777;
    sftp_wire_longname(out, sizeof(out), &ls, "l");
    assert_memory_equal(out, "lrwxrwxrwx", 10);

    /* Cut to the buffer, NUL-terminated. */
    char small[16];
    size_t n = sftp_wire_longname(small, sizeof(small), &ls, "a-long-name");
    assert_int_equal(n, sizeof(small) - 1);
    assert_int_equal(strlen(small), sizeof(small) - 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame_length_bounds),
        cmocka_unit_test(test_requests_round_trip),
        cmocka_unit_test(test_every_truncation_is_malformed),
        cmocka_unit_test(test_string_length_lies),
        cmocka_unit_test(test_attrs_lies),
        cmocka_unit_test(test_paths_too_long_or_with_nul),
        cmocka_unit_test(test_trailing_bytes_and_unknown_types),
        cmocka_unit_test(test_replies),
        cmocka_unit_test(test_reply_overflow),
        cmocka_unit_test(test_errno_mapping),
        cmocka_unit_test(test_longname),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
