# diskfull: writes 64 KiB requests one after another from the start of the first virtio-blk
# disk until one fails (or WRITES have gone through), then writes the first 64 KiB again,
# which must still work: a host file system that filled up fails the request, not the device.
# Prints each failure's status, then "diskfull: N written, failed with S, rewrite S2" and exits
# with 0 if a write failed with IOERR (1) and the rewrite succeeded, else 1.
        .include "common.inc"
        .include "virtio.inc"

        .set RINGS, 0x300000            # descriptors, avail, used: a page each
        .set HEADER, 0x310000           # struct virtio_blk_outhdr: type, reserved, sector
        .set DATA, 0x320000             # 64 KiB of data
        .set STATUS, 0x340000           # the status byte the device writes
        .set CHUNK, 0x10000
        .set WRITES, 64                 # 4 MiB, more than the test's file system holds
        .set BLK_T_OUT, 1
        .set DESC_F_NEXT, 1
        .set DESC_F_WRITE, 2

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        call map_virtio_window
        mov $VIRTIO_BASE, %ebx
        mov REG_MAGIC(%rbx), %eax
        cmp $0x74726976, %eax           # "virt"
        jne no_device
        mov $1, %ecx
        mov $RINGS, %edi
        call start_device
        mov $DATA, %edi                 # a non-zero pattern, so every block is really written
        mov $(CHUNK / 8), %ecx
        movabs $0x6b6c69666b736964, %rax
        call fill_qwords
        call write_descriptors
        xor %r12d, %r12d                # writes done (and the next chunk's index)
        xor %r15d, %r15d                # requests posted
1:      mov %r12, %rdi
        call write_chunk                # %al: the status
        test %al, %al
        jnz 2f
        inc %r12d
        cmp $WRITES, %r12d
        jb 1b
        PRINT "diskfull: every write went through\n"
        EXIT 1
2:      mov %eax, %r13d                 # the failure's status
        PRINT "diskfull: write "
        HEX %r12, 2
        PRINT " failed with status "
        HEX %r13, 2
        call newline
        xor %edi, %edi
        call write_chunk                # the first chunk again: its blocks exist already
        mov %eax, %r14d
        PRINT "diskfull: rewrite status "
        HEX %r14, 2
        call newline
        cmp $1, %r13b                   # VIRTIO_BLK_S_IOERR
        jne 3f
        test %r14b, %r14b
        jnz 3f
        EXIT 0
3:      EXIT 1
no_device:
        PRINT "diskfull: no virtio device\n"
        EXIT 2

# write_descriptors: header (read), data (read), status (written by the device), chained.
write_descriptors:
        mov $RINGS, %edi
        movq $HEADER, 0(%rdi)
        movl $16, 8(%rdi)
        movw $DESC_F_NEXT, 12(%rdi)
        movw $1, 14(%rdi)
        movq $DATA, 16(%rdi)
        movl $CHUNK, 24(%rdi)
        movw $DESC_F_NEXT, 28(%rdi)
        movw $2, 30(%rdi)
        movq $STATUS, 32(%rdi)
        movl $1, 40(%rdi)
        movw $DESC_F_WRITE, 44(%rdi)
        movw $0, 46(%rdi)
        movl $BLK_T_OUT, HEADER
        movl $0, HEADER+4
        ret

# write_chunk: writes chunk %rdi (64 KiB at sector %rdi * 128) and waits for the device;
# returns its status in %eax. Uses %r15 (requests posted so far).
write_chunk:
        shl $7, %rdi
        mov %rdi, HEADER+8              # the sector
        movb $0xff, STATUS
        mov %r15d, %eax
        and $7, %eax
        movw $0, RINGS+0x1000+4(,%rax,2)        # avail.ring[idx % 8] = descriptor 0
        inc %r15d
        mov %r15w, RINGS+0x1000+2       # avail.idx
        movl $0, REG_QUEUE_NOTIFY(%rbx)
1:      movzwl RINGS+0x2000+2, %eax     # used.idx
        cmp %r15w, %ax
        jne 1b
        movzbl STATUS, %eax
        ret
