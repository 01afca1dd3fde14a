# emufail: jumps into guest-physical space that the page tables map but no memory backs
# (0x30000000 with --mem 64). KVM must fetch the instruction from "MMIO" and cannot: an
# emulation failure, which kvmbuild reports with the guest RIP (exit 70).
        .include "common.inc"
        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "emufail: jumping to unbacked memory\n"
        mov $0x30000000, %rax
        jmp *%rax
