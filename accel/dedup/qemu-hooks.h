/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The places where QEMU's own code calls memory-dedup.  The calls are
 * added by scripts/qemu-edits.sh (see docs/qemu-edits.md); the functions
 * live in memory-dedup.c.  All but the DMA ones do nothing while no
 * memory-dedup object is active.
 */
#ifndef ACCEL_DEDUP_QEMU_HOOKS_H
#define ACCEL_DEDUP_QEMU_HOOKS_H

/*
 * From ram_block_discard_range() before it discards: merged pages in the
 * range must read zeros afterwards (ARCHITECTURE I5).  Any thread, with or
 * without the BQL.  Returns 0 or -errno, and then the discard must fail.
 */
int memory_dedup_ram_discard(RAMBlock *rb, uint64_t start, size_t length);

/*
 * From address_space_map() and address_space_unmap(), for guest RAM a
 * device writes (is_write): between the two, memory-dedup leaves the
 * pages of [host, host+len) alone (ARCHITECTURE I8, accel/dedup/dma.c).
 * Any thread; never blocks for long.  Called whether or not an object is
 * active: one created while I/O is in flight must see the mappings.
 */
void memory_dedup_dma_map(void *host, hwaddr len);
void memory_dedup_dma_unmap(void *host, hwaddr len);

/*
 * From the background-snapshot capability check: its userfaultfd would
 * need the guest RAM that memory-dedup write-protects, so it is refused
 * with a clear error while an object is active.
 */
bool memory_dedup_allow_write_tracking(Error **errp);

#endif
