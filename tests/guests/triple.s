# triple: loads an IDT with limit 0 and executes ud2. The #UD cannot be delivered (#GP), nor can
# the #GP (#DF), nor the #DF: a triple fault, which shuts the vCPU down.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "triple: loading an empty IDT and executing ud2\n"
        lidt null_idtr(%rip)
        ud2
        PRINT "triple: still running\n"
        jmp halt_forever

        .data
        .balign 8
null_idtr:
        .word 0                         # limit
        .quad 0                         # base
