"""Where a loaded ELF shared object keeps the addresses of the functions it imports (its GOT slots).

A shared library on Linux calls a function of another library through a pointer in its own global offset table:
the dynamic linker writes the callee's address into that slot (at load time, or at the first call with lazy
binding). ``import_slots`` reads the library's file (ELF64, little-endian: x86_64 and aarch64) and returns, for each
requested symbol, the slot's offset from the library's load base; ``relro_range`` gives the part of the image that
the linker makes read-only after relocation (PT_GNU_RELRO), so a writer knows when it must lift the protection.

Only the file is read here; nothing touches memory (``backend/cpu_blas.py`` does that, with its own checks).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import MachError

EM_X86_64 = 62
EM_AARCH64 = 183
# (JUMP_SLOT, GLOB_DAT) relocation types: a PLT call's slot, or a -fno-plt / address-taken import's slot
_IMPORT_RELOCS = {EM_X86_64: (7, 6), EM_AARCH64: (1026, 1025)}
_SHT_RELA, _SHT_DYNSYM = 4, 11
_PT_GNU_RELRO = 0x6474E552


class ElfError(MachError):
    """The file is not an ELF64 little-endian shared object of a supported machine, or its tables are damaged."""


@dataclass(frozen=True)
class ImportSlot:
    symbol: str
    offset: int  # from the load base (link_map.l_addr)
    reloc_type: int


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ElfError(f"{f.name}: truncated at offset {offset} (wanted {size} bytes)")
    return data


def _header(f):
    ident = _read(f, 0, 64)
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise ElfError(f"{f.name}: not an ELF64 little-endian file")
    machine = struct.unpack_from("<H", ident, 18)[0]
    if machine not in _IMPORT_RELOCS:
        raise ElfError(f"{f.name}: ELF machine {machine} is not supported (x86_64 or aarch64 only)")
    phoff, shoff = struct.unpack_from("<QQ", ident, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", ident, 54)
    return machine, phoff, phentsize, phnum, shoff, shentsize, shnum


def _sections(f, shoff: int, shentsize: int, shnum: int) -> list[tuple]:
    if shentsize != 64 or shnum == 0:
        raise ElfError(f"{f.name}: no usable section headers")
    raw = _read(f, shoff, shentsize * shnum)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    return [struct.unpack_from("<IIQQQQIIQQ", raw, i * shentsize) for i in range(shnum)]


def machine_of(path: str) -> int:
    with open(path, "rb") as f:
        return _header(f)[0]


def import_slots(path: str, symbols) -> dict[str, list[ImportSlot]]:
    """Every GOT slot through which the library at ``path`` reaches each of ``symbols`` (missing: not imported)."""
    wanted = set(symbols)
    found: dict[str, list[ImportSlot]] = {}
    with open(path, "rb") as f:
        machine, _, _, _, shoff, shentsize, shnum = _header(f)
        secs = _sections(f, shoff, shentsize, shnum)
        for rela in secs:
            if rela[1] != _SHT_RELA or rela[9] != 24 or not (0 < rela[6] < len(secs)):
                continue
            symtab = secs[rela[6]]
            if symtab[1] != _SHT_DYNSYM or symtab[9] != 24 or not (0 < symtab[6] < len(secs)):
                continue
            strtab = secs[symtab[6]]
            syms = _read(f, symtab[4], symtab[5])
            strs = _read(f, strtab[4], strtab[5])
            relocs = _read(f, rela[4], rela[5])
            for i in range(rela[5] // 24):
                r_offset, r_info, _ = struct.unpack_from("<QQq", relocs, i * 24)
                sym, rtype = r_info >> 32, r_info & 0xFFFFFFFF
                if sym == 0 or rtype not in _IMPORT_RELOCS[machine] or (sym + 1) * 24 > len(syms):
                    continue
                st_name = struct.unpack_from("<I", syms, sym * 24)[0]
                end = strs.find(b"\0", st_name)
                name = strs[st_name:end].decode("ascii", "replace")
                if name in wanted:
                    found.setdefault(name, []).append(ImportSlot(name, r_offset, rtype))
    return found


def relro_range(path: str) -> tuple[int, int] | None:
    """(start, end) offsets from the load base of the PT_GNU_RELRO segment, or None when there is none."""
    with open(path, "rb") as f:
        _, phoff, phentsize, phnum, _, _, _ = _header(f)
        if phentsize != 56:
            raise ElfError(f"{f.name}: unexpected program header size {phentsize}")
        raw = _read(f, phoff, phentsize * phnum)
    for i in range(phnum):
        p_type, _, _, p_vaddr, _, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", raw, i * phentsize)
        if p_type == _PT_GNU_RELRO:
            return p_vaddr, p_vaddr + p_memsz
    return None
