/* Multiboot (v1) entry for the microguest: QEMU's -kernel loader jumps here in
 * 32-bit protected mode with paging off, EAX = magic, EBX = multiboot info. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, provide memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text
    .global _start
_start:
    cli
    mov $stack_top, %esp
    push %ebx
    push %eax
    call guest_main
1:  hlt
    jmp 1b

    .section .bss
    .align 16
    .skip 65536
stack_top:
    .section .note.GNU-stack, "", @progbits
