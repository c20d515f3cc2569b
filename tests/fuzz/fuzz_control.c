/*
 * libFuzzer target for proto_control_parse: the JSON control messages of stream 0.
 *
 * The input is a CONTROL payload. Whatever the parser accepts must validate, serialise, parse
 * again and compare equal: the agent and the relay re-send what they built, so a message that
 * only survives one direction would break the other end. Rejections must say why.
 *
 * Invariant violations call abort(), which libFuzzer reports as a crash.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

static void check_round_trip(const json_t *msg)
{
    CHECK(proto_control_validate(msg, NULL, 0) == 0);
    char *s = json_dumps(msg, JSON_COMPACT);
    CHECK(s != NULL);
    size_t n = strlen(s);
    /* Serialising can lengthen a message (1E2 becomes 100.0), past the limit in theory. */
    if (n <= PROTO_MAX_CONTROL) {
        json_t *again;
        char err[128];
        CHECK(proto_control_parse((const uint8_t *)s, n, &again, err, sizeof(err)) == 0);
        CHECK(json_equal(msg, again));
        json_decref(again);
    }
    free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t *msg = (json_t *)0x1;
    char err[256];
    err[0] = '\0';
    int rc = proto_control_parse(data, size, &msg, err, sizeof(err));
    if (rc == 0) {
        CHECK(msg != NULL && json_is_object(msg));
        CHECK(json_is_string(json_object_get(msg, "type")));
        check_round_trip(msg);
        json_decref(msg);
        return 0;
    }
    CHECK(msg == NULL);
    CHECK(err[0] != '\0');
    if (size == 0 || size > PROTO_MAX_CONTROL)
        CHECK(rc == PROTO_E_LENGTH);
    else
        CHECK(rc == PROTO_E_JSON);
    return 0;
}
