/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * memory-dedup: the user-creatable object through which a QEMU guest takes
 * part in qdedup's cross-VM memory deduplication, and its monitor commands
 * (QMP query-memory-dedup, HMP info memory-dedup).
 *
 * For now the object only reports which qdedup overlay this QEMU carries;
 * the engine that scans and merges guest RAM hangs off it (see qdedup's
 * docs/ and ARCHITECTURE).
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-memory-dedup.h"
#include "qom/object_interfaces.h"
#include "monitor/monitor.h"
#include "qemu/module.h"
#include "trace.h"
#include "accel/dedup/qdedup-version.h"

#define TYPE_MEMORY_DEDUP "memory-dedup"
OBJECT_DECLARE_SIMPLE_TYPE(MemoryDedup, MEMORY_DEDUP)

struct MemoryDedup {
    Object parent_obj;
};

static const char *memory_dedup_id(MemoryDedup *md)
{
    return object_get_canonical_path_component(OBJECT(md));
}

static char *memory_dedup_get_version(Object *obj, Error **errp)
{
    return g_strdup(QDEDUP_VERSION);
}

static void memory_dedup_complete(UserCreatable *uc, Error **errp)
{
    MemoryDedup *md = MEMORY_DEDUP(uc);

    trace_memory_dedup_complete(memory_dedup_id(md), QDEDUP_VERSION);
}

static int query_one(Object *obj, void *opaque)
{
    MemoryDedupInfoList ***tail = opaque;
    MemoryDedup *md = (MemoryDedup *)object_dynamic_cast(obj, TYPE_MEMORY_DEDUP);
    MemoryDedupInfo *info;

    if (!md) {
        return 0;
    }
    info = g_new0(MemoryDedupInfo, 1);
    info->id = g_strdup(memory_dedup_id(md));
    info->version = g_strdup(QDEDUP_VERSION);
    QAPI_LIST_APPEND(*tail, info);
    return 0;
}

MemoryDedupInfoList *qmp_query_memory_dedup(Error **errp)
{
    MemoryDedupInfoList *head = NULL;
    MemoryDedupInfoList **tail = &head;

    object_child_foreach(object_get_objects_root(), query_one, &tail);
    return head;
}

static void hmp_info_memory_dedup(Monitor *mon, const QDict *qdict)
{
    MemoryDedupInfoList *list = qmp_query_memory_dedup(NULL);
    MemoryDedupInfoList *l;

    if (!list) {
        monitor_printf(mon, "no memory-dedup objects (qdedup %s)\n",
                       QDEDUP_VERSION);
        return;
    }
    for (l = list; l; l = l->next) {
        monitor_printf(mon, "%s: qdedup %s\n", l->value->id, l->value->version);
    }
    qapi_free_MemoryDedupInfoList(list);
}

static void memory_dedup_class_init(ObjectClass *oc, void *data)
{
    UserCreatableClass *ucc = USER_CREATABLE_CLASS(oc);

    ucc->complete = memory_dedup_complete;
    object_class_property_add_str(oc, "version", memory_dedup_get_version,
                                  NULL);
    object_class_property_set_description(oc, "version",
        "version of the qdedup overlay this QEMU was built with");
}

static const TypeInfo memory_dedup_info = {
    .name = TYPE_MEMORY_DEDUP,
    .parent = TYPE_OBJECT,
    .instance_size = sizeof(MemoryDedup),
    .class_init = memory_dedup_class_init,
    .interfaces = (InterfaceInfo[]) {
        { TYPE_USER_CREATABLE },
        { }
    },
};

static void memory_dedup_register_types(void)
{
    type_register_static(&memory_dedup_info);
    monitor_register_hmp("memory-dedup", true, hmp_info_memory_dedup);
}

type_init(memory_dedup_register_types)
