# smp: the BSP prints its APIC ID, wakes vCPU 1 with INIT + SIPI through the xAPIC ICR, and
# waits for it. The AP starts in real mode at the SIPI vector's page, prints its own APIC ID (from
# CPUID, as the BSP did), raises a flag in memory and halts. The BSP then exits with status 0.
#
# Output: "apic 0 (bsp, long mode)", "apic 1 (ap, real mode)", "smp: ap reported".
        .include "common.inc"

        .set TRAMPOLINE, 0x10000        # free low RAM (page tables are at 0x9000-0xbfff)
        .set SIPI_VECTOR, TRAMPOLINE >> 12
        .set LAPIC, 0xfee00000
        .set LAPIC_SVR, 0x0f0
        .set LAPIC_ICR_LOW, 0x300
        .set LAPIC_ICR_HIGH, 0x310
        .set AP_APIC_ID, 1
        .set AP_FLAG, TRAMPOLINE + (ap_flag - trampoline)

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp

        # If kvmbuild ever started another vCPU here instead of leaving it waiting for SIPI,
        # say so: Linux's APs must not run the kernel entry.
        mov $1, %eax
        cpuid
        shr $24, %ebx
        test %ebx, %ebx
        jz 1f
        PRINT "smp: a vCPU with APIC ID "
        mov %ebx, %eax
        add $'0', %al
        call putc
        PRINT " started at the kernel entry\n"
        jmp halt_forever
1:
        PRINT "apic "
        mov %ebx, %eax
        add $'0', %al
        call putc
        PRINT " (bsp, long mode)\n"

        # Copy the real-mode trampoline to TRAMPOLINE (its flag byte comes along, clear).
        lea trampoline(%rip), %rsi
        mov $TRAMPOLINE, %edi
        mov $(trampoline_end - trampoline), %ecx
1:      mov (%rsi), %al
        mov %al, (%rdi)
        inc %rsi
        inc %rdi
        dec %ecx
        jnz 1b

        # The boot page tables map only the first 1 GiB. Map the 2 MiB page holding the local
        # APIC, uncached, through a page directory of our own in PDPT[3] (the 4th GiB).
        mov %cr3, %rax
        mov $0x000ffffffffff000, %rdx
        and %rdx, %rax                  # PML4
        mov (%rax), %rax
        and %rdx, %rax                  # PDPT
        lea apic_pd(%rip), %rcx
        or $0x3, %rcx                   # present, writable
        mov %rcx, 3 * 8(%rax)
        lea apic_pd(%rip), %rcx
        mov $(LAPIC | 0x9b), %eax       # 2 MiB page, PCD, PWT, writable, present
        mov %rax, ((LAPIC >> 21) & 0x1ff) * 8(%rcx)
        mov %cr3, %rax
        mov %rax, %cr3

        mov $LAPIC, %ebx
        movl $0x1ff, LAPIC_SVR(%rbx)    # software-enable the APIC, spurious vector 0xff
        movl $(AP_APIC_ID << 24), LAPIC_ICR_HIGH(%rbx)
        movl $0x00004500, LAPIC_ICR_LOW(%rbx)   # INIT, level assert, physical destination
        movl $(AP_APIC_ID << 24), LAPIC_ICR_HIGH(%rbx)
        movl $(0x00004600 | SIPI_VECTOR), LAPIC_ICR_LOW(%rbx)   # start-up IPI

        mov $AP_FLAG, %ebx
1:      cmpb $0, (%rbx)
        je 1b
        PRINT "smp: ap reported\n"
        EXIT 0

# Copied to TRAMPOLINE and run there by the AP in real mode, with CS = TRAMPOLINE >> 4, IP = 0.
        .code16
trampoline:
        cli
        mov %cs, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x1000, %sp                # a stack at the end of the trampoline's page
        mov $1, %eax
        cpuid
        shr $24, %ebx
        mov $COM1, %dx
        mov $(ap_msg_apic - trampoline), %si
        call ap_puts
        mov %bl, %al
        add $'0', %al
        out %al, %dx
        mov $(ap_msg_mode - trampoline), %si
        call ap_puts
        movb $1, (ap_flag - trampoline)
1:      cli
        hlt
        jmp 1b
ap_puts:
1:      mov (%si), %al
        test %al, %al
        jz 2f
        out %al, %dx
        inc %si
        jmp 1b
2:      ret
ap_msg_apic:
        .asciz "apic "
ap_msg_mode:
        .asciz " (ap, real mode)\n"
ap_flag:
        .byte 0
trampoline_end:
        .code64

        .data
        .balign 4096
apic_pd:
        .fill 4096, 1, 0
