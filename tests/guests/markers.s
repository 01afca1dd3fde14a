# markers: marks boot phases 1, 2 and 3 on the marker port, then exits with status 0.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        mov $MARKER_PORT, %dx
        mov $1, %al
        out %al, %dx
        PRINT "markers: phase 1\n"
        mov $MARKER_PORT, %dx
        mov $2, %al
        out %al, %dx
        PRINT "markers: phase 2\n"
        mov $MARKER_PORT, %dx
        mov $3, %al
        out %al, %dx
        PRINT "markers: phase 3, exiting with 0\n"
        EXIT 0
