# reboot: resets through the i8042 (command 0xfe pulses the CPU reset line), as reboot=k does.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "reboot: writing 0xfe to the i8042 command port\n"
        mov $0xfe, %al
        out %al, $I8042_COMMAND
        PRINT "reboot: still running\n"
        jmp halt_forever
