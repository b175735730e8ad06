"""Keep only the GPU code of the named architectures in a shared library's CUDA fat binaries, in place.

TransformerEngine's core library (``libtransformer_engine.so`` of ``transformer_engine_cu13``) is 343 MB, 263 MB
of it fat binaries with machine code for sm_75 to sm_120; one architecture's code is 7% of that. The device
takes 64 MiB a call, so ``te_prep.sh`` prunes the library to sm_90 (the H200) before packing it.

The section ``.nv_fatbin`` holds one container per translation unit: a header (magic 0xBA55ED50, version,
header size, payload size) and entries (kind: 1 PTX, 2 ELF; header size; payload size; the architecture as
an integer at byte 28 of the entry header). Each container keeps its start address (the registration records
in ``.nvFatBinSegment`` point there); its kept entries are moved to its front, its payload size is lowered,
and the bytes after them are zeroed (never read, and they compress to nothing): a container holding only
those architectures' code. A container with no entry for the kept architectures is refused. On the H200 the
pruned library (2.20.2, 89 containers, sm_90 kept) ran every TE test and benchmark of docs/performance.md.

    python3 prune_fatbin.py LIB.so 90 [ARCH ...]
"""

from __future__ import annotations

import mmap
import struct
import sys
from collections import Counter

MAGIC = 0xBA55ED50


def fail(message: str) -> None:
    print(f"prune_fatbin: error: {message}", file=sys.stderr)
    sys.exit(2)


def nv_fatbin_section(buf) -> tuple[int, int]:
    """(offset, size) of ``.nv_fatbin`` in an ELF64 little-endian file."""
    if buf[:4] != b"\x7fELF" or buf[4] != 2 or buf[5] != 1:
        fail("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", buf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", buf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for name, _, _, _, offset, size in headers:
        start = names + name
        if bytes(buf[start:buf.find(b"\0", start)]) == b".nv_fatbin":
            return offset, size
    fail("the file has no .nv_fatbin section")


def prune(path: str, keep: set[int]) -> Counter:
    """Prune ``path`` in place; returns the bytes kept and dropped per (kind, arch)."""
    seen: Counter = Counter()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as buf:
        offset, size = nv_fatbin_section(buf)
        pos, end = offset, offset + size
        while pos < end:
            magic, version, header_size, payload = struct.unpack_from("<IHHQ", buf, pos)
            if magic != MAGIC:  # containers are 8-byte aligned, zero-padded between
                pos += 8
                continue
            entries, q, stop = [], pos + header_size, pos + header_size + payload
            while q < stop:
                kind, _, entry_header, entry_payload = struct.unpack_from("<HHIQ", buf, q)
                arch = struct.unpack_from("<I", buf, q + 28)[0]
                entries.append((q, entry_header + entry_payload, arch in keep))
                seen[(kind, arch, arch in keep)] += entry_header + entry_payload
                q += entry_header + entry_payload
            kept = b"".join(bytes(buf[s:s + n]) for s, n, k in entries if k)
            if not kept:
                fail(f"the container at {pos:#x} has no code for {sorted(keep)}")
            body = pos + header_size
            buf[body:stop] = kept + bytes(stop - body - len(kept))
            struct.pack_into("<Q", buf, pos + 8, len(kept))
            pos = stop
        buf.flush()
    return seen


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not all(a.isdigit() for a in argv[1:]):
        fail("usage: prune_fatbin.py LIB.so ARCH [ARCH ...]   (ARCH as an integer: 90 for sm_90)")
    seen = prune(argv[0], {int(a) for a in argv[1:]})
    for (kind, arch, kept), n in sorted(seen.items()):
        print(f"{'kept' if kept else 'dropped'} {'PTX' if kind == 1 else 'ELF'} sm_{arch}: {n / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
