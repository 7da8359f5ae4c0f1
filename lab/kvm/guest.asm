; The lab's guest: a 512-byte boot sector that makes a TCG machine behave like a busy VM.
;
; It enters 32-bit protected mode, fills RAM from 1 MiB to MEM_TOP with non-zero data (an empty
; guest is all zero pages and migrates instantly with nothing to show), then programs the PIT at
; ~1 kHz. Each tick increments a counter at guest-physical TICK_ADDR (read from outside with
; virDomainMemoryPeek to prove the guest keeps running across a migration) and dirties the next
; PAGES_PER_TICK pages of a working set of WS_BYTES, cycling through it. A small working set
; converges quickly; a large one dirtied faster than a throttled link never converges.
;
; Build: nasm -f bin -DMEM_TOP=... -DWS_BYTES=... -DPAGES_PER_TICK=... -o guest.bin guest.asm

%ifndef MEM_TOP
%define MEM_TOP 0x3C00000          ; 60 MiB: leave the top of a 64 MiB guest to the firmware tables
%endif
%ifndef WS_BYTES
%define WS_BYTES 0x100000          ; 1 MiB working set
%endif
%ifndef PAGES_PER_TICK
%define PAGES_PER_TICK 4
%endif
%define TICK_ADDR 0x10000          ; tick counter (lab.sh and the tests read it here)
%define CURSOR    0x10004          ; next working-set page to dirty
%define IDT_BASE  0x11000          ; 256 gates built at run time (no room for them in 512 bytes)
%define WS_BASE   0x1000000        ; working set starts at 16 MiB, inside the filled area
%define PIT_DIVISOR 1193           ; 1193182 Hz / 1193 = ~1000 Hz

bits 16
org 0x7c00
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    in al, 0x92                     ; fast A20, or every odd MiB aliases the even one below
    or al, 2
    and al, 0xfe
    out 0x92, al
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:protected

bits 32
protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, 0x90000

    cld                             ; fill RAM with a non-zero pattern
    mov edi, 0x100000
    mov ecx, (MEM_TOP - 0x100000) / 4
    mov eax, 0xa5c3e1f7
    rep stosd

    mov edi, IDT_BASE               ; every vector -> ignore, vector 0x20 (IRQ0) -> tick
    mov ecx, 256
.gate:
    mov dword [edi], 0x00080000 + ignore
    mov dword [edi + 4], 0x00008e00
    add edi, 8
    loop .gate
    mov dword [IDT_BASE + 0x20 * 8], 0x00080000 + tick
    lidt [idt_desc]

    mov al, 0x11                    ; remap the PICs to 0x20/0x28, unmask IRQ0 only
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xa1, al
    mov al, 1
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al

    mov al, 0x34                    ; PIT channel 0, rate generator
    out 0x43, al
    mov ax, PIT_DIVISOR
    out 0x40, al
    mov al, ah
    out 0x40, al

    mov dword [TICK_ADDR], 0
    mov dword [CURSOR], WS_BASE
    sti
.idle:
    hlt
    jmp .idle

tick:
    pushad
    inc dword [TICK_ADDR]
    mov eax, [TICK_ADDR]
    mov edi, [CURSOR]
    mov ecx, PAGES_PER_TICK
.dirty:
    mov [edi], eax
    add edi, 4096
    cmp edi, WS_BASE + WS_BYTES
    jb .next
    mov edi, WS_BASE
.next:
    loop .dirty
    mov [CURSOR], edi
    mov al, 0x20                    ; end of interrupt
    out 0x20, al
    popad
ignore:
    iret

gdt:
    dq 0
    dq 0x00cf9a000000ffff           ; 0x08: flat 4 GiB code
    dq 0x00cf92000000ffff           ; 0x10: flat 4 GiB data
gdt_desc:
    dw gdt_desc - gdt - 1
    dd gdt
idt_desc:
    dw 256 * 8 - 1
    dd IDT_BASE

    times 510 - ($ - $$) db 0
    dw 0xaa55
