/* Workspace scripts (agent/script.c) and metadata (agent/metadata.c): real processes on a
 * real loop, each wait bounded by a timer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "agent/metadata.h"
#include "agent/script.h"
#include "tunnel/log.h"

int tether_log_level = LOG_ERROR;
struct log_sink tether_log_sink;

#define T_LINES_KEPT 1024u /* lines a test keeps the text of (the rest are counted) */
#define T_REPORTS_KEPT 64u /* metadata messages a test keeps */
#define T_WAIT_MS 10000u   /* the longest any single wait may take before the test fails */
#define T_SLACK_MS 700u    /* scheduling slack on top of an expected delay */
#define T_RECHECK_MS 5u    /* how often run_until looks at its condition */
#define T_SLOW_LINE_NS 1000u

static char *const test_env[] = {"PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar", NULL};

struct ctx {
    uv_loop_t loop;
    struct proc_reaper reaper;
    uv_timer_t guard;
    uv_timer_t recheck; /* run_until's predicate is looked at every T_RECHECK_MS */
    bool expired;
    struct metadata *m;

    struct script *s;
    char *lines[T_LINES_KEPT];
    size_t nlines;     /* all lines seen */
    size_t line_bytes; /* their bytes together */
    bool bad_source;
    bool free_in_line;
    bool free_in_exit;
    bool slow_consumer; /* on_line takes T_SLOW_LINE_NS per line, as a busy agent might */
    int nexits;
    struct script_result res;
    char *output; /* a copy of res.output */
    uint64_t started_ms, exit_ms;
    size_t lines_at_exit;

    uv_timer_t ticker; /* the flood test's 10 ms timer */
    unsigned ticks;
    uint64_t last_tick_ms, max_gap_ms;

    char last_line[128]; /* the start of the latest line */

    json_t *reports[T_REPORTS_KEPT];
    size_t nreports;
    const char *want_key; /* wait_reports: until want_key was reported want_n times */
    size_t want_n;
    char dir[64]; /* a scratch directory for the metadata scripts' state */
};

/* ---- harness ---- */

static void on_guard(uv_timer_t *t)
{
    struct ctx *c = t->data;
    c->expired = true;
}

/* Runs the loop until pred holds or ms passed; returns pred. */
static void on_recheck(uv_timer_t *t)
{
    (void)t; /* only wakes the loop: UV_RUN_ONCE may otherwise sleep past the condition */
}

static bool run_until(struct ctx *c, bool (*pred)(struct ctx *c), uint64_t ms)
{
    c->expired = false;
    uv_timer_start(&c->guard, on_guard, ms, 0);
    uv_timer_start(&c->recheck, on_recheck, T_RECHECK_MS, T_RECHECK_MS);
    while (!pred(c) && !c->expired)
        uv_run(&c->loop, UV_RUN_ONCE);
    uv_timer_stop(&c->guard);
    uv_timer_stop(&c->recheck);
    return pred(c);
}

static bool never(struct ctx *c)
{
    (void)c;
    return false;
}

/* Runs the loop for ms, whatever happens. */
static void run_for(struct ctx *c, uint64_t ms)
{
    run_until(c, never, ms);
}

static bool has_exited(struct ctx *c)
{
    return c->nexits > 0;
}

static int setup(void **state)
{
    struct ctx *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    assert_int_equal(uv_loop_init(&c->loop), 0);
    assert_int_equal(proc_reaper_init(&c->reaper, &c->loop), 0);
    /* As the agent does when it is PID 1: this process is the test's subreaper (main), so
     * orphaned grandchildren are ours to collect, not left as zombies in their group. */
    c->reaper.reap_orphans = true;
    uv_timer_init(&c->loop, &c->guard);
    c->guard.data = c;
    uv_timer_init(&c->loop, &c->ticker);
    c->ticker.data = c;
    uv_timer_init(&c->loop, &c->recheck);
    snprintf(c->dir, sizeof(c->dir), "/tmp/tether-test-script-XXXXXX");
    assert_non_null(mkdtemp(c->dir));
    *state = c;
    return 0;
}

static void close_left(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h)) {
        (*(unsigned *)arg)++;
        uv_close(h, NULL);
    }
}

static int teardown(void **state)
{
    struct ctx *c = *state;
    script_free(c->s);
    metadata_free(c->m);
    proc_reaper_close(&c->reaper, NULL);
    uv_close((uv_handle_t *)&c->guard, NULL);
    uv_close((uv_handle_t *)&c->ticker, NULL);
    uv_close((uv_handle_t *)&c->recheck, NULL);
    uv_run(&c->loop, UV_RUN_NOWAIT); /* the close callbacks */
    /* Every handle of the scripts and metadata was closed: nothing is left on the loop.
     * (What is left is closed here so a failing test cannot hang the run.) */
    unsigned left = 0;
    uv_walk(&c->loop, close_left, &left);
    uv_run(&c->loop, UV_RUN_DEFAULT);
    assert_int_equal(left, 0);
    assert_int_equal(uv_loop_close(&c->loop), 0);
    for (size_t i = 0; i < c->nlines && i < T_LINES_KEPT; i++)
        free(c->lines[i]);
    for (size_t i = 0; i < c->nreports && i < T_REPORTS_KEPT; i++)
        json_decref(c->reports[i]);
    free(c->output);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", c->dir);
    assert_int_equal(system(cmd), 0);
    free(c);
    return 0;
}

static void on_line(void *ud, const char *source, const char *text, size_t len)
{
    struct ctx *c = ud;
    if (strcmp(source, "test") != 0)
        c->bad_source = true;
    if (c->nlines < T_LINES_KEPT) {
        c->lines[c->nlines] = malloc(len + 1);
        memcpy(c->lines[c->nlines], text, len);
        c->lines[c->nlines][len] = '\0';
    }
    c->nlines++;
    c->line_bytes += len;
    snprintf(c->last_line, sizeof(c->last_line), "%.*s", (int)len, text);
    for (uint64_t t0 = uv_hrtime(); c->slow_consumer && uv_hrtime() - t0 < T_SLOW_LINE_NS;)
        ;
    if (c->free_in_line) {
        script_free(c->s);
        c->s = NULL;
    }
}

static void on_exit_cb(void *ud, const struct script_result *r)
{
    struct ctx *c = ud;
    c->nexits++;
    c->res = *r;
    c->exit_ms = uv_hrtime() / 1000000;
    c->lines_at_exit = c->nlines;
    if (r->output) {
        c->output = malloc(r->output_len + 1);
        memcpy(c->output, r->output, r->output_len);
        c->output[r->output_len] = '\0';
    }
    c->res.output = c->output;
    if (c->free_in_exit) {
        script_free(c->s);
        c->s = NULL;
    }
}

static const struct script_callbacks callbacks = {on_line, on_exit_cb};

/* Starts shell text with the test's environment. */
static void start_sh(struct ctx *c, const char *text, uint64_t timeout_ms, size_t cap, bool capture)
{
    char *argv[4];
    script_shell_argv(text, argv);
    struct script_spec spec = {.source = "test",
                               .argv = argv,
                               .envp = test_env,
                               .timeout_ms = timeout_ms,
                               .output_cap = cap,
                               .capture_stdout = capture};
    c->started_ms = uv_hrtime() / 1000000;
    c->s = script_start(&c->loop, &c->reaper, &spec, &callbacks, c);
    assert_non_null(c->s);
}

static bool has_line(struct ctx *c, const char *text)
{
    for (size_t i = 0; i < c->nlines && i < T_LINES_KEPT; i++)
        if (strcmp(c->lines[i], text) == 0)
            return true;
    return false;
}

static bool pid_gone(struct ctx *c)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/slowpid", c->dir);
    FILE *f = fopen(path, "r");
    int pid = 0;
    if (f) {
        if (fscanf(f, "%d", &pid) != 1)
            pid = 0;
        fclose(f);
    }
    return pid > 1 && kill(pid, 0) == -1 && errno == ESRCH;
}

/* ---- script ---- */

static void test_lines_and_exit_code(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "printf 'one\\ntwo\\n\\nfour\\n'; exit 3", 0, 0, false);
    assert_int_equal(c->nexits, 0);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.end, SCRIPT_EXITED);
    assert_int_equal(c->res.status, 3);
    assert_int_equal(c->nlines, 4);
    assert_string_equal(c->lines[0], "one");
    assert_string_equal(c->lines[1], "two");
    assert_string_equal(c->lines[2], "");
    assert_string_equal(c->lines[3], "four");
    assert_false(c->bad_source);
    assert_null(c->res.output);
    assert_int_equal(c->res.discarded, 0);
    run_for(c, 50);
    assert_int_equal(c->nexits, 1);
}

static void test_stdout_and_stderr(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "echo to-out; echo to-err >&2; echo again-out", 0, 0, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.end, SCRIPT_EXITED);
    assert_int_equal(c->res.status, 0);
    assert_int_equal(c->nlines, 3);
    assert_true(has_line(c, "to-out"));
    assert_true(has_line(c, "to-err"));
    assert_true(has_line(c, "again-out"));
}

static void test_partial_last_line(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "printf 'whole\\nno newline'; printf 'err tail' >&2", 0, 0, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->nlines, 3);
    assert_true(has_line(c, "whole"));
    assert_true(has_line(c, "no newline"));
    assert_true(has_line(c, "err tail"));
}

static void test_long_line_in_pieces(void **state)
{
    struct ctx *c = *state;
    /* 10000 bytes, then a 4095-byte line ending in a 2-byte character, then a line of
     * exactly SCRIPT_LINE_MAX bytes. */
    start_sh(c,
             "head -c 10000 /dev/zero | tr '\\0' y; echo; "
             "head -c 4095 /dev/zero | tr '\\0' a; printf '\\303\\251z\\n'; "
             "head -c 4096 /dev/zero | tr '\\0' b; echo",
             0, 0, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->nlines, 6);
    assert_int_equal(strlen(c->lines[0]), SCRIPT_LINE_MAX);
    assert_int_equal(strlen(c->lines[1]), SCRIPT_LINE_MAX);
    assert_int_equal(strlen(c->lines[2]), 10000 - 2 * SCRIPT_LINE_MAX);
    for (int i = 0; i < 3; i++)
        assert_int_equal(strspn(c->lines[i], "y"), strlen(c->lines[i]));
    /* The character would not fit whole: the piece ends before it. */
    assert_int_equal(strlen(c->lines[3]), 4095);
    assert_string_equal(c->lines[4], "\xc3\xa9z");
    assert_int_equal(strlen(c->lines[5]), SCRIPT_LINE_MAX);
}

static void test_output_cap_markers(void **state)
{
    struct ctx *c = *state;
    size_t cap = 1u << 20;
    start_sh(c, "head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2", 0, cap, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.end, SCRIPT_EXITED);
    assert_int_equal(c->res.discarded, 3000000 - cap + 5); /* "done\n" came after the cut */
    char cut[128], more[128];
    snprintf(cut, sizeof(cut), "[tether: output cut after %zu bytes; the rest is discarded]", cap);
    snprintf(more, sizeof(more), "[tether: %zu more bytes discarded]", 3000000 - cap + 5);
    assert_true(c->nlines >= 3 && c->nlines < T_LINES_KEPT);
    assert_string_equal(c->lines[c->nlines - 2], cut);
    assert_string_equal(c->lines[c->nlines - 1], more);
    /* Exactly cap bytes of output were passed on before the markers, all of it x. */
    size_t passed = 0;
    for (size_t i = 0; i + 2 < c->nlines; i++) {
        assert_int_equal(strspn(c->lines[i], "x"), strlen(c->lines[i]));
        passed += strlen(c->lines[i]);
    }
    assert_int_equal(passed, cap);
    assert_false(has_line(c, "done"));
}

static void on_tick(uv_timer_t *t)
{
    struct ctx *c = t->data;
    uint64_t now = uv_hrtime() / 1000000;
    if (c->ticks++ > 0 && now - c->last_tick_ms > c->max_gap_ms)
        c->max_gap_ms = now - c->last_tick_ms;
    c->last_tick_ms = now;
}

static void test_flood_keeps_loop_responsive(void **state)
{
    struct ctx *c = *state;
    /* Writers faster than the reader: the pipe never runs dry, so only the per-callback
     * bound on reading gives the loop back (reading until EAGAIN would take the whole
     * cap's worth of lines, about 350 ms, in one callback). */
    c->slow_consumer = true;
    uv_timer_start(&c->ticker, on_tick, 10, 10);
    start_sh(c, "yes flood & yes flood & yes flood & exec yes flood", 1500, 2u << 20, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    uv_timer_stop(&c->ticker);
    assert_int_equal(c->res.end, SCRIPT_TIMED_OUT);
    /* 1.5 s of flooding: the 10 ms timer kept firing. A reader that read until EAGAIN would
     * never give the loop back (the writers are faster), and the timer would not fire at
     * all until the timeout killed them. How often it fired depends on how busy the machine
     * is (about 150 times when idle), so only "many times" is asserted, not a gap. */
    print_message("ticks %u, longest gap %llu ms\n", c->ticks, (unsigned long long)c->max_gap_ms);
    assert_true(c->ticks >= 10);
    /* Past the cap (test_output_cap_markers counts exactly; under valgrind the slow
     * consumer may not get that far in time), the last line says what was discarded. */
    if (c->res.discarded > 0) {
        char more[128];
        snprintf(more, sizeof(more), "[tether: %zu more bytes discarded]", c->res.discarded);
        assert_string_equal(c->last_line, more);
    }
}

static bool group_gone_pred(struct ctx *c)
{
    pid_t pgid = (pid_t)atoi(c->lines[0]);
    return kill(-pgid, 0) == -1 && errno == ESRCH;
}

static void test_timeout_kills_group(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "echo $$; sleep 100 & sleep 100", 300, 0, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.end, SCRIPT_TIMED_OUT);
    assert_true(c->res.elapsed_ms >= 250 && c->res.elapsed_ms < 300 + T_SLACK_MS);
    assert_true(c->exit_ms - c->started_ms < 300 + T_SLACK_MS);
    assert_true(c->nlines >= 1);
    pid_t pgid = (pid_t)atoi(c->lines[0]);
    assert_true(pgid > 1);
    /* The background sleep went with it: nothing of the group is left, not even a zombie. */
    assert_true(run_until(c, group_gone_pred, 2000));
}

static bool late_arrived(struct ctx *c)
{
    return has_line(c, "late");
}

static void test_background_holds_pipe(void **state)
{
    struct ctx *c = *state;
    /* The background job keeps stdout open for 1.5 s after the script's own exit. */
    start_sh(c, "(sleep 1.5; echo late) & echo first", 0, 0, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    uint64_t took = c->exit_ms - c->started_ms;
    assert_true(took >= SCRIPT_DRAIN_MS - 100);
    assert_true(took < SCRIPT_DRAIN_MS + T_SLACK_MS);
    assert_int_equal(c->res.end, SCRIPT_EXITED);
    assert_int_equal(c->res.status, 0);
    assert_true(c->res.elapsed_ms < 500); /* the script itself ended at once */
    assert_int_equal(c->lines_at_exit, 1);
    /* Lines written after the exit was reported are still passed on. */
    assert_true(run_until(c, late_arrived, T_WAIT_MS));
    assert_int_equal(c->nexits, 1);
}

static void test_exec_failure(void **state)
{
    struct ctx *c = *state;
    char *argv[] = {"/nonexistent/tether-no-such-program", NULL};
    struct script_spec spec = {.source = "test", .argv = argv, .envp = test_env};
    c->s = script_start(&c->loop, &c->reaper, &spec, &callbacks, c);
    assert_non_null(c->s);
    assert_int_equal(c->nexits, 0); /* never from inside script_start */
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    /* proc_spawn forks before it execs: the child says why on stderr and exits 127. */
    assert_int_equal(c->res.end, SCRIPT_EXITED);
    assert_int_equal(c->res.status, 127);
    assert_true(c->nlines >= 1);
    assert_non_null(strstr(c->lines[0], "cannot run /nonexistent/tether-no-such-program"));
}

static void test_spawn_failure_is_async(void **state)
{
    struct ctx *c = *state;
    /* No descriptor left for the pipes: proc_spawn itself fails. */
    int lowest = dup(0);
    assert_true(lowest >= 0);
    close(lowest);
    struct rlimit saved, tight;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &saved), 0);
    tight = saved;
    tight.rlim_cur = (rlim_t)lowest + 1; /* one free descriptor: a pipe needs two */
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &tight), 0);
    char *argv[] = {"/bin/true", NULL};
    struct script_spec spec = {.source = "test", .argv = argv, .envp = test_env};
    c->s = script_start(&c->loop, &c->reaper, &spec, &callbacks, c);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &saved), 0);
    assert_non_null(c->s);
    assert_int_equal(c->nexits, 0);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.end, SCRIPT_SPAWN_FAILED);
    assert_int_equal(c->res.status, -EMFILE);
    assert_int_equal(c->nlines, 0);
    run_for(c, 50);
    assert_int_equal(c->nexits, 1);
}

static void test_free_in_on_line(void **state)
{
    struct ctx *c = *state;
    c->free_in_line = true;
    char text[256];
    snprintf(text, sizeof(text), "echo $$ > %s/slowpid; seq 1 1000; exec sleep 100", c->dir);
    start_sh(c, text, 0, 0, false);
    assert_false(run_until(c, has_exited, 300));
    /* One line, then nothing: no more lines, no exit, and the script was killed. */
    assert_int_equal(c->nlines, 1);
    assert_string_equal(c->lines[0], "1");
    assert_int_equal(c->nexits, 0);
    assert_null(c->s);
    assert_true(run_until(c, pid_gone, 2000));
}

static void test_free_in_on_exit(void **state)
{
    struct ctx *c = *state;
    c->free_in_exit = true;
    start_sh(c, "echo a; echo b >&2; exit 4", 0, 0, false);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.status, 4);
    assert_null(c->s);
    run_for(c, 50);
    assert_int_equal(c->nexits, 1);
}

static void test_kill(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "sleep 100", 0, 0, false);
    run_for(c, 50);
    script_kill(c->s);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.end, SCRIPT_SIGNALED);
    assert_int_equal(c->res.status, SIGKILL);
}

static void test_capture_stdout(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "echo out1; echo err1 >&2; printf 'out2'", 0, 0, true);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_non_null(c->res.output);
    assert_int_equal(c->res.output_len, 9);
    assert_string_equal(c->output, "out1\nout2");
    assert_int_equal(c->nlines, 1);
    assert_string_equal(c->lines[0], "err1");
}

static void test_capture_stdout_cap(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "head -c 1000 /dev/zero | tr '\\0' q", 0, 100, true);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_int_equal(c->res.output_len, 100);
    assert_int_equal(strspn(c->output, "q"), 100);
    assert_int_equal(c->res.discarded, 900);
    assert_int_equal(c->nlines, 0); /* no marker lines for stdout kept in memory */
}

static void test_capture_nothing_printed(void **state)
{
    struct ctx *c = *state;
    start_sh(c, "true", 0, 0, true);
    assert_true(run_until(c, has_exited, T_WAIT_MS));
    assert_non_null(c->res.output);
    assert_int_equal(c->res.output_len, 0);
}

#define T_QUICK 64u /* scripts started at once */

struct quick {
    struct ctx *c;
    struct script *s;
    bool whole; /* exited 0 with all of its output */
};

static void on_quick_line(void *ud, const char *source, const char *text, size_t len)
{
    (void)ud;
    (void)source;
    (void)text;
    (void)len;
}

static void on_quick_exit(void *ud, const struct script_result *r)
{
    struct quick *q = ud;
    q->whole = r->end == SCRIPT_EXITED && r->status == 0 && r->output_len == 5 &&
               memcmp(r->output, "quick", 5) == 0;
    q->c->nexits++;
}

static bool all_quick_exited(struct ctx *c)
{
    return c->nexits == (int)T_QUICK;
}

static void test_quick_scripts_keep_output(void **state)
{
    struct ctx *c = *state;
    /* Children that are done before they are watched (proc_reaper_watch collects them at
     * once) still have all of their output read before the exit is reported. */
    struct quick q[T_QUICK];
    char *argv[] = {"/usr/bin/printf", "quick", NULL};
    struct script_spec spec = {
        .source = "test", .argv = argv, .envp = test_env, .capture_stdout = true};
    static const struct script_callbacks quick_cb = {on_quick_line, on_quick_exit};
    for (size_t i = 0; i < T_QUICK; i++) {
        q[i] = (struct quick){.c = c};
        q[i].s = script_start(&c->loop, &c->reaper, &spec, &quick_cb, &q[i]);
        assert_non_null(q[i].s);
        usleep(1000); /* time for the child to finish before the next is watched */
    }
    assert_true(run_until(c, all_quick_exited, T_WAIT_MS));
    size_t whole = 0;
    for (size_t i = 0; i < T_QUICK; i++) {
        whole += q[i].whole;
        script_free(q[i].s);
    }
    assert_int_equal(whole, T_QUICK);
}

/* ---- metadata ---- */

static void on_report(void *ud, json_t *msg)
{
    struct ctx *c = ud;
    assert_string_equal(json_string_value(json_object_get(msg, "type")), "metadata");
    if (c->nreports < T_REPORTS_KEPT)
        c->reports[c->nreports] = json_incref(msg);
    c->nreports++;
}

/* The items of every kept report for key, in order. */
static size_t reports_for(struct ctx *c, const char *key, json_t **out, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < c->nreports && i < T_REPORTS_KEPT; i++) {
        size_t j;
        json_t *it;
        json_array_foreach(json_object_get(c->reports[i], "items"), j, it)
        {
            if (strcmp(json_string_value(json_object_get(it, "key")), key) == 0 && n < max)
                out[n++] = it;
        }
    }
    return n;
}

static const char *item_str(json_t *it, const char *name)
{
    return json_string_value(json_object_get(it, name));
}

static json_t *items_of(const char *fmt, const char *dir)
{
    char text[2048];
    snprintf(text, sizeof(text), fmt, dir, dir, dir, dir);
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!j)
        fail_msg("bad test json: %s: %s", e.text, text);
    return j;
}

static bool key_reported(struct ctx *c)
{
    json_t *it[T_REPORTS_KEPT];
    return reports_for(c, c->want_key, it, T_REPORTS_KEPT) >= c->want_n;
}

/* Waits until key was reported n times. */
static bool wait_reports(struct ctx *c, const char *key, size_t n, uint64_t ms)
{
    c->want_key = key;
    c->want_n = n;
    return run_until(c, key_reported, ms);
}

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

static void test_metadata_values(void **state)
{
    struct ctx *c = *state;
    struct metadata *m = c->m = metadata_new(&c->loop, &c->reaper, on_report, c);
    json_t *items = items_of("[{\"key\":\"a\",\"script\":\"echo hello; echo $FOO; pwd\"},"
                             " {\"key\":\"b\",\"script\":\"printf 'x \\\\377 \\\\n\\\\n\\\\t'\"}]",
                             "");
    metadata_set_items(m, items, test_env, "/tmp");
    json_decref(items);
    assert_int_equal(c->nreports, 0); /* nothing runs inside the call */
    assert_true(wait_reports(c, "a", 1, T_WAIT_MS));
    assert_true(wait_reports(c, "b", 1, T_WAIT_MS));
    json_t *it[4];
    assert_int_equal(reports_for(c, "a", it, 4), 1);
    assert_string_equal(item_str(it[0], "value"), "hello\nbar\n/tmp");
    assert_string_equal(item_str(it[0], "error"), "");
    json_int_t at = json_integer_value(json_object_get(it[0], "collected_at"));
    assert_true(at > 1700000000000LL);
    assert_int_equal(reports_for(c, "b", it, 4), 1);
    /* Trailing whitespace trimmed, the invalid byte replaced with U+FFFD. */
    assert_string_equal(item_str(it[0], "value"), "x \xef\xbf\xbd");
    metadata_free(m);
    c->m = NULL;
}

static void test_metadata_changes_only(void **state)
{
    struct ctx *c = *state;
    struct metadata *m = c->m = metadata_new(&c->loop, &c->reaper, on_report, c);
    json_t *items = items_of(
        "[{\"key\":\"same\",\"script\":\"echo run >> %s/same; echo constant\",\"interval\":1},"
        " {\"key\":\"count\",\"script\":\"echo run >> %s/count; wc -l < %s/count\","
        "\"interval\":1}]",
        c->dir);
    metadata_set_items(m, items, test_env, NULL);
    json_decref(items);
    assert_true(wait_reports(c, "count", 3, T_WAIT_MS));
    json_t *it[8];
    assert_int_equal(reports_for(c, "count", it, 8), 3);
    assert_string_equal(item_str(it[0], "value"), "1");
    assert_string_equal(item_str(it[1], "value"), "2");
    assert_string_equal(item_str(it[2], "value"), "3");
    /* "same" ran as often but was reported once. */
    char path[128];
    snprintf(path, sizeof(path), "%s/same", c->dir);
    assert_true(count_lines(path) >= 2);
    assert_int_equal(reports_for(c, "same", it, 8), 1);
    assert_string_equal(item_str(it[0], "value"), "constant");

    /* After a reconnect everything known is reported at once, in one message. */
    size_t before = c->nreports;
    metadata_resend(m);
    assert_int_equal(c->nreports, before + 1);
    json_t *last = json_object_get(c->reports[before], "items");
    assert_int_equal(json_array_size(last), 2);
    assert_int_equal(reports_for(c, "same", it, 8), 2);
    assert_string_equal(item_str(it[1], "value"), "constant");
    metadata_free(m);
    c->m = NULL;
}

static void test_metadata_errors(void **state)
{
    struct ctx *c = *state;
    struct metadata *m = c->m = metadata_new(&c->loop, &c->reaper, on_report, c);
    json_t *items =
        items_of("[{\"key\":\"fail\",\"script\":\"echo half; echo '' >&2; echo oops >&2; "
                 "echo second >&2; exit 3\"},"
                 " {\"key\":\"slow\",\"script\":\"echo partial; exec sleep 100\",\"timeout\":1},"
                 " {\"key\":\"sig\",\"script\":\"kill -9 $$\"},"
                 " {\"key\":\"quiet\",\"script\":\"echo fine; echo noise >&2\"},"
                 " {\"key\":\"long\",\"script\":\"head -c 20000 /dev/zero | tr '\\\\0' a >&2; "
                 "exit 1\"}]",
                 "");
    metadata_set_items(m, items, test_env, NULL);
    json_decref(items);
    json_t *it[4];
    assert_true(wait_reports(c, "fail", 1, T_WAIT_MS));
    reports_for(c, "fail", it, 4);
    assert_string_equal(item_str(it[0], "value"), "half");
    assert_string_equal(item_str(it[0], "error"), "exit status 3: oops");
    assert_true(wait_reports(c, "sig", 1, T_WAIT_MS));
    reports_for(c, "sig", it, 4);
    assert_string_equal(item_str(it[0], "error"), "killed by signal 9");
    assert_true(wait_reports(c, "quiet", 1, T_WAIT_MS));
    reports_for(c, "quiet", it, 4);
    assert_string_equal(item_str(it[0], "error"), ""); /* stderr alone is no error */
    assert_true(wait_reports(c, "long", 1, T_WAIT_MS));
    reports_for(c, "long", it, 4);
    const char *e = item_str(it[0], "error");
    assert_int_equal(strlen(e), strlen("exit status 1: ") + METADATA_STDERR_MAX);
    assert_true(wait_reports(c, "slow", 1, T_WAIT_MS));
    reports_for(c, "slow", it, 4);
    assert_string_equal(item_str(it[0], "error"), "timed out after 1s");
    assert_string_equal(item_str(it[0], "value"), "partial");
    metadata_free(m);
    c->m = NULL;
}

static void test_metadata_value_cut(void **state)
{
    struct ctx *c = *state;
    struct metadata *m = c->m = metadata_new(&c->loop, &c->reaper, on_report, c);
    json_t *items =
        items_of("[{\"key\":\"big\",\"script\":\"head -c 20000 /dev/zero | tr '\\\\0' a\"},"
                 " {\"key\":\"utf\",\"script\":\"head -c 10239 /dev/zero | tr '\\\\0' a; "
                 "printf '\\\\303\\\\251'\"}]",
                 "");
    metadata_set_items(m, items, test_env, NULL);
    json_decref(items);
    json_t *it[4];
    assert_true(wait_reports(c, "big", 1, T_WAIT_MS));
    reports_for(c, "big", it, 4);
    assert_int_equal(strlen(item_str(it[0], "value")), METADATA_VALUE_MAX);
    assert_true(wait_reports(c, "utf", 1, T_WAIT_MS));
    reports_for(c, "utf", it, 4);
    assert_int_equal(strlen(item_str(it[0], "value")), METADATA_VALUE_MAX - 1);
    metadata_free(m);
    c->m = NULL;
}

static bool file_exists(struct ctx *c, const char *name)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/%s", c->dir, name);
    return access(path, F_OK) == 0;
}

static bool slowpid_written(struct ctx *c)
{
    return file_exists(c, "slowpid");
}

static void test_metadata_replace_items(void **state)
{
    struct ctx *c = *state;
    struct metadata *m = c->m = metadata_new(&c->loop, &c->reaper, on_report, c);
    json_t *items = items_of("[{\"key\":\"slow\",\"script\":\"echo $$ > %s/slowpid; exec sleep "
                             "100\"},"
                             " {\"key\":\"keep\",\"script\":\"echo run >> %s/keep; echo k\"}]",
                             c->dir);
    metadata_set_items(m, items, test_env, NULL);
    json_decref(items);
    assert_true(wait_reports(c, "keep", 1, T_WAIT_MS));
    assert_true(run_until(c, slowpid_written, T_WAIT_MS));
    run_for(c, 100);
    items = items_of("[{\"key\":\"keep\",\"script\":\"echo run >> %s/keep; echo k\"},"
                     " {\"key\":\"new\",\"script\":\"echo n\"}]",
                     c->dir);
    metadata_set_items(m, items, test_env, NULL);
    json_decref(items);
    assert_true(wait_reports(c, "new", 1, T_WAIT_MS));
    /* The dropped item's script was killed; the kept one was not run again. */
    assert_true(run_until(c, pid_gone, 2000));
    run_for(c, 200);
    json_t *it[4];
    assert_int_equal(reports_for(c, "keep", it, 4), 1);
    assert_int_equal(reports_for(c, "slow", it, 4), 0);
    char path[128];
    snprintf(path, sizeof(path), "%s/keep", c->dir);
    assert_int_equal(count_lines(path), 1);

    /* None at all: everything stops. */
    metadata_set_items(m, NULL, test_env, NULL);
    size_t before = c->nreports;
    metadata_resend(m);
    assert_int_equal(c->nreports, before);
    metadata_free(m);
    c->m = NULL;
}

static void test_metadata_free_while_running(void **state)
{
    struct ctx *c = *state;
    struct metadata *m = c->m = metadata_new(&c->loop, &c->reaper, on_report, c);
    json_t *items = items_of("[{\"key\":\"slow\",\"script\":\"echo $$ > %s/slowpid; exec sleep "
                             "100\"}]",
                             c->dir);
    metadata_set_items(m, items, test_env, NULL);
    json_decref(items);
    assert_true(run_until(c, slowpid_written, T_WAIT_MS));
    run_for(c, 100);
    metadata_free(m);
    c->m = NULL;
    assert_true(run_until(c, pid_gone, 2000));
    assert_int_equal(c->nreports, 0);
}

int main(void)
{
    /* Orphans of the scripts' groups come to this process, as they would to the agent as
     * PID 1; the tests' reapers collect them (reap_orphans). */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_lines_and_exit_code, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stdout_and_stderr, setup, teardown),
        cmocka_unit_test_setup_teardown(test_partial_last_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_line_in_pieces, setup, teardown),
        cmocka_unit_test_setup_teardown(test_output_cap_markers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flood_keeps_loop_responsive, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout_kills_group, setup, teardown),
        cmocka_unit_test_setup_teardown(test_background_holds_pipe, setup, teardown),
        cmocka_unit_test_setup_teardown(test_exec_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spawn_failure_is_async, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_in_on_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_in_on_exit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill, setup, teardown),
        cmocka_unit_test_setup_teardown(test_capture_stdout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_capture_stdout_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_capture_nothing_printed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_quick_scripts_keep_output, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_values, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_changes_only, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_value_cut, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_replace_items, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_free_while_running, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
