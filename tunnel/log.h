/*
 * log: one line per event on stderr, with a level and a timestamp. No secrets go through
 * here: callers never pass tokens. The level is the only setting; main.c owns it.
 */
#ifndef TETHER_LOG_H
#define TETHER_LOG_H

#include <stddef.h>

enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

/* Defined in agent/main.c: the one piece of process-wide configuration. */
extern int tether_log_level;

/*
 * Also defined in agent/main.c: where log lines go besides stderr (the agent sends its own
 * to the relay, agent/agentlog.h). fn gets the message without timestamp or newline; it
 * must not log itself. fn NULL: stderr only.
 */
struct log_sink {
    void (*fn)(void *ud, enum log_level level, const char *msg, size_t len);
    void *ud;
};
extern struct log_sink tether_log_sink;

void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...)                                                                             \
    do {                                                                                           \
        if (tether_log_level >= LOG_DEBUG)                                                         \
            log_msg(LOG_DEBUG, __VA_ARGS__);                                                       \
    } while (0)

/* Parses "error", "warn", "info" or "debug"; returns the level or -1. */
int log_level_parse(const char *name);

#endif
