# echo: reads the serial port (COM1) byte by byte and prints each byte back until a newline,
# then exits with the number of bytes it read before the newline (at most 255). It polls the
# line status register, so it needs no interrupt set-up.
        .include "common.inc"

        .set COM1_LSR, COM1 + 5
        .set LSR_DATA_READY, 1

        .section .text.entry64, "ax"
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        PRINT "echo: ready\n"
        xor %ebx, %ebx                  # bytes read
wait_byte:
        mov $COM1_LSR, %dx
        in %dx, %al
        test $LSR_DATA_READY, %al
        jz wait_byte
        mov $COM1, %dx
        in %dx, %al
        cmp $'\n', %al
        je done
        cmp $'\r', %al
        je done
        call putc
        inc %ebx
        jmp wait_byte
done:
        call newline
        mov %bl, %al
        mov $EXIT_PORT, %dx
        out %al, %dx
        jmp halt_forever
