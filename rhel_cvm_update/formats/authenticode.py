"""The Authenticode digest of a PE/COFF image (pe.py parses the headers).

Two Authenticode variants exist and they are NOT interchangeable:

* ``authenticode_digests`` is the digest edk2's ``MeasurePeImageAndExtend``
  (SecurityPkg/Library/DxeTpm2MeasureBootLib/Tcg2MeasurePeImage, Tcg2Dxe's PE_COFF_IMAGE
  path) extends into PCR4.  That is the value to predict.
* ``shim_authenticode_digest`` is shim's ``generate_hash`` (pe.c), used for Secure Boot
  allowlist decisions and the TPM 1.2 path.  It differs from edk2's only for unsigned images
  whose trailing data is not 8-byte aligned (see measured-boot-reference.md, 1.3).

Each variant first makes a ``HashPlan``, the byte ranges of the file in the order they are
hashed, then feeds it.  ``nested_authenticode_digests`` hashes an image and a PE embedded in
it (a UKI and its ``.linux`` kernel) in one pass over the file: the embedded image's ranges
are fed from the same slices while the outer digest reads them.
"""

import dataclasses
import hashlib
import mmap
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats.pe import PEImage, byte_view

HASH_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")
SHIM_HASH_VERSIONS = ("15.6", "15.7", "15.8", "16.0", "16.1")

# Hash in slices of this size so a memory-mapped file can drop the pages already hashed;
# read a file in slices of the smaller size, which stay in the CPU cache while hashed.
_HASH_CHUNK = 4 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
# Below this a thread handoff costs more than the hashing it would move to another core.
_PARALLEL_MIN = 64 * 1024


@dataclasses.dataclass(frozen=True)
class HashPlan:
    """What an Authenticode digest hashes: ``ranges`` ([start, end) file offsets, in hash
    order), then ``padding`` zero bytes."""

    ranges: Tuple[Tuple[int, int], ...]
    padding: int = 0

    def shifted(self, offset: int) -> "HashPlan":
        return HashPlan(tuple((s + offset, e + offset) for s, e in self.ranges), self.padding)


def _check_algorithms(algorithms: Iterable[str]) -> Tuple[str, ...]:
    names = tuple(algorithms)
    unknown = [a for a in names if a not in HASH_ALGORITHMS]
    if unknown or not names:
        raise UnsupportedError(f"hash algorithm(s) {unknown or names!r}; known: {', '.join(HASH_ALGORITHMS)}")
    return names


def _header_ranges(image: PEImage, assume_security_directory: bool) -> List[Tuple[int, int]]:
    # 1. Everything before CheckSum; 2. after CheckSum up to the certificate directory entry,
    # skip its 8 bytes, then the rest of the headers as SizeOfHeaders states them.
    after_checksum = image.checksum_offset + 4
    if image.has_security_directory or assume_security_directory:
        dd = image.security_directory_offset
        return [(0, image.checksum_offset), (after_checksum, dd), (dd + 8, image.size_of_headers)]
    return [(0, image.checksum_offset), (after_checksum, image.size_of_headers)]


def _section_ranges(image: PEImage) -> Tuple[List[Tuple[int, int]], int]:
    """The sections' file data in hash order (by PointerToRawData; Python's sort is stable,
    like edk2's insertion sort, so ties keep their table order; SizeOfRawData 0 skipped),
    and ``sum``: SizeOfHeaders plus every hashed SizeOfRawData."""
    ranges = [(s.pointer_to_raw_data, s.pointer_to_raw_data + s.size_of_raw_data)
              for s in sorted(image.sections, key=lambda s: s.pointer_to_raw_data) if s.size_of_raw_data]
    return ranges, image.size_of_headers + sum(end - start for start, end in ranges)


def edk2_plan(image: PEImage, size: int, source: str) -> HashPlan:
    """The ranges edk2's MeasurePeImageAndExtend hashes:

    - sections sorted by PointerToRawData (stable), SizeOfRawData == 0 skipped, VirtualSize
      never used, overlapping sections hashed twice;
    - ``sum`` = SizeOfHeaders + the SizeOfRawData of every hashed section, used as the file
      offset where trailing data starts even when there are gaps or overlaps;
    - trailing data ``[sum, filesize - CertificateTable.Size)`` hashed without padding;
      only the certificate table's Size matters, its offset is ignored;
    - edk2 refuses to measure when filesize < sum + CertificateTable.Size.
    """
    sections, hashed_sum = _section_ranges(image)
    ranges = _header_ranges(image, assume_security_directory=False) + sections
    if size > hashed_sum:
        cert_size = image.certificate_table[1]
        if size > hashed_sum + cert_size:
            ranges.append((hashed_sum, size - cert_size))
        elif size < hashed_sum + cert_size:
            raise FormatError(f"headers + sections ({hashed_sum:#x} bytes) + certificate table "
                              f"({cert_size:#x}) exceed the {size}-byte file; edk2 refuses to "
                              f"measure it", source=source, offset=hashed_sum,
                              field="DataDirectory[SECURITY]")
    return HashPlan(tuple(ranges))


def shim_plan(image: PEImage, size: int, shim_version: str, source: str) -> HashPlan:
    """The ranges of shim's ``generate_hash``.  Differences from edk2: a signed image must
    have its certificate table exactly at ``sum + trailing`` (else shim errors); unsigned
    trailing data is not hashed at all up to 16.0, and hashed then zero-padded to a multiple
    of 8 from 16.1 (shim commit fb77b445)."""
    if not image.has_security_directory:
        # shim's read_header points SecDir at DataDirectory[4] regardless; with fewer
        # directories that is section-table data.  Not a layout worth predicting.
        raise UnsupportedError(f"{source}: image has no security directory; shim's hash of it "
                               f"is not modelled")
    section_bytes_total = 0
    for s in image.sections:
        if s.size_of_raw_data > size - image.size_of_headers - section_bytes_total:
            raise FormatError("headers + sections exceed the file (shim: 'Malformed section size')",
                              source=source, offset=s.header_offset + 16, field="SizeOfRawData")
        section_bytes_total += s.size_of_raw_data
    sections, hashed_sum = _section_ranges(image)
    ranges = _header_ranges(image, assume_security_directory=True) + sections
    cert_offset, cert_size = image.certificate_table
    if size > hashed_sum and cert_size:
        trailing = size - cert_size - hashed_sum
        if size - hashed_sum < cert_size or hashed_sum + trailing != cert_offset:
            raise FormatError("data between the sections and the certificate table does not end "
                              "where the table starts (shim: 'Malformed binary after Attribute "
                              "Certificate Table')", source=source, offset=hashed_sum,
                              field="DataDirectory[SECURITY]")
        ranges.append((hashed_sum, hashed_sum + trailing))
        hashed_sum += trailing
    padding = 0
    if size > hashed_sum + cert_size and shim_version == "16.1":
        ranges.append((hashed_sum, size))
        padding = -size % 8
    return HashPlan(tuple(ranges), padding)


class _Hashes:
    """The hash objects of one plan."""

    def __init__(self, algorithms: Sequence[str]):
        self.objects = {name: hashlib.new(name) for name in algorithms}
        self.updates = [h.update for h in self.objects.values()]

    def update(self, data) -> None:
        for update in self.updates:
            update(data)

    def digests(self, padding: int) -> Dict[str, bytes]:
        if padding:
            self.update(bytes(padding))
        return {name: h.digest() for name, h in self.objects.items()}


class _Follower:
    """A plan fed from the slices another plan's pass reads, while they arrive in its order."""

    def __init__(self, plan: HashPlan, algorithms: Sequence[str]):
        self.plan, self.hashes = plan, _Hashes(algorithms)
        self.index = 0
        self.pos = plan.ranges[0][0] if plan.ranges else 0
        self.missed = False

    @property
    def done(self) -> bool:
        return not self.missed and self.index == len(self.plan.ranges)

    def take(self, piece: memoryview, start: int) -> List[memoryview]:
        """The file's bytes [start, start + len(piece)) pass by: the parts of them this plan
        hashes next, in order (the caller hashes them)."""
        ranges, end, parts = self.plan.ranges, start + len(piece), []
        while not self.missed and self.index < len(ranges) and self.pos < end:
            if self.pos < start:
                # Its next byte went by already (or comes later, out of order): give up
                # following; it is hashed on its own afterwards.
                self.missed = True
                return []
            range_end = ranges[self.index][1]
            take = min(range_end, end)
            parts.append(piece[self.pos - start:take - start])
            self.pos = take
            if take == range_end:
                self.index += 1
                self.pos = ranges[self.index][0] if self.index < len(ranges) else 0
        return parts


_Work = Tuple[Callable[[memoryview], None], List[memoryview]]


class _Workers:
    """Threads that run hash updates beside the caller, one group of updates each: hashlib
    releases the GIL while it hashes a large buffer, so the banks of one digest (and an
    embedded image's digest) are computed on several cores at once."""

    def __init__(self, count: int):
        import threading

        self.groups: List[List[_Work]] = [[] for _ in range(count)]
        self.start = [threading.Semaphore(0) for _ in range(count)]
        self.finished = threading.Semaphore(0)
        self.errors: List[BaseException] = []
        self.stopping = False
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _work(self, index: int) -> None:
        while True:
            self.start[index].acquire()
            if self.stopping:
                return
            try:
                for update, parts in self.groups[index]:
                    for part in parts:
                        update(part)
            except BaseException as e:  # handed to the caller's thread
                self.errors.append(e)
            finally:
                self.finished.release()

    def run(self, work: List["_Work"]) -> None:
        """Run every item (one hash object's update and the parts it hashes, in order),
        dealt round-robin to this thread and the threads beside it."""
        share = min(len(work), len(self.threads) + 1)
        busy = self.threads[:share - 1]
        for index in range(len(busy)):
            self.groups[index] = work[1 + index::share]
            self.start[index].release()
        for update, parts in work[0::share]:
            for part in parts:
                update(part)
        for _ in busy:
            self.finished.acquire()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self.stopping = True
        for semaphore in self.start:
            semaphore.release()
        for thread in self.threads:
            thread.join()


def _pieces(view: memoryview, plan: HashPlan, mapping) -> Iterator[Tuple[int, memoryview]]:
    """(file offset, bytes) of ``plan``'s ranges in order, in slices of at most _HASH_CHUNK.

    A file mapping that carries its open ``fd`` (mapped.MappedFile) is read with pread into
    one reused buffer: the slice stays in the CPU cache and no page of the mapping is
    touched.  Other buffers are sliced; for a plain ``mmap`` the pages already hashed are
    dropped (MADV_DONTNEED; read-only and file-backed, so a later touch faults them back
    in), so peak RSS stays near one slice instead of growing to the file size."""
    fd = getattr(mapping, "fd", None)
    if fd is not None:
        buffer = memoryview(bytearray(_READ_CHUNK))
        for start, end in plan.ranges:
            pos = start
            while pos < end:
                n = os.preadv(fd, [buffer[:min(_READ_CHUNK, end - pos)]], pos)
                if n <= 0:
                    raise FormatError("the file shrank while it was hashed", offset=pos, field="file size")
                yield pos, buffer[:n]
                pos += n
        return
    drop = mapping if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") else None
    for start, end in plan.ranges:
        for chunk_start in range(start, end, _HASH_CHUNK):
            chunk_end = min(chunk_start + _HASH_CHUNK, end)
            yield chunk_start, view[chunk_start:chunk_end]
            if drop is not None:
                page_start = chunk_start - chunk_start % mmap.PAGESIZE
                drop.madvise(mmap.MADV_DONTNEED, page_start, chunk_end - page_start)


def _feed(view: memoryview, plan: HashPlan, hashes: _Hashes, mapping, followers: Sequence[_Follower] = ()) -> None:
    # Threads are started at the first slice worth sharing: a small file (or one bank of a
    # plain image) is hashed in this thread alone.
    updaters = len(hashes.updates) + sum(len(f.hashes.updates) for f in followers)
    threads = min(updaters, os.cpu_count() or 1) - 1
    workers: Optional[_Workers] = None
    try:
        for start, piece in _pieces(view, plan, mapping):
            # One item per hash object, its parts in order: an object is never updated from
            # two threads, nor out of order.
            work = [(update, [piece]) for update in hashes.updates]
            for follower in followers:
                parts = follower.take(piece, start)
                if parts:
                    work.extend((update, parts) for update in follower.hashes.updates)
            if threads < 1 or len(work) == 1 or len(piece) < _PARALLEL_MIN:
                for update, parts in work:
                    for part in parts:
                        update(part)
            else:
                workers = workers or _Workers(threads)
                workers.run(work)
    finally:
        if workers is not None:
            workers.close()


def digests_of_plan(buf, plan: HashPlan, algorithms: Sequence[str]) -> Dict[str, bytes]:
    view = byte_view(buf)
    hashes = _Hashes(_check_algorithms(algorithms))
    _feed(view, plan, hashes, buf)
    return hashes.digests(plan.padding)


def authenticode_digests(buf, algorithms: Iterable[str] = ("sha256",), source: str = "<bytes>",
                         image: Optional[PEImage] = None) -> Dict[str, bytes]:
    """The PE/COFF image digest exactly as edk2's MeasurePeImageAndExtend computes it."""
    names = _check_algorithms(algorithms)
    view = byte_view(buf)
    image = image if image is not None else PEImage.parse(view, source)
    return digests_of_plan(buf, edk2_plan(image, len(view), source), names)


def authenticode_digest(buf, algorithm: str = "sha256", source: str = "<bytes>") -> bytes:
    return authenticode_digests(buf, (algorithm,), source=source)[algorithm]


def signature_digest(buf, source: str = "<bytes>", image: Optional[PEImage] = None) -> str:
    """sha256 (hex) of the attribute certificate table, "" for an unsigned image.  The
    Authenticode digest leaves the signatures out, so a re-signed file keeps its PCR4 event;
    PCR7 sees them, through the db entry each verification is granted by."""
    view = byte_view(buf)
    image = image if image is not None else PEImage.parse(view, source)
    offset, size = image.certificate_table
    return hashlib.sha256(view[offset:offset + size]).hexdigest() if size else ""


def nested_authenticode_digests(buf, image: PEImage, inner: Tuple[int, int], algorithms: Iterable[str],
                                source: str, inner_source: str) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
    """edk2's digest of the image in ``buf`` and of the PE at ``buf[inner[0]:inner[1]]``
    (a UKI's ``.linux``), reading the file once where the inner ranges come in file order."""
    names = _check_algorithms(algorithms)
    view = byte_view(buf)
    start, end = inner
    outer_plan = edk2_plan(image, len(view), source)
    inner_view = view[start:end]
    inner_plan = edk2_plan(PEImage.parse(inner_view, inner_source), end - start, inner_source)
    outer = _Hashes(names)
    follower = _Follower(inner_plan.shifted(start), names)
    _feed(view, outer_plan, outer, buf, [follower])
    inner_digests = (follower.hashes.digests(inner_plan.padding) if follower.done
                     else digests_of_plan(inner_view, inner_plan, names))
    return outer.digests(outer_plan.padding), inner_digests


def shim_authenticode_digest(buf, algorithm: str = "sha256", shim_version: str = "16.1",
                             source: str = "<bytes>") -> bytes:
    """shim's own ``generate_hash`` (pe.c) -- NOT the value in PCR4 (see ``shim_plan``)."""
    if shim_version not in SHIM_HASH_VERSIONS:
        raise UnsupportedError(f"shim {shim_version!r}: generate_hash is modelled for "
                               f"{', '.join(SHIM_HASH_VERSIONS)}")
    names = _check_algorithms((algorithm,))
    view = byte_view(buf)
    image = PEImage.parse(view, source)
    return digests_of_plan(buf, shim_plan(image, len(view), shim_version, source), names)[algorithm]
