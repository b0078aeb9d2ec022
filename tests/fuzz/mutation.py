"""Mutations of real samples for the fuzz tests: a hypothesis strategy that edits a seed.

Edits are the ones that break parsers in practice: a byte overwritten, a little-endian
length or count field set to a boundary value (0, 1, 0x7F.., 0xFF.., 2**32-1), bytes cut,
duplicated or inserted, and the whole sample truncated.  Half of the position draws are
aimed at the first ``head`` bytes, where headers and length fields usually sit.
"""

import struct

from hypothesis import strategies as st

BOUNDARY_U32 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)
BOUNDARY_U16 = (0, 1, 3, 4, 0x7FFF, 0x8000, 0xFFFF)


@st.composite
def mutated(draw, seeds, head: int = 256, max_edits: int = 6) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_edits))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        limit = min(head, len(data)) if draw(st.booleans()) else len(data)
        pos = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(("byte", "u16", "u32", "cut", "dup", "insert")))
        if kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "u16" and pos + 2 <= len(data):
            struct.pack_into("<H", data, pos, draw(st.sampled_from(BOUNDARY_U16)))
        elif kind == "u32" and pos + 4 <= len(data):
            struct.pack_into("<I", data, pos, draw(st.sampled_from(BOUNDARY_U32)))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "dup":
            end = pos + draw(st.integers(1, 32))
            data[pos:pos] = data[pos:end]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)
