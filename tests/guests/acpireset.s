# acpireset: resets through the FADT reset register, as reboot=a does.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "acpireset: writing 1 to the ACPI reset register\n"
        mov $1, %al
        mov $ACPI_RESET, %dx
        out %al, %dx
        PRINT "acpireset: still running\n"
        jmp halt_forever
