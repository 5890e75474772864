# SPDX-License-Identifier: GPL-2.0-or-later
# diskread: read the whole virtio disk /dev/vda through the page cache,
# round after round, so the host's disk (cache=none: O_DIRECT) writes into
# freshly allocated guest pages by DMA (with init_on_alloc=1 they are zero
# until the read lands).  Each round drops the page cache first and prints
#   DISKREAD-ROUND n=K sum=SHA256 seconds=S
# Parameters (kernel command line):
#   qdedup.rounds=N (0: until powered off)
#   qdedup.expect=SHA256: when a round's sum differs, print the sum of each
#     MiB as it is in the page cache (DISKREAD-MIB n=K mib=M sum=SHA256)
#     so the host can tell which parts went wrong, then DISKREAD-MIB-END n=K
# It ends with DISKREAD-DONE rounds=N bad=B.  /dev/vda stays open all along:
# the last close of a block device empties its page cache (kill_bdev), which
# would make the per-MiB sums fresh reads instead of what the round read.
dev=/dev/vda
if [ ! -b $dev ]; then
    echo "DISKREAD-ERROR no $dev (virtio_blk not loaded, or no disk?)"
    return 0
fi
size=$(blockdev --getsize64 $dev)
rounds=$(param rounds 0)
expect=$(param expect none)
exec 3<$dev
ready "size=$size"
n=0
bad=0
while [ "$rounds" = 0 ] || [ $n -lt "$rounds" ]; do
    n=$((n + 1))
    sync
    echo 3 >/proc/sys/vm/drop_caches
    start=$(cut -d. -f1 /proc/uptime)
    sum=$(sha256sum $dev | cut -d' ' -f1)
    end=$(cut -d. -f1 /proc/uptime)
    echo "DISKREAD-ROUND n=$n sum=$sum seconds=$((end - start))"
    if [ "$expect" != none ] && [ "$sum" != "$expect" ]; then
        bad=$((bad + 1))
        # What the page cache holds now (no drop in between): per MiB.
        m=0
        while [ $((m * 1048576)) -lt "$size" ]; do
            s=$(dd if=$dev bs=1048576 skip=$m count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
            echo "DISKREAD-MIB n=$n mib=$m sum=$s"
            m=$((m + 1))
        done
        echo "DISKREAD-MIB-END n=$n"
    fi
done
exec 3<&-
echo "DISKREAD-DONE rounds=$n bad=$bad"
