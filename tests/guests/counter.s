# counter: counts to 10 in a register (r12) and in memory (`count`), writing kvmbuild's
# snapshot port at 5, then exits with r12 + count (20). A run restored from the snapshot goes
# on from 5 without passing `_start` again: it prints no "start", and exits with 20 only if
# both the register and the memory were restored (15 without the memory, 25 without r12).
        .include "common.inc"
        .set SNAPSHOT_PORT, 0x6f2       # the snapshot point
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "counter: start\n"
        xor %r12, %r12
        movq $0, count(%rip)
1:      inc %r12
        incq count(%rip)
        cmp $5, %r12
        jne 2f
        mov $SNAPSHOT_PORT, %dx
        out %al, %dx
        PRINT "counter: after the snapshot point\n"
2:      cmp $10, %r12
        jne 1b
        mov count(%rip), %rax
        add %r12, %rax
        mov $EXIT_PORT, %dx
        out %al, %dx
        jmp halt_forever

        .data
        .balign 8
count:  .quad 0
