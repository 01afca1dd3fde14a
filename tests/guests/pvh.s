# pvh: a kernel entered through the PVH boot protocol. It runs 32-bit code with paging off and
# reads the hvm_start_info that ebx points at: it prints what it finds and exits 42.
# Self-contained (common.inc is 64-bit code).
        .set COM1, 0x3f8
        .set EXIT_PORT, 0x6f1
        .set XEN_HVM_START_MAGIC, 0x336ec578
        .set XEN_ELFNOTE_PHYS32_ENTRY, 18
        # hvm_start_info field offsets
        .set SI_NR_MODULES, 12
        .set SI_CMDLINE, 24
        .set SI_MEMMAP_ENTRIES, 48

        .section .note.pvh, "a"
        .balign 4
        .long 4                         # name size ("Xen\0")
        .long 4                         # descriptor size
        .long XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .balign 4
        .long pvh_start

        .section .text, "ax"
        .code32
        .globl pvh_start
pvh_start:
        mov $stack_top, %esp
        mov %ebx, %edi                  # edi = start info
        cmpl $XEN_HVM_START_MAGIC, (%edi)
        jne fail
        mov $msg_magic, %esi
        call puts

        mov %cr0, %eax
        mov $msg_paging_off, %esi
        test $0x80000000, %eax
        jz 1f
        mov $msg_paging_on, %esi
1:      call puts

        mov $msg_cmdline, %esi
        call puts
        mov SI_CMDLINE(%edi), %esi
        call puts
        mov $msg_memmap, %esi
        call puts
        mov SI_MEMMAP_ENTRIES(%edi), %eax
        call putdigit
        mov $msg_modules, %esi
        call puts
        mov SI_NR_MODULES(%edi), %eax
        call putdigit
        mov $'\n', %al
        call putc
        mov $42, %al
        jmp exit

fail:   mov $msg_bad_magic, %esi
        call puts
        mov $1, %al
exit:   mov $EXIT_PORT, %dx
        out %al, %dx
halt:   hlt
        jmp halt

# putc: al to COM1.
putc:   mov $COM1, %dx
        out %al, %dx
        ret
# puts: the NUL-terminated string at esi.
puts:   lodsb
        test %al, %al
        jz 2f
        call putc
        jmp puts
2:      ret
# putdigit: eax (0-9) as one decimal digit.
putdigit:
        add $'0', %al
        jmp putc

        .section .rodata
msg_magic:      .asciz "pvh: start info magic ok\n"
msg_bad_magic:  .asciz "pvh: bad start info magic\n"
msg_paging_off: .asciz "pvh: paging off\n"
msg_paging_on:  .asciz "pvh: paging ON\n"
msg_cmdline:    .asciz "pvh: cmdline: "
msg_memmap:     .asciz "\npvh: memmap entries "
msg_modules:    .asciz ", modules "

        .data
        .balign 16
        .fill 256, 1, 0
stack_top:
