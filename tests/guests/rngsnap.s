# rngsnap: drives the first virtio-mmio device (a virtio-rng, when it is the only device) to
# DRIVER_OK and has it fill one 16-byte buffer, writes kvmbuild's snapshot port, then asks for a
# second buffer. A run restored from the snapshot starts after the port write with the device
# already running: it exits with 0 only if the restored device still reads DRIVER_OK, serves
# the second request as the ring's second used entry (descriptor 1, 16 bytes) and fills it.
# Exits with 1 for a device that lost its status, 2 for a wrong used entry, 3 for a buffer left
# empty, 4 without a device; a device that lost its queues never answers (the run times out).
        .include "common.inc"
        .include "virtio.inc"

        .set SNAPSHOT_PORT, 0x6f2
        .set RINGS, 0x300000            # descriptors, avail ring a page above, used two above
        .set AVAIL, RINGS + 0x1000
        .set USED, RINGS + 0x2000
        .set DATA, 0x400000             # two 16-byte buffers

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "rngsnap: start\n"
        call map_virtio_window
        mov $VIRTIO_BASE, %ebx          # zero-extended: the window is above 2 GiB
        mov REG_MAGIC(%rbx), %eax
        cmp $0x74726976, %eax           # "virt"
        jne no_device
        mov $1, %ecx
        mov $RINGS, %edi
        call start_device
        xor %r12d, %r12d                # the request: descriptor 0, DATA
        call request
        mov $SNAPSHOT_PORT, %dx
        out %al, %dx
        PRINT "rngsnap: after the snapshot point\n"
        mov REG_STATUS(%rbx), %eax
        cmp $15, %eax                   # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        jne lost_status
        mov $1, %r12d                   # descriptor 1, DATA + 16
        call request
        cmpl $1, USED+4+8               # used.ring[1].id
        jne wrong_entry
        cmpl $16, USED+4+8+4            # used.ring[1].len
        jne wrong_entry
        mov DATA+16, %rax
        or DATA+24, %rax
        jz empty
        PRINT "rngsnap: done\n"
        EXIT 0
lost_status:
        PRINT "rngsnap: the restored device lost its status\n"
        EXIT 1
wrong_entry:
        PRINT "rngsnap: wrong used entry\n"
        EXIT 2
empty:
        PRINT "rngsnap: the buffer stayed empty\n"
        EXIT 3
no_device:
        PRINT "rngsnap: no virtio device\n"
        EXIT 4

# request: descriptor %r12d (DATA + 16 * %r12d, 16 bytes, device-writable) as available entry
# %r12d, a notification, then a wait until the device has used it (clobbers rax, rcx).
request:
        mov %r12d, %eax
        shl $4, %eax                    # 16 bytes a descriptor, and a buffer
        lea DATA(%rax), %ecx
        mov %rcx, RINGS(%rax)           # addr
        movl $16, RINGS+8(%rax)         # len
        movl $2, RINGS+12(%rax)         # flags WRITE, next 0
        mov %r12d, %eax
        mov %ax, AVAIL+4(,%rax,2)       # avail.ring[n] = n
        inc %eax
        mov %ax, AVAIL+2                # avail.idx = n + 1
        movl $0, REG_QUEUE_NOTIFY(%rbx)
1:      movzwl USED+2, %ecx             # used.idx
        cmp %eax, %ecx
        jne 1b
        ret
