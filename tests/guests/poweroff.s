# poweroff: powers off through the ACPI sleep control register (S5), as Linux's poweroff does.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "poweroff: writing SLP_TYP=5|SLP_EN to the sleep control register\n"
        mov $((5 << 2) | (1 << 5)), %al
        mov $ACPI_SLEEP_CONTROL, %dx
        out %al, %dx
        PRINT "poweroff: still running\n"
        jmp halt_forever
