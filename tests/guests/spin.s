# spin: never ends by itself; only --timeout stops it.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "spin: spinning\n"
1:      jmp 1b
