/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * qemu-dedup-ctl top: a live view of a host's deduplication, refreshed every
 * interval until Ctrl-C.  Per QEMU (its QMP socket): memory covered, saved
 * (MiB and % of covered, with a bar), zero and merged pages, COWs per second
 * and the CPU of its dedup threads; the totals; the broker's pool.  --csv
 * appends every sample to a file (for plots, e.g. by make demo).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "broker-control.h"
#include "fields.h"
#include "qmp-client.h"
#include "top.h"

#define BAR 20

typedef struct TopVm {
    const char *path;
    QmpClient *qmp;
    char *name;
    gboolean ok;
    char state[16];
    gint64 covered, saved, zero, merged, cows, cpu_ms;
    gint64 prev_cows, prev_cpu_ms;
    double cow_rate, cpu_pct;
} TopVm;

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    stop_requested = 1;
}

/* One sample of one QEMU; reconnects when its QMP went away. */
static void sample(TopVm *vm, double dt)
{
    g_autoptr(GError) err = NULL;
    JsonNode *ret;
    JsonArray *objs;

    vm->ok = FALSE;
    if (!vm->qmp) {
        vm->qmp = qmp_client_connect(vm->path, NULL);
        if (!vm->qmp) {
            return;
        }
        ret = qmp_client_execute(vm->qmp, "query-name", NULL);
        if (ret && JSON_NODE_HOLDS_OBJECT(ret) &&
            json_object_has_member(json_node_get_object(ret), "name")) {
            g_free(vm->name);
            vm->name = g_strdup(json_object_get_string_member(json_node_get_object(ret),
                                                              "name"));
        }
        if (ret) {
            json_node_unref(ret);
        }
    }
    ret = qmp_client_execute(vm->qmp, "query-memory-dedup", &err);
    if (!ret) {
        qmp_client_free(vm->qmp);
        vm->qmp = NULL;
        return;
    }
    objs = JSON_NODE_HOLDS_ARRAY(ret) ? json_node_get_array(ret) : NULL;
    vm->covered = vm->saved = vm->zero = vm->merged = vm->cows = vm->cpu_ms = 0;
    g_strlcpy(vm->state, objs && json_array_get_length(objs) ? "" : "off", sizeof(vm->state));
    for (guint i = 0; objs && i < json_array_get_length(objs); i++) {
        JsonObject *o = json_array_get_object_element(objs, i);

        g_strlcpy(vm->state, json_object_get_string_member_with_default(o, "state", "?"),
                  sizeof(vm->state));
        vm->covered += num(o, "covered-bytes");
        vm->saved += num(o, "saved-bytes");
        vm->zero += num(o, "zero-pages");
        vm->merged += num(o, "merged-pages");
        vm->cows += num(o, "cow-events");
        vm->cpu_ms += num(o, "cpu-ms");
    }
    json_node_unref(ret);
    if (dt > 0 && vm->cows >= vm->prev_cows && vm->cpu_ms >= vm->prev_cpu_ms) {
        vm->cow_rate = (vm->cows - vm->prev_cows) / dt;
        vm->cpu_pct = (vm->cpu_ms - vm->prev_cpu_ms) / 10.0 / dt;
    }
    vm->prev_cows = vm->cows;
    vm->prev_cpu_ms = vm->cpu_ms;
    vm->ok = TRUE;
}

static void bar(char *out, double frac)
{
    int n = frac <= 0 ? 0 : frac >= 1 ? BAR : (int)(frac * BAR + 0.5);

    memset(out, '#', n);
    memset(out + n, '.', BAR - n);
    out[BAR] = 0;
}

static void row(const char *name, const char *state, gint64 covered, gint64 saved,
                gint64 zero, gint64 merged, double cow_rate, double cpu_pct)
{
    double pct = covered ? 100.0 * saved / covered : 0;
    char b[BAR + 1];

    bar(b, pct / 100);
    printf("%-16.16s %-10.10s %9.0f %9.1f %6.1f%% %s %9" G_GINT64_FORMAT " %9"
           G_GINT64_FORMAT " %8.1f %6.1f\n", name, state, mib(covered), mib(saved), pct, b,
           zero, merged, cow_rate, cpu_pct);
}

static void render(TopVm *vms, int n, JsonObject *broker, const char *why, int interval_ms,
                   gboolean tty)
{
    gint64 covered = 0, saved = 0, zero = 0, merged = 0;
    double cows = 0, cpu = 0;
    time_t now = time(NULL);
    char when[32];

    strftime(when, sizeof(when), "%H:%M:%S", localtime(&now));
    printf(tty ? "\033[H\033[2J" : "\n");
    printf("qdedup top  %s  every %.1f s%s\n", when, interval_ms / 1000.0,
           tty ? ", Ctrl-C quits" : "");
    if (broker) {
        printf("broker: pool %.1f MiB of %.0f, %" G_GINT64_FORMAT " clients, %"
               G_GINT64_FORMAT " pages mapped, %.1f MiB saved by sharing\n",
               mib(num(broker, "pool-bytes")), mib(num(broker, "pool-max-bytes")),
               num(broker, "clients"), num(broker, "pages-shared"),
               mib(num(broker, "saved-bytes")));
    } else {
        printf("broker: not reachable (%s)\n", why);
    }
    printf("\n%-16s %-10s %9s %9s %7s %-*s %9s %9s %8s %6s\n", "VM", "state",
           "covered", "saved", "saved", BAR, "", "zero", "merged", "COW/s", "CPU%");
    printf("%-16s %-10s %9s %9s %7s %-*s %9s %9s %8s %6s\n", "", "", "MiB", "MiB", "%",
           BAR, "", "pages", "pages", "", "");
    for (int i = 0; i < n; i++) {
        TopVm *vm = &vms[i];

        if (!vm->ok) {
            printf("%-16.16s (no QMP at %s)\n", vm->name, vm->path);
            continue;
        }
        row(vm->name, vm->state, vm->covered, vm->saved, vm->zero, vm->merged,
            vm->cow_rate, vm->cpu_pct);
        covered += vm->covered;
        saved += vm->saved;
        zero += vm->zero;
        merged += vm->merged;
        cows += vm->cow_rate;
        cpu += vm->cpu_pct;
    }
    row("total", "", covered, saved, zero, merged, cows, cpu);
    fflush(stdout);
}

static void csv_sample(FILE *csv, double t, TopVm *vms, int n, JsonObject *broker)
{
    for (int i = 0; i < n; i++) {
        if (vms[i].ok) {
            fprintf(csv, "%.1f,%s,%" G_GINT64_FORMAT ",%" G_GINT64_FORMAT ",%" G_GINT64_FORMAT
                    ",%" G_GINT64_FORMAT ",%" G_GINT64_FORMAT ",%" G_GINT64_FORMAT "\n", t,
                    vms[i].name, vms[i].covered, vms[i].saved, vms[i].zero, vms[i].merged,
                    vms[i].cows, vms[i].cpu_ms);
        }
    }
    if (broker) {
        fprintf(csv, "%.1f,broker,%" G_GINT64_FORMAT ",%" G_GINT64_FORMAT ",0,%"
                G_GINT64_FORMAT ",0,0\n", t, num(broker, "pool-bytes"),
                num(broker, "saved-bytes"), num(broker, "pages-shared"));
    }
    fflush(csv);
}

int ctl_top(const char *control, char **qmp_paths, int interval_ms, int iterations,
            const char *csv_path)
{
    int n = qmp_paths ? g_strv_length(qmp_paths) : 0;
    g_autofree TopVm *vms = g_new0(TopVm, MAX(n, 1));
    gboolean tty = isatty(STDOUT_FILENO);
    gint64 start = g_get_monotonic_time(), last = 0;
    FILE *csv = NULL;
    struct sigaction sa = { .sa_handler = on_signal };

    if (csv_path) {
        csv = fopen(csv_path, "a");
        if (!csv) {
            fprintf(stderr, "qemu-dedup-ctl: cannot write %s: %s\n", csv_path,
                    g_strerror(errno));
            return 1;
        }
        if (ftell(csv) == 0) {
            fprintf(csv, "t,vm,covered_bytes,saved_bytes,zero_pages,merged_pages,"
                    "cow_events,cpu_ms\n");
        }
    }
    for (int i = 0; i < n; i++) {
        vms[i].path = qmp_paths[i];
        vms[i].name = g_path_get_basename(qmp_paths[i]);
    }
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    for (int it = 0; !stop_requested && (iterations <= 0 || it < iterations); it++) {
        g_autoptr(JsonParser) parser = json_parser_new();
        g_autoptr(GError) err = NULL;
        gint64 now = g_get_monotonic_time();
        double dt = last ? (now - last) / 1e6 : 0;
        JsonObject *broker = broker_control_return(parser, control, "stats", &err);

        last = now;
        for (int i = 0; i < n; i++) {
            sample(&vms[i], dt);
        }
        render(vms, n, broker, err ? err->message : "", interval_ms, tty);
        if (csv) {
            csv_sample(csv, (now - start) / 1e6, vms, n, broker);
        }
        for (int slept = 0; slept < interval_ms && !stop_requested &&
             (iterations <= 0 || it + 1 < iterations); slept += 50) {
            g_usleep(50000);
        }
    }
    for (int i = 0; i < n; i++) {
        qmp_client_free(vms[i].qmp);
        g_free(vms[i].name);
    }
    if (csv) {
        fclose(csv);
    }
    return 0;
}
