/*
 * clock: wall-clock time as the wire carries it (unix milliseconds: stats' last_activity,
 * lifecycle's changed_at, log records, metadata's collected_at). Durations use the loop's
 * monotonic clock (uv_now) instead.
 */
#ifndef TETHER_CLOCK_H
#define TETHER_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t clock_unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif
