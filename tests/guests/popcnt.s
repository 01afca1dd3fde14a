# popcnt: executes popcnt in ring 0. PVM interprets ring-0 code and does not emulate popcnt, so
# there this is an emulation failure whose report must name the instruction's bytes
# (f3 48 0f b8 d8); on hardware-backed KVM the instruction simply runs and the guest exits 7.
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "popcnt: executing popcnt\n"
        popcnt %rax, %rbx
        EXIT 7
