#include "wsframe.h"

#include <string.h>

void wsframe_parser_init(struct wsframe_parser *p, uint64_t max_message)
{
    memset(p, 0, sizeof(*p));
    p->max_message = max_message;
    p->hdr_need = 2;
}

const char *wsframe_strerror(int err)
{
    switch (err) {
    case WSFRAME_E_RSV:
        return "frame with RSV bits set";
    case WSFRAME_E_OPCODE:
        return "frame with a reserved opcode";
    case WSFRAME_E_MASKED:
        return "masked frame from the server";
    case WSFRAME_E_CONTROL:
        return "bad control frame";
    case WSFRAME_E_SEQUENCE:
        return "bad fragment sequence";
    case WSFRAME_E_LENGTH:
        return "frame or message too long";
    case WSFRAME_E_CALLBACK:
        return "stopped";
    default:
        return "unknown error";
    }
}

static bool is_control(uint8_t op)
{
    return op & 0x8;
}

/* The header is complete: check it and set up the payload phase. */
static int start_frame(struct wsframe_parser *p)
{
    uint8_t b0 = p->hdr[0], b1 = p->hdr[1];
    p->fin = b0 & 0x80;
    p->opcode = b0 & 0x0f;
    uint64_t len = b1 & 0x7f;
    if (len == 126)
        len = ((uint64_t)p->hdr[2] << 8) | p->hdr[3];
    else if (len == 127) {
        len = 0;
        for (int i = 2; i < 10; i++)
            len = (len << 8) | p->hdr[i];
        if (len >> 63)
            return WSFRAME_E_LENGTH;
    }
    if (is_control(p->opcode)) {
        if (!p->fin || len > WSFRAME_MAX_CONTROL)
            return WSFRAME_E_CONTROL;
        p->control_len = 0;
    } else if (p->opcode == WSFRAME_CONTINUATION) {
        if (!p->in_message)
            return WSFRAME_E_SEQUENCE;
    } else {
        if (p->in_message)
            return WSFRAME_E_SEQUENCE;
        p->in_message = true;
        p->message_binary = p->opcode == WSFRAME_BINARY;
        p->message_len = 0;
    }
    if (!is_control(p->opcode)) {
        p->message_len += len;
        if (p->max_message && p->message_len > p->max_message)
            return WSFRAME_E_LENGTH;
    }
    p->remaining = len;
    p->in_payload = true;
    return 0;
}

/* The number of header bytes, once the first two are known. */
static int header_size(struct wsframe_parser *p)
{
    uint8_t b0 = p->hdr[0], b1 = p->hdr[1];
    if (b0 & 0x70)
        return WSFRAME_E_RSV;
    uint8_t op = b0 & 0x0f;
    if ((op > WSFRAME_BINARY && op < WSFRAME_CLOSE) || op > WSFRAME_PONG)
        return WSFRAME_E_OPCODE;
    if (b1 & 0x80)
        return WSFRAME_E_MASKED;
    uint8_t l = b1 & 0x7f;
    return l == 126 ? 4 : l == 127 ? 10 : 2;
}

/* Delivers (part of) a payload; finishes the frame when nothing remains. */
static int payload(struct wsframe_parser *p, const uint8_t *d, size_t n,
                   const struct wsframe_events *ev, void *ud)
{
    p->remaining -= n;
    bool frame_done = p->remaining == 0;
    if (is_control(p->opcode)) {
        memcpy(p->control + p->control_len, d, n);
        p->control_len = (uint8_t)(p->control_len + n);
        if (frame_done) {
            p->in_payload = false;
            if (ev->control(ud, p->opcode, p->control, p->control_len))
                return WSFRAME_E_CALLBACK;
        }
        return 0;
    }
    bool final = frame_done && p->fin;
    if (frame_done) {
        p->in_payload = false;
        if (p->fin)
            p->in_message = false;
    }
    /* Empty pieces are delivered only when they end a message (an empty message). */
    if ((n > 0 || final) && ev->data(ud, d, n, p->message_binary, final))
        return WSFRAME_E_CALLBACK;
    return 0;
}

int wsframe_parse(struct wsframe_parser *p, const uint8_t *data, size_t len,
                  const struct wsframe_events *ev, void *ud)
{
    size_t i = 0;
    for (;;) {
        if (p->in_payload) {
            size_t n = len - i;
            if (n > p->remaining)
                n = (size_t)p->remaining;
            int rc = payload(p, data + i, n, ev, ud);
            if (rc < 0)
                return rc;
            i += n;
            if (p->in_payload) /* the input ended inside the payload */
                return 0;
            p->hdr_len = 0;
            p->hdr_need = 2;
            continue;
        }
        if (i == len)
            return 0;
        while (p->hdr_len < p->hdr_need && i < len)
            p->hdr[p->hdr_len++] = data[i++];
        if (p->hdr_len < p->hdr_need)
            return 0;
        if (p->hdr_need == 2) {
            int need = header_size(p);
            if (need < 0)
                return need;
            p->hdr_need = (uint8_t)need;
            if (p->hdr_len < p->hdr_need)
                continue;
        }
        int rc = start_frame(p);
        if (rc < 0)
            return rc;
        if (p->remaining == 0) { /* an empty frame: deliver it now */
            rc = payload(p, data + i, 0, ev, ud);
            if (rc < 0)
                return rc;
            p->hdr_len = 0;
            p->hdr_need = 2;
        }
    }
}

size_t wsframe_header(uint8_t *out, uint8_t opcode, bool fin, uint64_t len, const uint8_t mask[4])
{
    size_t n = 2;
    out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0x0f));
    if (len < 126) {
        out[1] = (uint8_t)(0x80 | len);
    } else if (len <= 0xffff) {
        out[1] = 0x80 | 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        n = 4;
    } else {
        out[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        n = 10;
    }
    memcpy(out + n, mask, 4);
    return n + 4;
}

/* 16 bytes at a time: plain SSE2 on x86-64, and memory-bound in practice. */
typedef uint8_t wsframe_vec __attribute__((vector_size(16)));

void wsframe_mask(uint8_t *p, size_t len, const uint8_t mask[4], size_t offset)
{
    uint8_t rot[16];
    for (int k = 0; k < 16; k++)
        rot[k] = mask[(offset + (size_t)k) & 3];
    wsframe_vec m;
    memcpy(&m, rot, sizeof(m));
    size_t i = 0;
    for (; i + 16 <= len; i += 16) {
        wsframe_vec w;
        memcpy(&w, p + i, sizeof(w));
        w ^= m;
        memcpy(p + i, &w, sizeof(w));
    }
    for (; i < len; i++)
        p[i] ^= mask[(offset + i) & 3];
}
