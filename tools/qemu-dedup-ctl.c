/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * qemu-dedup-ctl: ask a running qemu-dedup-broker for its state, over its
 * control socket.  Subcommands stats, clients, domains; --json prints the
 * broker's reply as it is, for scripts.  vms adds libvirt's view
 * (libvirt-vms.c).
 */
#include <errno.h>
#include <json-glib/json-glib.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "broker-control.h"
#include "fields.h"
#include "libvirt-vms.h"
#include "top.h"


static void print_stats(JsonObject *o)
{
    printf("pools           %.1f MiB used in %" G_GINT64_FORMAT " slots (at most %.1f MiB "
           "a domain), %.1f MiB resident\n",
           mib(num(o, "pool-bytes")), num(o, "slots-used"), mib(num(o, "pool-max-bytes")),
           mib(num(o, "pool-resident-bytes")));
    printf("saved           %.1f MiB (%" G_GINT64_FORMAT " references)\n",
           mib(num(o, "saved-bytes")), num(o, "pages-shared"));
    printf("clients         %" G_GINT64_FORMAT " connected, %" G_GINT64_FORMAT
           " orphaned, %" G_GINT64_FORMAT " domains%s\n", num(o, "clients"),
           num(o, "orphans"), num(o, "domains"),
           json_object_get_boolean_member_with_default(o, "recovering", FALSE)
           ? " (recovering pools after a restart)" : "");
    printf("lookups         %" G_GINT64_FORMAT " (%.0f/s), %" G_GINT64_FORMAT " hits, %"
           G_GINT64_FORMAT " candidates\n", num(o, "lookups"),
           json_object_get_double_member_with_default(o, "lookups-per-second", 0),
           num(o, "hits"), num(o, "candidates"));
    printf("publishes       %" G_GINT64_FORMAT " asked, %" G_GINT64_FORMAT " stored, %"
           G_GINT64_FORMAT " mismatched\n", num(o, "publish-requests"),
           num(o, "stored"), num(o, "mismatches"));
    printf("frees           %" G_GINT64_FORMAT " (%" G_GINT64_FORMAT " unrefs, %"
           G_GINT64_FORMAT " restored)\n", num(o, "frees"), num(o, "unrefs"),
           num(o, "restored"));
    printf("metadata        %.1f KiB (%.1f bytes per slot)\n",
           num(o, "metadata-bytes") / 1024.0,
           json_object_get_double_member_with_default(o, "metadata-bytes-per-slot", 0));
    printf("errors          %" G_GINT64_FORMAT " protocol, %" G_GINT64_FORMAT
           " refused clients, %" G_GINT64_FORMAT " failed authentications\n",
           num(o, "protocol-errors"), num(o, "clients-refused"), num(o, "auth-failures"));
}

static void print_clients(JsonArray *a)
{
    printf("%5s %8s %6s %-16s %-16s %-9s %9s %9s %9s %11s %9s\n", "ID", "PID", "UID",
           "NAME", "DOMAIN", "STATE", "SLOTS", "RESTORED", "SAVED MiB", "LOOKUPS", "HITS");
    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *o = json_array_get_object_element(a, i);

        printf("%5" G_GINT64_FORMAT " %8" G_GINT64_FORMAT " %6" G_GINT64_FORMAT
               " %-16.16s %-16.16s %-9s %9" G_GINT64_FORMAT " %9" G_GINT64_FORMAT
               " %9.1f %11" G_GINT64_FORMAT " %9" G_GINT64_FORMAT "\n",
               num(o, "id"), num(o, "pid"), num(o, "uid"), str(o, "name"),
               *str(o, "domain") ? str(o, "domain") : "(private)", str(o, "state"),
               num(o, "slots"), num(o, "restored"), mib(num(o, "saved-bytes")),
               num(o, "lookups"), num(o, "hits"));
    }
}

static void print_domains(JsonArray *a)
{
    printf("%-20s %8s %9s %9s %10s %11s %10s\n", "DOMAIN", "CLIENTS", "SLOTS",
           "REFS", "SAVED MiB", "CANDIDATES", "QUOTA MiB");
    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *o = json_array_get_object_element(a, i);

        printf("%-20.20s %8" G_GINT64_FORMAT " %9" G_GINT64_FORMAT " %9" G_GINT64_FORMAT
               " %10.1f %11" G_GINT64_FORMAT " %10.1f\n",
               *str(o, "name") ? str(o, "name") : "(private)", num(o, "clients"),
               num(o, "slots"), num(o, "pages-shared"), mib(num(o, "saved-bytes")),
               num(o, "candidates"), mib(num(o, "quota-bytes")));
    }
}

int main(int argc, char **argv)
{
    g_autofree char *control = NULL;
    g_autofree char *connect = NULL;
    g_auto(GStrv) qmp = NULL;
    g_autofree char *csv = NULL;
    gint interval = 1000, iterations = 0;
    gboolean json = FALSE;
    GOptionEntry entries[] = {
        { "qmp", 'q', 0, G_OPTION_ARG_FILENAME_ARRAY, &qmp,
          "top: a QEMU's QMP socket (repeat for each QEMU)", "PATH" },
        { "interval", 'i', 0, G_OPTION_ARG_INT, &interval,
          "top: milliseconds between samples [1000]", "MS" },
        { "iterations", 'n', 0, G_OPTION_ARG_INT, &iterations,
          "top: stop after N samples [0: at Ctrl-C]", "N" },
        { "csv", 0, 0, G_OPTION_ARG_FILENAME, &csv,
          "top: append every sample to this CSV file", "FILE" },
        { "connect", 'c', 0, G_OPTION_ARG_STRING, &connect,
          "vms: the libvirt URI [libvirt's default]", "URI" },
        { "control", 0, 0, G_OPTION_ARG_FILENAME, &control,
          "the broker's control socket [" DEFAULT_CONTROL "]", "PATH" },
        { "json", 0, 0, G_OPTION_ARG_NONE, &json,
          "print JSON instead of a table", NULL },
        { NULL }
    };
    g_autoptr(GOptionContext) ctx = g_option_context_new("stats|clients|domains|vms|top");
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonParser) parser = json_parser_new();
    g_autofree char *reply = NULL;
    JsonObject *root;
    const char *cmd;

    g_option_context_add_main_entries(ctx, entries, NULL);
    g_option_context_set_summary(ctx,
        "Show the state of qemu-dedup-broker:\n"
        "  stats    pool size, slots, memory saved, lookups, publishes, frees, metadata\n"
        "  clients  each connected (or orphaned) QEMU: domain, slots, pages mapped\n"
        "  domains  each trust domain: clients, slots, memory saved, quota\n"
        "  vms      each running libvirt domain with memory-dedup: its QMP figures\n"
        "           (query-memory-dedup) and the references the broker holds for it\n"
        "  top      live dashboard of the broker and the QEMUs given with --qmp");
    if (!g_option_context_parse(ctx, &argc, &argv, &err)) {
        fprintf(stderr, "qemu-dedup-ctl: %s\n", err->message);
        return 2;
    }
    if (argc != 2) {
        fprintf(stderr, "qemu-dedup-ctl: expected one subcommand: stats, clients, domains, "
                "vms or top\n");
        return 2;
    }
    cmd = argv[1];
    if (strcmp(cmd, "stats") && strcmp(cmd, "clients") && strcmp(cmd, "domains") &&
        strcmp(cmd, "vms") && strcmp(cmd, "top")) {
        fprintf(stderr, "qemu-dedup-ctl: unknown subcommand '%s' (use stats, clients, "
                "domains, vms or top)\n", cmd);
        return 2;
    }
    if (!strcmp(cmd, "top")) {
        if (interval < 100) {
            fprintf(stderr, "qemu-dedup-ctl: --interval must be at least 100 (ms)\n");
            return 2;
        }
        return ctl_top(control ? control : DEFAULT_CONTROL, qmp, interval, iterations, csv);
    }
    if (!strcmp(cmd, "vms")) {
        /* The broker's clients, to show beside libvirt's domains, if it answers. */
        JsonNode *node;

        reply = broker_control_ask(control ? control : DEFAULT_CONTROL, "clients", &err);
        if (err || !json_parser_load_from_data(parser, reply, -1, NULL) ||
            !JSON_NODE_HOLDS_OBJECT(json_parser_get_root(parser)) ||
            !(node = json_object_get_member(json_node_get_object(
                  json_parser_get_root(parser)), "return")) ||
            !JSON_NODE_HOLDS_ARRAY(node)) {
            fprintf(stderr, "qemu-dedup-ctl: no broker view: %s\n",
                    err ? err->message : "the broker's reply is not JSON");
            return libvirt_vms(connect, NULL, json);
        }
        return libvirt_vms(connect, json_node_get_array(node), json);
    }
    reply = broker_control_ask(control ? control : DEFAULT_CONTROL, cmd, &err);
    if (err) {
        fprintf(stderr, "qemu-dedup-ctl: %s\n", err->message);
        return 1;
    }
    if (!json_parser_load_from_data(parser, reply, -1, &err) ||
        !JSON_NODE_HOLDS_OBJECT(json_parser_get_root(parser))) {
        fprintf(stderr, "qemu-dedup-ctl: the broker's reply is not JSON: %s\n",
                err ? err->message : reply);
        return 1;
    }
    root = json_node_get_object(json_parser_get_root(parser));
    if (json_object_has_member(root, "error")) {
        fprintf(stderr, "qemu-dedup-ctl: the broker says: %s\n",
                json_object_get_string_member(root, "error"));
        return 1;
    }
    if (json) {
        g_autoptr(JsonGenerator) gen = json_generator_new();
        g_autofree char *text = NULL;

        json_generator_set_root(gen, json_object_get_member(root, "return"));
        json_generator_set_pretty(gen, TRUE);
        text = json_generator_to_data(gen, NULL);
        printf("%s\n", text);
    } else if (!strcmp(cmd, "stats")) {
        print_stats(json_object_get_object_member(root, "return"));
    } else if (!strcmp(cmd, "clients")) {
        print_clients(json_object_get_array_member(root, "return"));
    } else {
        print_domains(json_object_get_array_member(root, "return"));
    }
    return 0;
}
