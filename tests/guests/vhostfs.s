# vhostfs: drives the first virtio-mmio device (a vhost-user-fs share, when it is the only
# device) to DRIVER_OK as a driver would: reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK,
# both queues (8 entries, rings in low RAM), DRIVER_OK. kvmbuild hands the queues to the
# back end at DRIVER_OK, so the whole vhost-user set-up runs inside that one register write.
# Then: if the command line starts with 's' ("stay") it spins, so only the back end or
# --timeout can end it; otherwise it exits with 0 (or 1 if the device asked for a reset).
        .include "common.inc"

        .set VIRTIO_BASE, 0xd0000000    # the first virtio-mmio window
        .set REG_MAGIC, 0x000
        .set REG_DRIVER_FEATURES, 0x020
        .set REG_DRIVER_FEATURES_SEL, 0x024
        .set REG_QUEUE_SEL, 0x030
        .set REG_QUEUE_NUM, 0x038
        .set REG_QUEUE_READY, 0x044
        .set REG_STATUS, 0x070
        .set REG_QUEUE_DESC, 0x080
        .set REG_QUEUE_DRIVER, 0x090
        .set REG_QUEUE_DEVICE, 0x0a0
        .set STATUS_NEEDS_RESET, 0x40
        .set RINGS, 0x300000            # 3 pages a queue: descriptors, avail, used

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        mov %rsi, %r12                  # the zero page
        call map_virtio_window
        mov $VIRTIO_BASE, %ebx          # zero-extended: the window is above 2 GiB
        mov REG_MAGIC(%rbx), %eax
        cmp $0x74726976, %eax           # "virt"
        jne no_device
        movl $0, REG_STATUS(%rbx)
        movl $1, REG_STATUS(%rbx)       # ACKNOWLEDGE
        movl $3, REG_STATUS(%rbx)       # | DRIVER
        movl $1, REG_DRIVER_FEATURES_SEL(%rbx)
        movl $1, REG_DRIVER_FEATURES(%rbx)      # VERSION_1 (feature bit 32)
        movl $11, REG_STATUS(%rbx)      # | FEATURES_OK
        xor %r13d, %r13d                # queue index
        mov $RINGS, %r14d               # its rings
1:      mov %r13d, REG_QUEUE_SEL(%rbx)
        movl $8, REG_QUEUE_NUM(%rbx)
        mov %r14d, REG_QUEUE_DESC(%rbx)
        movl $0, REG_QUEUE_DESC+4(%rbx)
        lea 0x1000(%r14), %eax
        mov %eax, REG_QUEUE_DRIVER(%rbx)
        movl $0, REG_QUEUE_DRIVER+4(%rbx)
        lea 0x2000(%r14), %eax
        mov %eax, REG_QUEUE_DEVICE(%rbx)
        movl $0, REG_QUEUE_DEVICE+4(%rbx)
        movl $1, REG_QUEUE_READY(%rbx)
        add $0x3000, %r14d
        inc %r13d
        cmp $2, %r13d
        jb 1b
        movl $15, REG_STATUS(%rbx)      # | DRIVER_OK: the back end is set up now
        mov REG_STATUS(%rbx), %eax
        test $STATUS_NEEDS_RESET, %eax
        jnz failed
        PRINT "vhostfs: driver ok\n"
        mov BP_CMD_LINE_PTR(%r12), %eax
        cmpb $'s', (%rax)
        je stay
        EXIT 0
stay:
        PRINT "vhostfs: staying\n"
2:      jmp 2b
failed:
        PRINT "vhostfs: the device needs a reset\n"
        EXIT 1
no_device:
        PRINT "vhostfs: no virtio device\n"
        EXIT 2

# map_virtio_window: maps the 2 MiB at VIRTIO_BASE (identity) through a page directory of our
# own for the fourth GiB; kvmbuild's page tables map only the first GiB.
map_virtio_window:
        mov %cr3, %rax
        and $~0xfff, %rax               # the PML4
        mov (%rax), %rcx                # its first entry: the PDPT
        and $~0xfff, %rcx
        lea virtio_pd(%rip), %rdx
        mov %rdx, %rsi
        or $3, %rdx                     # present, writable
        mov %rdx, 3*8(%rcx)             # PDPT[3]: 3 GiB .. 4 GiB
        mov $(VIRTIO_BASE | 0x83), %edx # a 2 MiB page: present, writable, PS
        mov %rdx, ((VIRTIO_BASE - 0xc0000000) >> 21)*8(%rsi)
        mov %cr3, %rax
        mov %rax, %cr3                  # flush the TLB
        ret

        .data
        .balign 4096
virtio_pd:
        .fill 4096, 1, 0
