/*
 * libFuzzer target for agent/sftp_wire's packet decoder.
 *
 * The input is what a client might write to the server: packets back to back, each a
 * length field and a body. Each length goes through sftp_wire_frame_length; each body (or
 * what is left of it when the input ends early, a length that lies) is copied into a
 * buffer of exactly its size, so ASan sees any over-read, and decoded. Whatever decodes
 * must re-encode to the same bytes, and its strings must lie inside the body. The whole
 * input is also decoded as one body, to reach lengths the framing forbids. Decoded paths
 * are then used to build replies, as the server would.
 *
 * Invariant violations call abort(), which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/sftp_wire.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

static uint8_t out[SFTP_WIRE_MAX_PACKET + 64];

static void check_str(struct sftp_wire_str s, const uint8_t *p, size_t len)
{
    if (s.len == 0)
        return;
    CHECK(s.p >= p && s.p + s.len <= p + len);
}

static void check_path(struct sftp_wire_str s)
{
    CHECK(s.len <= SFTP_WIRE_MAX_PATH);
    CHECK(s.len == 0 || !memchr(s.p, 0, s.len));
}

/* Uses a path as the server would: in a NAME reply and an ls line. */
static void reply_with(const struct sftp_wire_request *r, struct sftp_wire_str path)
{
    static char name[SFTP_WIRE_MAX_PATH + 1];
    memcpy(name, path.p ? (const char *)path.p : "", path.len);
    name[path.len] = '\0';
    char longname[512];
    struct sftp_wire_lsinfo ls = {.mode = r->attrs.perm,
                                  .nlink = r->offset,
                                  .user = "u",
                                  .group = "g",
                                  .size = r->attrs.size,
                                  .mtime = (int32_t)r->attrs.mtime,
                                  .now = r->id};
    sftp_wire_longname(longname, sizeof(longname), &ls, name);
    CHECK(strlen(longname) < sizeof(longname));

    struct sftp_wire_out o;
    sftp_wire_out_init(&o, out, sizeof(out));
    sftp_wire_name_begin(&o, r->id);
    sftp_wire_name_add(&o, name, longname, &r->attrs);
    CHECK(sftp_wire_name_end(&o, 1) == 0);
    uint32_t len;
    CHECK(sftp_wire_frame_length(out, &len) == SFTP_WIRE_OK && len + 4 == o.len);
}

static void check_body(const uint8_t *p, size_t len)
{
    struct sftp_wire_request r;
    size_t used = 0;
    int rc = sftp_wire_decode(p, len, &r, &used);
    CHECK(rc == SFTP_WIRE_OK || rc == SFTP_WIRE_EINVAL || rc == SFTP_WIRE_EMALFORMED);
    if (rc == SFTP_WIRE_EMALFORMED) {
        CHECK(r.type == 0 && r.id == 0);
        return;
    }
    CHECK(len >= SFTP_WIRE_MIN_PACKET && used >= SFTP_WIRE_MIN_PACKET && used <= len);
    CHECK(r.type == p[0]);
    const struct sftp_wire_str strs[] = {r.ext_name, r.path, r.path2,
                                         r.handle,   r.data, r.attrs.ext};
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
        check_str(strs[i], p, len);
    if (rc == SFTP_WIRE_EINVAL)
        return;
    check_path(r.path);
    check_path(r.path2);

    /* Re-encoding gives back the bytes the decoder used. */
    struct sftp_wire_out o;
    sftp_wire_out_init(&o, out, sizeof(out));
    CHECK(sftp_wire_encode_request(&o, &r) == 0);
    CHECK(o.len == used + 4);
    CHECK(memcmp(out + 4, p, used) == 0);

    reply_with(&r, r.path);
    CHECK(sftp_wire_status_text(sftp_wire_status_from_errno((int)r.id & 0xff)) != NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *whole = malloc(size ? size : 1);
    memcpy(whole, data, size);
    check_body(whole, size);
    free(whole);

    size_t off = 0;
    while (size - off >= 4) {
        uint32_t len = 0;
        if (sftp_wire_frame_length(data + off, &len) != SFTP_WIRE_OK) {
            uint32_t v = (uint32_t)data[off] << 24 | (uint32_t)data[off + 1] << 16 |
                         (uint32_t)data[off + 2] << 8 | data[off + 3];
            CHECK(v < SFTP_WIRE_MIN_PACKET || v > SFTP_WIRE_MAX_PACKET);
            break;
        }
        off += 4;
        size_t avail = size - off < len ? size - off : len;
        uint8_t *body = malloc(avail ? avail : 1);
        memcpy(body, data + off, avail);
        check_body(body, avail);
        free(body);
        off += avail;
    }
    return 0;
}
