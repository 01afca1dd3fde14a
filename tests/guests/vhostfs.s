# vhostfs: drives the first virtio-mmio device (a vhost-user-fs share, when it is the only
# device) to DRIVER_OK as a driver would: reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK,
# both queues (8 entries, rings in low RAM), DRIVER_OK. kvmbuild hands the queues to the
# back end at DRIVER_OK, so the whole vhost-user set-up runs inside that one register write.
# Then: if the command line starts with 's' ("stay") it spins, so only the back end or
# --timeout can end it; otherwise it exits with 0 (or 1 if the device asked for a reset).
        .include "common.inc"
        .include "virtio.inc"
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
        mov $2, %ecx
        mov $RINGS, %edi
        call start_device               # the back end is set up at DRIVER_OK
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
