/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * qemu-dedup-ctl vms: every running libvirt domain that has a memory-dedup
 * object, with its query-memory-dedup figures (through libvirt's QEMU
 * monitor passthrough, the API behind 'virsh qemu-monitor-command') beside
 * what the broker holds for it (its client of the same name).
 */
#include <json-glib/json-glib.h>
#include <libvirt/libvirt.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/virterror.h>
#include <stdio.h>

#include "fields.h"
#include "libvirt-vms.h"

/* The domain's memory-dedup objects, or NULL (none, or a QEMU without them). */
static JsonArray *query_dedup(virDomainPtr dom)
{
    g_autoptr(JsonParser) parser = json_parser_new();
    char *reply = NULL;
    JsonNode *ret;
    JsonObject *root;

    if (virDomainQemuMonitorCommand(dom, "{\"execute\":\"query-memory-dedup\"}",
                                    &reply, 0) < 0) {
        return NULL;
    }
    if (!json_parser_load_from_data(parser, reply, -1, NULL) ||
        !JSON_NODE_HOLDS_OBJECT(json_parser_get_root(parser))) {
        free(reply);
        return NULL;
    }
    free(reply);
    root = json_node_get_object(json_parser_get_root(parser));
    ret = json_object_get_member(root, "return");
    if (!ret || !JSON_NODE_HOLDS_ARRAY(ret) || !json_array_get_length(json_node_get_array(ret))) {
        return NULL;
    }
    return json_array_ref(json_node_get_array(ret));
}

static JsonObject *client_named(JsonArray *clients, const char *name)
{
    for (guint i = 0; clients && i < json_array_get_length(clients); i++) {
        JsonObject *c = json_array_get_object_element(clients, i);

        if (!g_strcmp0(json_object_get_string_member_with_default(c, "name", ""), name) &&
            g_strcmp0(json_object_get_string_member_with_default(c, "state", ""), "orphan")) {
            return c;
        }
    }
    return NULL;
}

static void print_row(const char *name, JsonObject *d, JsonObject *c)
{
    char refs[24] = "-";

    if (c) {
        snprintf(refs, sizeof(refs), "%" G_GINT64_FORMAT, num(c, "slots"));
    }
    printf("%-20s %-10s %8.0f %8.0f %9" G_GINT64_FORMAT " %9" G_GINT64_FORMAT
           " %8" G_GINT64_FORMAT " %8" G_GINT64_FORMAT " %9s\n", name,
           json_object_get_string_member_with_default(d, "state", "?"),
           num(d, "covered-bytes") / 1048576.0, num(d, "saved-bytes") / 1048576.0,
           num(d, "zero-pages"), num(d, "merged-pages"), num(d, "cow-events"),
           num(d, "cpu-ms"), refs);
}

int libvirt_vms(const char *uri, JsonArray *clients, gboolean json)
{
    g_autoptr(JsonBuilder) jb = json_builder_new();
    virConnectPtr conn = virConnectOpen(uri);
    virDomainPtr *doms = NULL;
    int n;

    if (!conn) {
        const virError *e = virGetLastError();

        fprintf(stderr, "qemu-dedup-ctl: cannot connect to libvirt%s%s: %s\n",
                uri ? " at " : "", uri ? uri : "", e ? e->message : "unknown error");
        return 1;
    }
    n = virConnectListAllDomains(conn, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
    if (n < 0) {
        fprintf(stderr, "qemu-dedup-ctl: cannot list libvirt domains: %s\n",
                virGetLastErrorMessage());
        virConnectClose(conn);
        return 1;
    }
    json_builder_begin_array(jb);
    if (!json) {
        printf("%-20s %-10s %8s %8s %9s %9s %8s %8s %9s\n", "domain", "state", "covered",
               "saved", "zero", "merged", "COWs", "cpu-ms", "broker");
        printf("%-20s %-10s %8s %8s %9s %9s %8s %8s %9s\n", "", "", "MiB", "MiB", "pages",
               "pages", "", "", "refs");
    }
    for (int i = 0; i < n; i++) {
        const char *name = virDomainGetName(doms[i]);
        g_autoptr(JsonArray) objs = query_dedup(doms[i]);
        JsonObject *c = client_named(clients, name);

        if (objs) {
            json_builder_begin_object(jb);
            json_builder_set_member_name(jb, "domain");
            json_builder_add_string_value(jb, name);
            json_builder_set_member_name(jb, "memory-dedup");
            json_builder_add_value(jb, json_node_init_array(json_node_alloc(), objs));
            json_builder_set_member_name(jb, "broker");
            if (c) {
                json_builder_add_value(jb, json_node_init_object(json_node_alloc(), c));
            } else {
                json_builder_add_null_value(jb);
            }
            json_builder_end_object(jb);
            for (guint k = 0; !json && k < json_array_get_length(objs); k++) {
                print_row(name, json_array_get_object_element(objs, k), c);
            }
        }
        virDomainFree(doms[i]);
    }
    free(doms);
    virConnectClose(conn);
    json_builder_end_array(jb);
    if (json) {
        g_autoptr(JsonGenerator) gen = json_generator_new();
        g_autoptr(JsonNode) root = json_builder_get_root(jb);
        g_autofree char *text = NULL;

        json_generator_set_root(gen, root);
        json_generator_set_pretty(gen, TRUE);
        text = json_generator_to_data(gen, NULL);
        printf("%s\n", text);
    }
    return 0;
}
