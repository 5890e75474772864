/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * How many of a client's pages map each pool slot.  The broker counts one
 * reference per (client, slot) however many pages map it (protocol.h), so
 * the client counts its own uses: the first use of a slot is the reference
 * the broker just gave (HIT or STORED), and only the last page to let go
 * sends the UNREF.
 *
 * One byte a slot in chunks of QD_SLOT_USES_CHUNK slots, allocated when a
 * slot of the chunk is first used; counts over 254 (one content repeated
 * hundreds of times inside one VM) go to a small overflow table.  Plain C,
 * no glib: QEMU's engine and the test clients both use it.  Not thread-safe:
 * the caller serialises, as it does its broker requests.
 */
#ifndef QDEDUP_SLOT_USES_H
#define QDEDUP_SLOT_USES_H

#include <stddef.h>
#include <stdint.h>

#define QD_SLOT_USES_CHUNK 4096u

typedef struct QdSlotUseOverflow {
    uint64_t slot;          /* UINT64_MAX: empty */
    uint64_t count;
} QdSlotUseOverflow;

typedef struct QdSlotUses {
    uint8_t **chunks;       /* chunk -> counts, NULL until used */
    uint64_t nchunks;
    uint64_t max_slots;
    QdSlotUseOverflow *over;
    size_t over_cap, over_len;  /* open addressing, power-of-two capacity */
    uint64_t distinct;      /* slots with at least one use */
} QdSlotUses;

/* 0, or -ENOMEM. */
int qd_slot_uses_init(QdSlotUses *u, uint64_t max_slots);
void qd_slot_uses_destroy(QdSlotUses *u);

/*
 * One more page maps slot.  Returns the uses now (1: the first, the
 * reference the broker just gave), or -EINVAL (slot out of range) or
 * -ENOMEM; on error nothing changed.
 */
int64_t qd_slot_uses_add(QdSlotUses *u, uint64_t slot);

/*
 * One page fewer maps slot.  Returns the uses left (0: send the UNREF), or
 * -ENOENT if the slot had none (nothing changed).
 */
int64_t qd_slot_uses_drop(QdSlotUses *u, uint64_t slot);

/* Forget the slot whatever its count (the broker no longer holds it). */
void qd_slot_uses_forget(QdSlotUses *u, uint64_t slot);

uint64_t qd_slot_uses_count(const QdSlotUses *u, uint64_t slot);

/* Calls fn(slot, uses, opaque) for each slot in use, in slot order. */
void qd_slot_uses_foreach(const QdSlotUses *u,
                          void (*fn)(uint64_t slot, uint64_t uses, void *opaque),
                          void *opaque);

/* Bytes allocated. */
size_t qd_slot_uses_bytes(const QdSlotUses *u);

#endif
