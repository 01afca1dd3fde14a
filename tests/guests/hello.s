# hello: reports what kvmbuild handed it, then exits with status 42.
#
# Prints the zero page's address, the segment selectors, whether interrupts are off and the CPU
# is in long mode, the command line, every e820 entry, the initrd (address, size, first bytes)
# and the ACPI RSDP (address and signature); checks that the top of the highest RAM range below
# 1 GiB can be written and read back.
        .include "common.inc"

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        mov %rsi, %r15                  # struct boot_params *

        PRINT "hello: started\n"
        PRINT "boot_params: 0x"
        HEX %r15, 16
        call newline

        PRINT "cs: 0x"
        mov %cs, %ax
        movzwl %ax, %eax
        HEX %rax, 4
        PRINT " ds: 0x"
        mov %ds, %ax
        movzwl %ax, %eax
        HEX %rax, 4
        PRINT " ss: 0x"
        mov %ss, %ax
        movzwl %ax, %eax
        HEX %rax, 4
        call newline

        pushf
        pop %rax
        bt $9, %rax                     # RFLAGS.IF
        jc 1f
        PRINT "interrupts: off\n"
        jmp 2f
1:      PRINT "interrupts: on\n"
2:
        mov $0xc0000080, %ecx           # IA32_EFER
        rdmsr
        bt $10, %eax                    # EFER.LMA
        jnc 1f
        PRINT "long mode: yes\n"
        jmp 2f
1:      PRINT "long mode: no\n"
2:
        PRINT "cmdline: "
        mov BP_CMD_LINE_PTR(%r15), %esi
        test %esi, %esi
        jz 1f
        call puts
        jmp 2f
1:      PRINT "(no cmd_line_ptr)"
2:      call newline

        # e820: "e820: addr=0x... size=0x... type=0000000N ram|other"
        movzbl BP_E820_ENTRIES(%r15), %r12d
        PRINT "e820 entries: 0x"
        HEX %r12, 2
        call newline
        lea BP_E820_TABLE(%r15), %r13
        xor %r14d, %r14d                # end of the highest RAM range below 1 GiB
e820_loop:
        test %r12d, %r12d
        jz e820_done
        PRINT "e820: addr=0x"
        HEX 0(%r13), 16
        PRINT " size=0x"
        HEX 8(%r13), 16
        PRINT " type="
        mov 16(%r13), %eax
        HEX %rax, 8
        cmpl $1, 16(%r13)
        jne 1f
        PRINT " ram\n"
        mov 0(%r13), %rax
        add 8(%r13), %rax
        cmp $0x40000000, %rax
        ja 2f
        cmp %r14, %rax
        jbe 2f
        mov %rax, %r14
        jmp 2f
1:      PRINT " other\n"
2:      add $20, %r13
        dec %r12d
        jmp e820_loop
e820_done:
        PRINT "ram top: 0x"
        HEX %r14, 16
        test %r14, %r14
        jz 1f
        mov $0x5a5aa5a5c3c33c3c, %rax
        mov %rax, -8(%r14)
        cmp -8(%r14), %rax
        jne 1f
        PRINT " writable\n"
        jmp 2f
1:      PRINT " not writable\n"
2:
        mov BP_RAMDISK_SIZE(%r15), %r12d
        test %r12d, %r12d
        jnz 1f
        PRINT "initrd: none\n"
        jmp initrd_done
1:      mov BP_RAMDISK_IMAGE(%r15), %r13d
        PRINT "initrd: addr=0x"
        HEX %r13, 8
        PRINT " size=0x"
        HEX %r12, 8
        PRINT " data="
        cmp $16, %r12d                  # print at most 16 bytes
        jbe 1f
        mov $16, %r12d
1:      mov (%r13), %al
        cmp $0x20, %al                  # non-printable bytes as '.'
        jb 2f
        cmp $0x7e, %al
        jbe 3f
2:      mov $'.', %al
3:      call putc
        inc %r13
        dec %r12d
        jnz 1b
        call newline
initrd_done:
        mov BP_ACPI_RSDP_ADDR(%r15), %r12
        PRINT "rsdp: 0x"
        HEX %r12, 16
        test %r12, %r12
        jz 1f
        cmp $0x40000000, %r12
        jae 1f
        mov $0x2052545020445352, %rax   # "RSD PTR "
        cmp (%r12), %rax
        jne 1f
        PRINT " signature ok\n"
        jmp 2f
1:      PRINT " signature missing\n"
2:
        PRINT "hello: exiting with 42\n"
        EXIT 42
