#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void log_msg(enum log_level level, const char *fmt, ...)
{
    if ((int)level > tether_log_level)
        return;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char line[1024];
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (int)(tv.tv_usec / 1000), level_names[level]);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    /* One write per line, so lines from several processes sharing stderr do not interleave. */
    size_t len = strlen(line);
    if (len < sizeof(line) - 1)
        line[len++] = '\n';
    else
        line[sizeof(line) - 2] = '\n', len = sizeof(line) - 1;
    fwrite(line, 1, len, stderr);
    if (tether_log_sink.fn && level <= LOG_INFO)
        tether_log_sink.fn(tether_log_sink.ud, level, line + n, len - 1 - (size_t)n);
}

int log_level_parse(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    return -1;
}
