/* spanguest boot: static page tables, GDT and TSS, the PVH and direct-entry notes, the 32-bit
 * PVH entry (the only CPL0 code, kept short: PVM emulates it one instruction at a time) and the
 * 64-bit CPL3 entry shared by both paths.
 *
 * Included into main.rs with global_asm! (AT&T syntax). */

/* Fixed layout of .tables; linker.ld pins the section at 1 MiB and checks these. */
.set TABLES,      0x100000
.set PML4,        TABLES
.set PDPT,        TABLES + 0x1000
.set PD0,         TABLES + 0x2000
.set NUM_PD,      64                     /* 64 PDs x 1 GiB = 64 GiB identity-mapped */
.set GDT,         PD0 + NUM_PD * 0x1000
.set GDT_LIMIT,   8 * 8 - 1
.set TSS,         GDT + 8 * 8
.set IOMAP_BYTES, 65536 / 8                /* one bit per port */
.set TSS_LIMIT,   104 + IOMAP_BYTES         /* through the bitmap's closing 0xff byte */
.set MAPPED,      NUM_PD << 30
.set TABLE_FLAGS, 0x07                   /* present | writable | user */
.set PAGE2M_FLAGS, 0x87                  /* present | writable | user | 2 MiB page */
.set MAX_CPUS,    8
.set STACK_SIZE,  0x10000
.set SEL_KCODE,   0x08
.set SEL_UDATA,   0x23
.set SEL_UCODE,   0x2b
.set SEL_TSS,     0x30
.set PORT_SLEEP,  0x0ac4

/* ---------------------------------------------------------------- static tables */
.section .tables, "aw", @progbits
.balign 4096
.global spanguest_pml4
spanguest_pml4:
    .quad PDPT | TABLE_FLAGS
    .fill 511, 8, 0

spanguest_pdpt:
    .set pd, 0
    .rept NUM_PD
    .quad (PD0 + pd * 0x1000) | TABLE_FLAGS
    .set pd, pd + 1
    .endr
    .fill 512 - NUM_PD, 8, 0

spanguest_pds:
    .set page, 0
    .rept NUM_PD * 512
    .quad (page << 21) | PAGE2M_FLAGS
    .set page, page + 1
    .endr

.global spanguest_gdt
spanguest_gdt:
    .quad 0                              /* 0x00 null */
    .quad 0x00af9a000000ffff             /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff             /* 0x10 kernel data */
    .quad 0                              /* 0x18 unused */
    .quad 0x00cff2000000ffff             /* 0x20 user data, DPL3 (selector 0x23) */
    .quad 0x00affa000000ffff             /* 0x28 user code, 64-bit, DPL3 (selector 0x2b) */
    /* 0x30 available 64-bit TSS: base and limit split over the descriptor's fields */
    .quad TSS_LIMIT | ((TSS & 0xffffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56)
    .quad TSS >> 32

.global spanguest_tss
spanguest_tss:
    /* No RSP0/IST: nothing ever enters CPL0 again. An I/O permission bitmap allowing every
     * port: PVM emulates CPL3 port I/O only when the TSS bitmap allows it, whatever the IOPL. */
    .fill 102, 1, 0
    .word 104                            /* I/O map base: right after the 104-byte TSS */
    .fill IOMAP_BYTES, 1, 0              /* 0 = allowed */
    .byte 0xff                           /* required terminator */

spanguest_gdt_ptr:
    .word GDT_LIMIT
    .quad GDT

/* ---------------------------------------------------------------- notes */
.section .note.Xen, "a", @note
.balign 4
    .long 4, 4, 18                       /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry

.section .note.spanguest, "a", @note
.balign 4
    .long 10, 8 * 8, 1                   /* namesz, descsz, type 1: direct 64-bit entry */
    .asciz "SPANGUEST"
    .balign 4
    .quad 1                              /* ABI version */
    .quad user_entry
    .quad PML4
    .quad GDT
    .quad GDT_LIMIT
    .quad TSS
    .quad MAPPED
    .quad TSS_LIMIT

/* ---------------------------------------------------------------- code */
.section .text.boot, "ax", @progbits

/* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
.code32
.global pvh_entry
pvh_entry:
    lgdtl   spanguest_gdt_ptr
    movl    %cr4, %eax
    orl     $0x620, %eax                 /* PAE | OSFXSR | OSXMMEXCPT (as the direct entry) */
    movl    %eax, %cr4
    movl    $PML4, %eax
    movl    %eax, %cr3
    movl    $0xc0000080, %ecx            /* EFER */
    rdmsr
    orl     $0x100, %eax                 /* LME */
    wrmsr
    movl    $0x80050033, %eax            /* PG | AM | WP | NE | ET | MP | PE */
    movl    %eax, %cr0
    ljmpl   $SEL_KCODE, $pvh_long

.code64
pvh_long:
    movw    $SEL_TSS, %ax
    ltr     %ax
    movl    $1, SPANGUEST_ENTRY_PVH(%rip)
    movl    %ebx, %edi                   /* hvm_start_info */
    xorl    %esi, %esi                   /* vCPU 0 */
    movl    $1, %edx                     /* of 1 */
    leaq    (spanguest_stacks + STACK_SIZE)(%rip), %rsp
    pushq   $SEL_UDATA                   /* SS */
    pushq   $0                           /* RSP: user_entry picks its own */
    pushq   $0x3002                      /* RFLAGS: IOPL 3, interrupts off */
    pushq   $SEL_UCODE                   /* CS */
    pushq   $user_entry                  /* RIP */
    iretq

/* CPL3, long mode: RDI = hvm_start_info, RSI = vCPU index, RDX = vCPU count. */
.global user_entry
user_entry:
    cmpq    $MAX_CPUS, %rsi
    jae     2f
    leaq    spanguest_stacks(%rip), %rsp
    leaq    1(%rsi), %rax
    shlq    $16, %rax                    /* (index + 1) * STACK_SIZE: top of this vCPU's stack */
    addq    %rax, %rsp
    xorl    %ebp, %ebp
    call    spanguest_main
1:  pause                                /* spanguest_main never returns */
    jmp     1b
2:  /* A vCPU beyond MAX_CPUS: park it (vCPU 0 reports the error). */
    movl    $1000000, %eax
    movw    $PORT_SLEEP, %dx
    outl    %eax, %dx
    jmp     2b

/* ---------------------------------------------------------------- stacks */
.section .bss.spanguest_stacks, "aw", @nobits
.balign 4096
.global spanguest_stacks
spanguest_stacks:
    .skip MAX_CPUS * STACK_SIZE

.text
