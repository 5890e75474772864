/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * memory-dedup: the user-creatable object through which a QEMU guest takes
 * part in qdedup's cross-VM memory deduplication, and its monitor commands
 * (QMP query-memory-dedup, HMP info memory-dedup).
 *
 * This is only glue: the engine (engine.h, no QEMU includes) does the work
 * in two threads of ours, "dedup-scan" and "dedup-uffd".  Neither takes the
 * BQL: the uffd thread must never wait for anything a vCPU blocked on a
 * write-protected page may hold (ARCHITECTURE I6), and the scanner only
 * talks to the main loop through bottom halves (events).  RAM is followed
 * with a RAMBlockNotifier, registered once the machine is ready (-object
 * is created before the memory backends), which covers hot-plugged DIMMs.
 *
 * Beside the rest of QEMU (docs/memory-dedup.md): discards go through
 * memory_dedup_ram_discard() (qemu-hooks.h), an incoming migration holds
 * the engine until the guest runs, postcopy and background snapshots are
 * refused, object-del unmerges first, and a reset clears the back-off.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-memory-dedup.h"
#include "qapi/qapi-events-memory-dedup.h"
#include "qapi/qapi-visit-memory-dedup.h"
#include "qom/object_interfaces.h"
#include "monitor/monitor.h"
#include "qemu/madvise.h"
#include "qemu/main-loop.h"
#include "qemu/module.h"
#include "qemu/thread.h"
#include "qemu/uuid.h"
#include "crypto/secret_common.h"
#include "exec/memory.h"
#include "exec/ramblock.h"
#include "exec/ramlist.h"
#include "hw/boards.h"
#include "hw/qdev-core.h"
#include "migration/postcopy-ram.h"
#include "qemu/lockable.h"
#include "system/reset.h"
#include "system/runstate.h"
#include "system/hostmem.h"
#include "system/system.h"
#include "trace.h"
#include "accel/dedup/qdedup-version.h"
#include "engine.h"
#include "qemu-hooks.h"

#define TYPE_MEMORY_DEDUP "memory-dedup"
OBJECT_DECLARE_SIMPLE_TYPE(MemoryDedup, MEMORY_DEDUP)

struct MemoryDedup {
    Object parent_obj;

    /* Properties */
    char *broker;
    char *domain;
    char *secret_id;
    char *memdev;
    uint32_t cpu_limit;
    uint32_t pass_interval;
    bool zero_pages;
    bool merge;
    uint64_t max_vmas;
    bool enabled;
    bool broker_required;
    bool ignore_dma;           /* x-ignore-dma: tests only */
    DeviceListener devices;     /* refuses devices that write RAM unseen (I8) */
    bool devices_added;
    bool dma_refused;           /* such a device came: paused for good */

    DedupEngine *engine;
    bool completed;
    bool discard_required;
    bool threads_running;
    QemuThread scan_thread, uffd_thread;
    Notifier machine_done;
    bool machine_done_added;
    RAMBlockNotifier ram_notifier;
    bool ram_notifier_added;
    bool detaching;         /* finalizing: the notifier's removals are not real */
    bool unmerge;           /* property: give merged pages back, merge no more */
    bool incoming;          /* an incoming migration writes guest RAM: wait */
    VMChangeStateEntry *vmstate;
    NotifierWithReturn postcopy_notifier;
    bool postcopy_notifier_added;
    bool reset_added;
    bool active;            /* on memory_dedup_active: QEMU's hooks see it */
    QLIST_ENTRY(MemoryDedup) next;
    GPtrArray *covered;        /* RAMBlock * we gave the engine */
    GPtrArray *refused;        /* char *: "block: reason" */
    char *id;                   /* for the engine's threads (trace, events) */
};

/*
 * Objects whose engine covers RAM, for the hooks QEMU calls
 * (qemu-hooks.h).  Discards come from any thread (balloon and virtio-mem
 * from the main loop, postcopy from the migration thread): the lock keeps
 * object-del from freeing an engine a discard is using.
 */
static QemuMutex memory_dedup_lock;
static QLIST_HEAD(, MemoryDedup) memory_dedup_active =
    QLIST_HEAD_INITIALIZER(memory_dedup_active);

static const char *memory_dedup_id(MemoryDedup *md)
{
    return object_get_canonical_path_component(OBJECT(md));
}

/* Events come from the engine's threads: emit them from the main loop. */
typedef struct DedupEventBH {
    MemoryDedup *md;
    DedupEvent ev;
} DedupEventBH;

static void memory_dedup_event_bh(void *opaque)
{
    DedupEventBH *e = opaque;
    const char *id = memory_dedup_id(e->md);
    DedupStats st;

    switch (e->ev) {
    case DEDUP_EVENT_BROKER_LOST:
        qapi_event_send_memory_dedup_broker_lost(id);
        break;
    case DEDUP_EVENT_BROKER_REGAINED:
        qapi_event_send_memory_dedup_broker_regained(id);
        break;
    case DEDUP_EVENT_VMA_BUDGET:
        dedup_engine_get_stats(e->md->engine, &st);
        warn_report("memory-dedup '%s': VMA budget reached (%" PRIu64 " of %" PRIu64
                    "): no new merges; raise max-vmas and vm.max_map_count",
                    id, st.vmas_used, st.vma_budget);
        qapi_event_send_memory_dedup_vma_budget(id, st.vmas_used, st.vma_budget);
        break;
    }
    object_unref(OBJECT(e->md));
    g_free(e);
}

static void memory_dedup_notify(void *opaque, DedupEvent ev)
{
    MemoryDedup *md = opaque;
    DedupEventBH *e = g_new(DedupEventBH, 1);

    trace_memory_dedup_event(md->id, ev);
    e->md = md;
    e->ev = ev;
    object_ref(OBJECT(md));
    aio_bh_schedule_oneshot(qemu_get_aio_context(), memory_dedup_event_bh, e);
}

/* The engine's trace points, as QEMU trace events (cheap when disabled). */
static void memory_dedup_trace(void *opaque, DedupTrace what, const char *block,
                               uint64_t a, uint64_t b)
{
    const char *id = ((MemoryDedup *)opaque)->id;

    switch (what) {
    case DEDUP_TRACE_MERGED:
        trace_memory_dedup_merged(id, block, a, b);
        break;
    case DEDUP_TRACE_COW:
        trace_memory_dedup_cow(id, block, a, b);
        break;
    case DEDUP_TRACE_RESTORED:
        trace_memory_dedup_restored(id, block, a, b);
        break;
    case DEDUP_TRACE_ZERO:
        trace_memory_dedup_zero_dropped(id, block, a, b);
        break;
    case DEDUP_TRACE_LOOKUP:
        trace_memory_dedup_broker_lookup(id, a, b);
        break;
    case DEDUP_TRACE_PUBLISH:
        trace_memory_dedup_broker_publish(id, a, b);
        break;
    case DEDUP_TRACE_UNREF:
        trace_memory_dedup_broker_unref(id, a);
        break;
    }
}

/* Why a RAM block cannot be merged, or NULL. */
static const char *memory_dedup_refuse(MemoryDedup *md, RAMBlock *rb)
{
    if (rb->flags & RAM_GUEST_MEMFD) {
        return "confidential guest memory (guest_memfd)";
    }
    if (rb->mr->readonly || rb->mr->rom_device || memory_region_is_ram_device(rb->mr)) {
        return "ROM or device memory";
    }
    if (rb->page_size != qemu_real_host_page_size()) {
        return "huge pages (hugetlbfs): merging works on 4 KiB pages";
    }
    if (rb->flags & RAM_RESIZEABLE) {
        return "resizeable firmware blob";
    }
    if (rb->flags & RAM_SHARED) {
        return "shared memory (share=on): another process may map it";
    }
    if (should_mlock(mlock_state)) {
        return "guest memory is locked (-overcommit mem-lock)";
    }
    if (rb->flags & RAM_UF_WRITEPROTECT) {
        return "a background snapshot owns its userfaultfd";
    }
    if (md->memdev) {
        Object *owner = memory_region_owner(rb->mr);

        if (!owner || !object_dynamic_cast(owner, TYPE_MEMORY_BACKEND) ||
            g_strcmp0(object_get_canonical_path_component(owner), md->memdev)) {
            return "";     /* not the memdev asked for: not worth a mention */
        }
    }
    return NULL;
}

/*
 * Does QEMU keep the block out of core dumps (backend "dump=off", or machine
 * dump-guest-core=off)?  Then so must every mapping the engine puts there:
 * a merged page's VMA is new, and a host core dump must hold no guest page.
 */
static bool memory_dedup_dontdump(RAMBlock *rb)
{
    Object *owner = memory_region_owner(rb->mr);

    if (owner && object_dynamic_cast(owner, TYPE_MEMORY_BACKEND) &&
        !object_property_get_bool(owner, "dump", NULL)) {
        return true;
    }
    return current_machine && !machine_dump_guest_core(current_machine);
}

/* QEMU's KSM setting for the block (backend "merge", or machine mem-merge). */
static bool memory_dedup_ksm_wanted(RAMBlock *rb)
{
    Object *owner = memory_region_owner(rb->mr);

    if (owner && object_dynamic_cast(owner, TYPE_MEMORY_BACKEND)) {
        return object_property_get_bool(owner, "merge", NULL);
    }
    return current_machine && machine_mem_merge(current_machine);
}

static void memory_dedup_ram_added(RAMBlockNotifier *n, void *host, size_t size,
                                   size_t max_size)
{
    MemoryDedup *md = container_of(n, MemoryDedup, ram_notifier);
    ram_addr_t offset;
    RAMBlock *rb = qemu_ram_block_from_host(host, false, &offset);
    const char *why;
    char *err = NULL;

    if (!rb || rb->host != host) {
        return;
    }
    why = memory_dedup_refuse(md, rb);
    if (why) {
        if (*why) {
            g_ptr_array_add(md->refused, g_strdup_printf("%s: %s", rb->idstr, why));
        }
        return;
    }
    if (dedup_engine_add_region(md->engine, rb->idstr, rb->host, rb->used_length,
                                DEDUP_REGION_DONTFORK |
                                (memory_dedup_dontdump(rb) ? DEDUP_REGION_DONTDUMP : 0) |
                                (rb->fd >= 0 ? DEDUP_REGION_FILE : 0),
                                &err) < 0) {
        warn_report("memory-dedup '%s': %s", memory_dedup_id(md), err);
        g_ptr_array_add(md->refused, g_strdup_printf("%s: %s", rb->idstr, err));
        g_free(err);
        return;
    }
    /* KSM and we must not fight over the same pages. */
    qemu_madvise(rb->host, rb->used_length, QEMU_MADV_UNMERGEABLE);
    g_ptr_array_add(md->covered, rb);
    trace_memory_dedup_ram_added(memory_dedup_id(md), rb->idstr, rb->used_length);
}

static void memory_dedup_ram_removed(RAMBlockNotifier *n, void *host, size_t size,
                                     size_t max_size)
{
    MemoryDedup *md = container_of(n, MemoryDedup, ram_notifier);

    /*
     * ram_block_notifier_remove() reports every block as removed, but on
     * object-del the RAM stays mapped, pool pages and all: releasing their
     * references now would let the broker punch slots we still map (I2).
     */
    if (md->detaching) {
        return;
    }
    for (guint i = 0; i < md->covered->len; i++) {
        RAMBlock *rb = g_ptr_array_index(md->covered, i);

        if (rb->host == host) {
            dedup_engine_remove_region(md->engine, host);
            g_ptr_array_remove_index(md->covered, i);
            trace_memory_dedup_ram_removed(memory_dedup_id(md), rb->idstr);
            return;
        }
    }
}

void memory_dedup_dma_map(void *host, hwaddr len)
{
    dedup_dma_map(host, len);
}

void memory_dedup_dma_unmap(void *host, hwaddr len)
{
    dedup_dma_unmap(host, len);
}

int memory_dedup_ram_discard(RAMBlock *rb, uint64_t start, size_t length)
{
    MemoryDedup *md;
    int ret = 0;

    QEMU_LOCK_GUARD(&memory_dedup_lock);
    QLIST_FOREACH(md, &memory_dedup_active, next) {
        ret = dedup_engine_discard(md->engine, rb->host + start, length);
        trace_memory_dedup_discard(md->id, rb->idstr, start, length, ret);
        if (ret < 0) {
            error_report("memory-dedup '%s': cannot discard %s+0x%" PRIx64 " +0x%zx: %s",
                         md->id, rb->idstr, start, length, strerror(-ret));
            break;
        }
    }
    return ret;
}

bool memory_dedup_allow_write_tracking(Error **errp)
{
    MemoryDedup *md;

    QEMU_LOCK_GUARD(&memory_dedup_lock);
    md = QLIST_FIRST(&memory_dedup_active);
    if (md) {
        error_setg(errp, "Background-snapshot is refused while memory-dedup '%s' is "
                   "active: both need the userfaultfd of guest RAM; take the snapshot "
                   "without background-snapshot (the guest pauses), or object-del '%s' "
                   "first", md->id, md->id);
        return false;
    }
    return true;
}

/* Postcopy's destination registers its own userfaultfd on guest RAM. */
static int memory_dedup_postcopy_notify(NotifierWithReturn *n, void *data, Error **errp)
{
    MemoryDedup *md = container_of(n, MemoryDedup, postcopy_notifier);
    struct PostcopyNotifyData *pnd = data;

    if (pnd->reason == POSTCOPY_NOTIFY_PROBE) {
        error_setg(errp, "memory-dedup '%s' write-protects guest RAM with a userfaultfd, "
                   "which postcopy needs for itself; migrate with precopy, or add the "
                   "object to this QEMU after the migration", md->id);
        return -1;
    }
    return 0;
}

/* The incoming migration completed and the guest runs: merge from now on. */
static void memory_dedup_vm_state(void *opaque, bool running, RunState state)
{
    MemoryDedup *md = opaque;

    if (running && md->incoming) {
        md->incoming = false;
        trace_memory_dedup_incoming_done(md->id);
        dedup_engine_set_enabled(md->engine, md->enabled);
    }
}

static void memory_dedup_reset(void *opaque)
{
    MemoryDedup *md = opaque;

    dedup_engine_reset_hints(md->engine);
}

static void *memory_dedup_scan_thread(void *opaque)
{
    dedup_engine_run_scanner(opaque);
    return NULL;
}

static void *memory_dedup_uffd_thread(void *opaque)
{
    dedup_engine_run_faults(opaque);
    return NULL;
}

static void memory_dedup_machine_done(Notifier *n, void *data)
{
    MemoryDedup *md = container_of(n, MemoryDedup, machine_done);

    if (md->threads_running) {
        return;
    }
    if (runstate_check(RUN_STATE_INMIGRATE)) {
        /* RAM keeps arriving until the migration completes: merge after. */
        md->incoming = true;
        dedup_engine_set_enabled(md->engine, false);
    }
    md->vmstate = qemu_add_vm_change_state_handler(memory_dedup_vm_state, md);
    qemu_register_reset(memory_dedup_reset, md);
    md->reset_added = true;
    md->ram_notifier.ram_block_added = memory_dedup_ram_added;
    md->ram_notifier.ram_block_removed = memory_dedup_ram_removed;
    ram_block_notifier_add(&md->ram_notifier);      /* replays existing RAM */
    md->ram_notifier_added = true;
    qemu_thread_create(&md->uffd_thread, "dedup-uffd", memory_dedup_uffd_thread,
                       md->engine, QEMU_THREAD_JOINABLE);
    qemu_thread_create(&md->scan_thread, "dedup-scan", memory_dedup_scan_thread,
                       md->engine, QEMU_THREAD_JOINABLE);
    md->threads_running = true;
    WITH_QEMU_LOCK_GUARD(&memory_dedup_lock) {
        QLIST_INSERT_HEAD(&memory_dedup_active, md, next);
        md->active = true;
    }
}

/*
 * Devices that write guest RAM by DMA without mapping it through
 * address_space_map() (I8): the kernel's vhost-scsi pins the guest's
 * buffers itself, from the addresses in the virtqueue.  VFIO, vDPA and
 * blkio pin all of RAM and are excluded by ram_block_discard_require().
 */
static const char *const memory_dedup_unseen_dma[] = { "vhost-scsi" };

static const char *memory_dedup_unseen_dma_type(Object *obj)
{
    for (size_t i = 0; i < ARRAY_SIZE(memory_dedup_unseen_dma); i++) {
        if (object_dynamic_cast(obj, memory_dedup_unseen_dma[i])) {
            return memory_dedup_unseen_dma[i];
        }
    }
    return NULL;
}

static int memory_dedup_find_unseen_dma(Object *obj, void *opaque)
{
    const char **found = opaque;

    *found = memory_dedup_unseen_dma_type(obj);
    return *found ? 1 : object_child_foreach(obj, memory_dedup_find_unseen_dma, opaque);
}

/* Hot-plugged after the object was made: stop changing pages for good. */
static void memory_dedup_device_realize(DeviceListener *l, DeviceState *dev)
{
    MemoryDedup *md = container_of(l, MemoryDedup, devices);
    const char *type = memory_dedup_unseen_dma_type(OBJECT(dev));

    if (!type || md->dma_refused) {
        return;
    }
    md->dma_refused = true;
    md->enabled = false;
    dedup_engine_set_enabled(md->engine, false);
    warn_report("memory-dedup '%s': paused for good: device '%s' (%s) writes guest "
                "RAM by DMA without telling memory-dedup", md->id,
                dev->id ? dev->id : object_get_canonical_path_component(OBJECT(dev)),
                type);
}

static bool memory_dedup_broker_reachable(MemoryDedup *md, Error **errp)
{
    const char *path = md->broker ? md->broker : "/run/qemu-dedup/broker.sock";

    if (access(path, W_OK) < 0) {
        error_setg_errno(errp, errno, "memory-dedup: broker socket '%s' unusable "
                         "(broker-required=on)", path);
        return false;
    }
    return true;
}

static void memory_dedup_complete(UserCreatable *uc, Error **errp)
{
    MemoryDedup *md = MEMORY_DEDUP(uc);
    DedupConfig cfg = {
        .broker = md->broker, .domain = md->domain, .name = qemu_name,
        .zero_pages = md->zero_pages, .merge = md->merge,
        .cpu_limit = md->cpu_limit, .pass_interval_ms = md->pass_interval,
        .max_vmas = md->max_vmas, .ignore_dma = md->ignore_dma,
        .notify = memory_dedup_notify,
        .trace = memory_dedup_trace, .opaque = md,
    };
    g_autofree char *secret = NULL;
    char *err = NULL;

    /* Looked up once: the engine's threads must not walk QOM. */
    md->id = g_strdup(memory_dedup_id(md));

    if (md->cpu_limit < 1 || md->cpu_limit > 100) {
        error_setg(errp, "memory-dedup: cpu-limit must be 1-100 (percent of one core), "
                   "not %" PRIu32, md->cpu_limit);
        return;
    }
    if (md->domain && strlen(md->domain) > 64) {
        error_setg(errp, "memory-dedup: domain names are at most 64 bytes");
        return;
    }
    if (md->secret_id) {
        secret = qcrypto_secret_lookup_as_utf8(md->secret_id, errp);
        if (!secret) {
            return;
        }
        /* As the broker reads its secret-file: a trailing newline is no part of it. */
        g_strchomp(secret);
        if (strlen(secret) > 64) {
            error_setg(errp, "memory-dedup: the secret '%s' is longer than 64 bytes",
                       md->secret_id);
            return;
        }
        cfg.secret = secret;
    }
    if (md->broker_required && !memory_dedup_broker_reachable(md, errp)) {
        return;
    }
    memcpy(cfg.uuid, &qemu_uuid, sizeof(cfg.uuid));
    /* Merging is an uncoordinated discard: devices that pin RAM exclude it. */
    if (ram_block_discard_require(true) < 0) {
        error_setg(errp, "memory-dedup: guest RAM is pinned by a device (VFIO, vDPA, "
                   "blkio) or discards are disabled; dedup cannot run beside it");
        return;
    }
    md->discard_required = true;
    {
        const char *type = NULL;

        object_child_foreach(object_get_root(), memory_dedup_find_unseen_dma, &type);
        if (type) {
            error_setg(errp, "memory-dedup: a %s device writes guest RAM by DMA "
                       "without telling memory-dedup", type);
            error_append_hint(errp, "Use virtio-scsi or virtio-blk with the same "
                              "disk, or run this VM without memory-dedup.\n");
            return;
        }
    }
    md->engine = dedup_engine_new(&cfg, &err);
    if (!md->engine) {
        error_setg(errp, "memory-dedup: %s", err);
        g_free(err);
        return;
    }
    dedup_engine_set_enabled(md->engine, md->enabled);
    dedup_engine_set_unmerging(md->engine, md->unmerge);
    md->devices.realize = memory_dedup_device_realize;
    device_listener_register(&md->devices);
    md->devices_added = true;
    md->postcopy_notifier.notify = memory_dedup_postcopy_notify;
    postcopy_add_notifier(&md->postcopy_notifier);
    md->postcopy_notifier_added = true;
    md->completed = true;
    md->machine_done.notify = memory_dedup_machine_done;
    qemu_add_machine_init_done_notifier(&md->machine_done);  /* now if ready */
    md->machine_done_added = true;
    trace_memory_dedup_complete(memory_dedup_id(md), QDEDUP_VERSION);
}

static void memory_dedup_finalize(Object *obj)
{
    MemoryDedup *md = MEMORY_DEDUP(obj);

    if (md->active) {
        WITH_QEMU_LOCK_GUARD(&memory_dedup_lock) {
            QLIST_REMOVE(md, next);
        }
    }
    if (md->devices_added) {
        device_listener_unregister(&md->devices);
    }
    if (md->postcopy_notifier_added) {
        postcopy_remove_notifier(&md->postcopy_notifier);
    }
    if (md->vmstate) {
        qemu_del_vm_change_state_handler(md->vmstate);
    }
    if (md->reset_added) {
        qemu_unregister_reset(memory_dedup_reset, md);
    }
    if (md->machine_done_added) {
        qemu_remove_machine_init_done_notifier(&md->machine_done);
    }
    if (md->threads_running) {
        dedup_engine_stop(md->engine);
        qemu_thread_join(&md->scan_thread);
        qemu_thread_join(&md->uffd_thread);
    }
    if (md->ram_notifier_added) {
        md->detaching = true;
        ram_block_notifier_remove(&md->ram_notifier);
    }
    for (guint i = 0; md->covered && i < md->covered->len; i++) {
        RAMBlock *rb = g_ptr_array_index(md->covered, i);

        /* Give the RAM back to KSM as QEMU had it (mem-merge / merge=). */
        if (memory_dedup_ksm_wanted(rb)) {
            qemu_madvise(rb->host, rb->used_length, QEMU_MADV_MERGEABLE);
        }
    }
    /* Merged pages stay mapped and correct; the broker keeps their refs (I2). */
    dedup_engine_free(md->engine);
    if (md->discard_required) {
        ram_block_discard_require(false);
    }
    g_ptr_array_free(md->covered, TRUE);
    g_ptr_array_free(md->refused, TRUE);
    g_free(md->broker);
    g_free(md->domain);
    g_free(md->secret_id);
    g_free(md->memdev);
    g_free(md->id);
}

/*
 * object-del (only; QEMU's exit skips this): the guest keeps running
 * without us, so give every merged page back and release its reference
 * (I2) while the fault thread still resolves the writes that wait for a
 * move.  Pages that cannot move (no memory) stay merged and correct; the
 * broker keeps their references until QEMU exits.  unmerge=on does the
 * same in the background first, with progress in query-memory-dedup.
 */
static bool memory_dedup_can_be_deleted(UserCreatable *uc)
{
    MemoryDedup *md = MEMORY_DEDUP(uc);
    uint64_t left;

    if (!md->threads_running) {
        return true;
    }
    dedup_engine_set_enabled(md->engine, false);
    dedup_engine_set_unmerging(md->engine, false);
    left = dedup_engine_unmerge(md->engine, UINT64_MAX);
    trace_memory_dedup_unmerged(md->id, left);
    if (left) {
        warn_report("memory-dedup '%s': %" PRIu64 " pages stay merged until QEMU exits "
                    "(no memory to copy them)", md->id, left);
    }
    return true;
}

static void memory_dedup_init(Object *obj)
{
    MemoryDedup *md = MEMORY_DEDUP(obj);

    md->cpu_limit = 25;
    md->pass_interval = 500;
    md->zero_pages = true;
    md->merge = true;
    md->max_vmas = 16384;
    md->enabled = true;
    md->covered = g_ptr_array_new();
    md->refused = g_ptr_array_new_with_free_func(g_free);
}

/* String properties may be set only before the object is complete. */
#define MEMORY_DEDUP_STR_PROP(field, name)                                    \
static char *memory_dedup_get_##field(Object *obj, Error **errp)              \
{                                                                             \
    return g_strdup(MEMORY_DEDUP(obj)->field);                                \
}                                                                             \
static void memory_dedup_set_##field(Object *obj, const char *v, Error **errp) \
{                                                                             \
    MemoryDedup *md = MEMORY_DEDUP(obj);                                      \
    if (md->completed) {                                                      \
        error_setg(errp, "memory-dedup: '" name "' cannot change at run time; " \
                   "delete the object and add it again");                     \
        return;                                                               \
    }                                                                         \
    g_free(md->field);                                                        \
    md->field = g_strdup(v);                                                  \
}

MEMORY_DEDUP_STR_PROP(broker, "broker")
MEMORY_DEDUP_STR_PROP(domain, "domain")
MEMORY_DEDUP_STR_PROP(secret_id, "secret")
MEMORY_DEDUP_STR_PROP(memdev, "memdev")

static void memory_dedup_get_u32(Object *obj, Visitor *v, const char *name,
                                 void *opaque, Error **errp)
{
    visit_type_uint32(v, name, (uint32_t *)((char *)obj + (uintptr_t)opaque), errp);
}

static void memory_dedup_get_u64(Object *obj, Visitor *v, const char *name,
                                 void *opaque, Error **errp)
{
    visit_type_uint64(v, name, (uint64_t *)((char *)obj + (uintptr_t)opaque), errp);
}

static void memory_dedup_set_cpu_limit(Object *obj, Visitor *v, const char *name,
                                       void *opaque, Error **errp)
{
    MemoryDedup *md = MEMORY_DEDUP(obj);
    uint32_t val;

    if (!visit_type_uint32(v, name, &val, errp)) {
        return;
    }
    if (val < 1 || val > 100) {
        error_setg(errp, "memory-dedup: cpu-limit must be 1-100 (percent of one core), "
                   "not %" PRIu32, val);
        return;
    }
    md->cpu_limit = val;
    if (md->engine) {
        dedup_engine_set_cpu_limit(md->engine, val);
    }
}

static void memory_dedup_set_pass_interval(Object *obj, Visitor *v, const char *name,
                                           void *opaque, Error **errp)
{
    MemoryDedup *md = MEMORY_DEDUP(obj);
    uint32_t val;

    if (!visit_type_uint32(v, name, &val, errp)) {
        return;
    }
    if (val > 3600 * 1000) {
        error_setg(errp, "memory-dedup: pass-interval must be 0-3600000 (milliseconds)");
        return;
    }
    if (md->completed) {
        error_setg(errp, "memory-dedup: 'pass-interval' cannot change at run time");
        return;
    }
    md->pass_interval = val;
}

static void memory_dedup_set_max_vmas(Object *obj, Visitor *v, const char *name,
                                      void *opaque, Error **errp)
{
    MemoryDedup *md = MEMORY_DEDUP(obj);
    uint64_t val;

    if (!visit_type_uint64(v, name, &val, errp)) {
        return;
    }
    if (val > 1u << 30) {
        error_setg(errp, "memory-dedup: max-vmas must be at most %u", 1u << 30);
        return;
    }
    md->max_vmas = val;
    if (md->engine) {
        dedup_engine_set_max_vmas(md->engine, val);
    }
}

#define MEMORY_DEDUP_BOOL_PROP(field, apply)                                  \
static bool memory_dedup_get_##field(Object *obj, Error **errp)               \
{                                                                             \
    return MEMORY_DEDUP(obj)->field;                                          \
}                                                                             \
static void memory_dedup_set_##field(Object *obj, bool v, Error **errp)       \
{                                                                             \
    MemoryDedup *md = MEMORY_DEDUP(obj);                                      \
    md->field = v;                                                            \
    if (md->engine) {                                                         \
        apply;                                                                \
    }                                                                         \
}

MEMORY_DEDUP_BOOL_PROP(enabled, dedup_engine_set_enabled(md->engine,
                                                  v && !md->incoming && !md->dma_refused))
MEMORY_DEDUP_BOOL_PROP(unmerge, dedup_engine_set_unmerging(md->engine, v))
MEMORY_DEDUP_BOOL_PROP(zero_pages, dedup_engine_set_zero_pages(md->engine, v))
MEMORY_DEDUP_BOOL_PROP(broker_required, (void)0)
MEMORY_DEDUP_BOOL_PROP(ignore_dma, (void)0)

static bool memory_dedup_get_merge(Object *obj, Error **errp)
{
    return MEMORY_DEDUP(obj)->merge;
}

static void memory_dedup_set_merge(Object *obj, bool v, Error **errp)
{
    MemoryDedup *md = MEMORY_DEDUP(obj);

    if (md->completed) {
        error_setg(errp, "memory-dedup: 'merge' cannot change at run time; use "
                   "'enabled' to pause");
        return;
    }
    md->merge = v;
}

static MemoryDedupInfo *memory_dedup_info(MemoryDedup *md)
{
    MemoryDedupInfo *info = g_new0(MemoryDedupInfo, 1);
    strList **tail = &info->refused;
    DedupStats st = { 0 };

    if (md->engine) {
        dedup_engine_get_stats(md->engine, &st);
    }
    info->id = g_strdup(memory_dedup_id(md));
    info->version = g_strdup(QDEDUP_VERSION);
    info->state = md->unmerge ? MEMORY_DEDUP_STATE_UNMERGING :
                  md->incoming ? MEMORY_DEDUP_STATE_INCOMING :
                  !md->enabled ? MEMORY_DEDUP_STATE_PAUSED :
                  st.vma_budget_reached ? MEMORY_DEDUP_STATE_VMA_BUDGET :
                  md->merge && !st.broker_connected ? MEMORY_DEDUP_STATE_NO_BROKER :
                  MEMORY_DEDUP_STATE_RUNNING;
    info->broker_connected = st.broker_connected;
    info->domain = g_strdup(md->domain ? md->domain : "");
    info->covered_bytes = st.covered_bytes;
    info->scanned_pages = st.scanned_pages;
    info->passes = st.passes;
    info->last_pass_ms = st.last_pass_ms;
    info->zero_pages = st.zero_pages;
    info->merged_pages = st.merged_pages;
    info->pool_refs = st.pool_refs;
    info->cow_events = st.cow_events;
    info->merges = st.merges;
    info->restored = st.restored;
    info->mismatches = st.mismatches;
    info->dma_skipped = st.dma_skipped;
    info->huge_pages_split = st.thp_splits;
    info->vmas_used = st.vmas_used;
    info->vma_budget = md->max_vmas;
    info->metadata_bytes = st.metadata_bytes;
    info->saved_bytes = st.saved_bytes;
    info->cpu_ms = st.cpu_ns / 1000000;
    info->broker_reconnects = st.broker_reconnects;
    info->discarded_pages = st.discarded;
    info->unmerged_pages = st.unmerged;
    info->resets = st.resets;
    for (guint i = 0; i < md->refused->len; i++) {
        QAPI_LIST_APPEND(tail, g_strdup(g_ptr_array_index(md->refused, i)));
    }
    return info;
}

static int query_one(Object *obj, void *opaque)
{
    MemoryDedupInfoList ***tail = opaque;
    MemoryDedup *md = (MemoryDedup *)object_dynamic_cast(obj, TYPE_MEMORY_DEDUP);

    if (md) {
        QAPI_LIST_APPEND(*tail, memory_dedup_info(md));
    }
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

    if (!list) {
        monitor_printf(mon, "no memory-dedup objects (qdedup %s)\n", QDEDUP_VERSION);
        return;
    }
    for (MemoryDedupInfoList *l = list; l; l = l->next) {
        MemoryDedupInfo *i = l->value;

        monitor_printf(mon, "%s: qdedup %s, %s, broker %s, domain '%s'\n", i->id,
                       i->version, MemoryDedupState_str(i->state),
                       i->broker_connected ? "connected" : "not connected", i->domain);
        monitor_printf(mon, "  covered %" PRIu64 " MiB, saved %" PRId64 " MiB; "
                       "zero pages %" PRIu64 ", merged pages %" PRIu64
                       ", pool refs %" PRIu64 ", COWs %" PRIu64 "\n",
                       i->covered_bytes >> 20, i->saved_bytes >> 20, i->zero_pages,
                       i->merged_pages, i->pool_refs, i->cow_events);
        monitor_printf(mon, "  passes %" PRIu64 " (last %" PRIu64 " ms), scanned %"
                       PRIu64 " pages, VMAs %" PRIu64 "/%" PRIu64 ", CPU %" PRIu64
                       " ms\n", i->passes, i->last_pass_ms, i->scanned_pages,
                       i->vmas_used, i->vma_budget, i->cpu_ms);
        monitor_printf(mon, "  discarded %" PRIu64 " merged pages, unmerged %" PRIu64
                       ", resets %" PRIu64 "\n", i->discarded_pages, i->unmerged_pages,
                       i->resets);
        for (strList *r = i->refused; r; r = r->next) {
            monitor_printf(mon, "  not covered: %s\n", r->value);
        }
    }
    qapi_free_MemoryDedupInfoList(list);
}

static char *memory_dedup_get_version(Object *obj, Error **errp)
{
    return g_strdup(QDEDUP_VERSION);
}

typedef struct MemoryDedupStrProp {
    const char *name;
    char *(*get)(Object *, Error **);
    void (*set)(Object *, const char *, Error **);
    const char *desc;
} MemoryDedupStrProp;

static const MemoryDedupStrProp memory_dedup_str_props[] = {
    { "broker", memory_dedup_get_broker, memory_dedup_set_broker,
      "broker socket (default /run/qemu-dedup/broker.sock)" },
    { "domain", memory_dedup_get_domain, memory_dedup_set_domain,
      "trust domain to share pages with (default: none)" },
    { "secret", memory_dedup_get_secret_id, memory_dedup_set_secret_id,
      "id of a secret object with the domain's secret" },
    { "memdev", memory_dedup_get_memdev, memory_dedup_set_memdev,
      "the one memory backend to cover (default: all guest RAM)" },
};

typedef struct MemoryDedupBoolProp {
    const char *name;
    bool (*get)(Object *, Error **);
    void (*set)(Object *, bool, Error **);
    const char *desc;
} MemoryDedupBoolProp;

static const MemoryDedupBoolProp memory_dedup_bool_props[] = {
    { "zero-pages", memory_dedup_get_zero_pages, memory_dedup_set_zero_pages,
      "drop zero pages (default on)" },
    { "merge", memory_dedup_get_merge, memory_dedup_set_merge,
      "merge duplicate pages through the broker (default on)" },
    { "enabled", memory_dedup_get_enabled, memory_dedup_set_enabled,
      "scan and merge; off pauses (default on)" },
    { "unmerge", memory_dedup_get_unmerge, memory_dedup_set_unmerge,
      "give every merged page back to the guest, in the background; merging "
      "stops while on (default off)" },
    { "broker-required", memory_dedup_get_broker_required,
      memory_dedup_set_broker_required,
      "fail when the broker cannot be reached (default off: retry)" },
    { "x-ignore-dma", memory_dedup_get_ignore_dma, memory_dedup_set_ignore_dma,
      "tests only: change pages devices are writing by DMA (default off)" },
};

typedef struct MemoryDedupNumProp {
    const char *name;
    const char *type;           /* "uint32" or "uint64" */
    ObjectPropertyAccessor *set;
    size_t offset;
    const char *desc;
} MemoryDedupNumProp;

static const MemoryDedupNumProp memory_dedup_num_props[] = {
    { "cpu-limit", "uint32", memory_dedup_set_cpu_limit,
      offsetof(MemoryDedup, cpu_limit),
      "scanner CPU, percent of one core, 1-100 (default 25)" },
    { "pass-interval", "uint32", memory_dedup_set_pass_interval,
      offsetof(MemoryDedup, pass_interval), "pause between passes, ms (default 500)" },
    { "max-vmas", "uint64", memory_dedup_set_max_vmas,
      offsetof(MemoryDedup, max_vmas), "memory mappings merging may add (default 16384)" },
};

static void memory_dedup_class_init(ObjectClass *oc, void *data)
{
    UserCreatableClass *ucc = USER_CREATABLE_CLASS(oc);

    ucc->complete = memory_dedup_complete;
    ucc->can_be_deleted = memory_dedup_can_be_deleted;
    object_class_property_add_str(oc, "version", memory_dedup_get_version, NULL);
    object_class_property_set_description(oc, "version",
        "version of the qdedup overlay this QEMU was built with");
    for (size_t i = 0; i < ARRAY_SIZE(memory_dedup_str_props); i++) {
        const MemoryDedupStrProp *p = &memory_dedup_str_props[i];

        object_class_property_add_str(oc, p->name, p->get, p->set);
        object_class_property_set_description(oc, p->name, p->desc);
    }
    for (size_t i = 0; i < ARRAY_SIZE(memory_dedup_bool_props); i++) {
        const MemoryDedupBoolProp *p = &memory_dedup_bool_props[i];

        object_class_property_add_bool(oc, p->name, p->get, p->set);
        object_class_property_set_description(oc, p->name, p->desc);
    }
    for (size_t i = 0; i < ARRAY_SIZE(memory_dedup_num_props); i++) {
        const MemoryDedupNumProp *p = &memory_dedup_num_props[i];

        object_class_property_add(oc, p->name, p->type,
                                  !strcmp(p->type, "uint32") ? memory_dedup_get_u32
                                                             : memory_dedup_get_u64,
                                  p->set, NULL, (void *)p->offset);
        object_class_property_set_description(oc, p->name, p->desc);
    }
}

static const TypeInfo memory_dedup_info_type = {
    .name = TYPE_MEMORY_DEDUP,
    .parent = TYPE_OBJECT,
    .instance_size = sizeof(MemoryDedup),
    .instance_init = memory_dedup_init,
    .instance_finalize = memory_dedup_finalize,
    .class_init = memory_dedup_class_init,
    .interfaces = (InterfaceInfo[]) {
        { TYPE_USER_CREATABLE },
        { }
    },
};

static void memory_dedup_register_types(void)
{
    qemu_mutex_init(&memory_dedup_lock);
    type_register_static(&memory_dedup_info_type);
    monitor_register_hmp("memory-dedup", true, hmp_info_memory_dedup);
}

type_init(memory_dedup_register_types)
