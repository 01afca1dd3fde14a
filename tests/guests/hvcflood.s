# hvcflood: drives the first virtio-mmio device (hvc0, a single-port virtio-console, when it is
# the only device) to DRIVER_OK, then writes BUFFERS transmit buffers of 64 KiB of 'x' to it
# (16 MiB), keeping at most 8 in flight, and waits until the device has used them all. Prints
# "hvcflood: flooding" before and "hvcflood: done" after on COM1, then exits with 0 (1 if the
# device asked for a reset, 2 without a device). A host reader that stops reading holds the
# guest here: it waits for used buffers until the run's timeout.
        .include "common.inc"
        .include "virtio.inc"

        .set RINGS, 0x300000            # 3 pages a queue: descriptors, avail, used
        .set TXQ, RINGS + 0x3000        # the transmit queue's (queue 1)
        .set DATA, 0x400000             # the buffer every descriptor points to
        .set CHUNK, 0x10000
        .set BUFFERS, 256               # 16 MiB in all

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        call map_virtio_window
        mov $VIRTIO_BASE, %ebx          # zero-extended: the window is above 2 GiB
        mov REG_MAGIC(%rbx), %eax
        cmp $0x74726976, %eax           # "virt"
        jne no_device
        mov $2, %ecx
        mov $RINGS, %edi
        call start_device
        mov $DATA, %edi                 # CHUNK bytes of 'x'
        mov $(CHUNK / 8), %ecx
        movabs $0x7878787878787878, %rax
        call fill_qwords
        call write_descriptors
        PRINT "hvcflood: flooding\n"
        xor %r15d, %r15d                # buffers posted
2:      movzwl TXQ+0x2000+2, %eax       # used.idx
        mov %r15d, %ecx
        sub %eax, %ecx
        and $0xffff, %ecx               # buffers in flight
        cmp $8, %ecx
        jae 2b                          # all 8 descriptors are the device's: wait
        mov %r15d, %eax
        and $7, %eax
        mov %ax, TXQ+0x1000+4(,%rax,2)  # avail.ring[idx % 8] = descriptor idx % 8
        inc %r15d
        mov %r15w, TXQ+0x1000+2         # avail.idx
        movl $1, REG_QUEUE_NOTIFY(%rbx)
        cmp $BUFFERS, %r15d
        jb 2b
3:      movzwl TXQ+0x2000+2, %eax
        cmp %r15w, %ax
        jne 3b
        mov REG_STATUS(%rbx), %eax
        test $STATUS_NEEDS_RESET, %eax
        jnz failed
        PRINT "hvcflood: done\n"
        EXIT 0
failed:
        PRINT "hvcflood: the device needs a reset\n"
        EXIT 1
no_device:
        PRINT "hvcflood: no virtio device\n"
        EXIT 2

# write_descriptors: 8 descriptors, each the whole buffer, for the device to read.
write_descriptors:
        mov $TXQ, %edi
        xor %ecx, %ecx
1:      movq $DATA, (%rdi)
        movl $CHUNK, 8(%rdi)
        movl $0, 12(%rdi)               # flags and next: none
        add $16, %rdi
        inc %ecx
        cmp $8, %ecx
        jb 1b
        ret
