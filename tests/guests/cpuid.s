# cpuid: reports the CPUID leaves a kernel picks its timers by, then exits with status 0.
#
# Prints leaf 1 ECX (TSC-deadline is bit 24, hypervisor bit 31), the hypervisor signature
# (leaf 0x40000000 EBX ECX EDX), KVM's paravirtual features (leaf 0x40000001 EAX; bit 3 is
# kvmclock) and the brand string (leaves 0x80000002..4), NULs shown as nothing.
        .include "common.inc"

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp

        PRINT "leaf1 ecx: 0x"
        mov $1, %eax
        xor %ecx, %ecx
        cpuid
        HEX %rcx, 8
        call newline

        PRINT "signature: "
        mov $0x40000000, %eax
        xor %ecx, %ecx
        cpuid
        lea text(%rip), %rdi
        mov %ebx, (%rdi)
        mov %ecx, 4(%rdi)
        mov %edx, 8(%rdi)
        movl $0, 12(%rdi)
        mov %rdi, %rsi
        call puts
        call newline

        PRINT "kvm features: 0x"
        mov $0x40000001, %eax
        xor %ecx, %ecx
        cpuid
        HEX %rax, 8
        call newline

        PRINT "brand: "
        lea text(%rip), %rdi
        mov $0x80000002, %r12d
1:      mov %r12d, %eax
        xor %ecx, %ecx
        cpuid
        mov %eax, (%rdi)
        mov %ebx, 4(%rdi)
        mov %ecx, 8(%rdi)
        mov %edx, 12(%rdi)
        add $16, %rdi
        inc %r12d
        cmp $0x80000005, %r12d
        jne 1b
        movl $0, (%rdi)
        lea text(%rip), %rsi
        call puts
        PRINT "|\n"
        EXIT 0

        .data
text:
        .fill 52, 1, 0
