"""Inputs of the signer-change boots (capture.py scenarios with a ``Signing``): test CAs, shims
whose Authenticode certificate table holds a chosen list of signatures, a shim with a newer
``.sbatlevel``, and the OVMF variables those boots start from.

Microsoft's signatures are the real ones on Debian's shim (signature 1 chains to the Microsoft
UEFI CA 2011, signature 2 to the Microsoft UEFI CA 2023, as ``sbverify --list`` shows); the
tables here only select and reorder them.  Our own signatures come from ``sbsign`` with leaf
keys issued by test CAs: two are put into db, one into MokList (the MOK), so the firmware and
shim verify real chains.
Nothing here uses rhel_cvm_update: the fixtures must stay outside the code under test.
"""

import json
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tests import realbins

MICROSOFT_OWNER_GUID = "77fa9abd-0359-4d32-bd60-28f4e78f784b"
SHIM_LOCK_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"
EFI_CERT_X509_GUID = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072"
TEST_CA_OWNER_GUIDS = {"ca1": "7f3c6f4a-2d1e-4b8a-9e5c-1a2b3c4d5e6f",   # = capture.DB_CERT_OWNER_GUID
                       "ca2": "7f3c6f4a-2d1e-4b8a-9e5c-1a2b3c4d5e70",
                       "mok": SHIM_LOCK_GUID}                      # the owner mokutil gives MOKs
TEST_CA_NAMES = {"ca1": "rhel-cvm-update Test UEFI CA 2011", "ca2": "rhel-cvm-update Test UEFI CA 2023",
                 "mok": "rhel-cvm-update Test MOK CA"}
DB_CAS = ("ca1", "ca2")  # "mok" goes into MokList, never into db
TEST_CA_SERIALS = {"ca1": 0x1001, "ca2": 0x1002, "mok": 0x1003}
# Signature slots of Debian's shimx64.efi.signed, in its certificate table.
DEBIAN_SHIM_SIGNATURES = {"ms-2011": 0, "ms-2023": 1}
DEBIAN_SHIM_ISSUERS = {"ms-2011": "Microsoft Corporation UEFI CA 2011", "ms-2023": "Microsoft UEFI CA 2023"}
IMAGE_DIRECTORY_ENTRY_SECURITY = 4
# The test CAs and their leaf keys, committed so that re-capturing the chain reproduces PCR7 and
# tests can re-sign shim and UKI as the captured files were.  TEST KEYS: nothing may trust them.
TEST_CAS_DIR = realbins.REPO_ROOT / "tests" / "data" / "boots" / "sb2-test-cas"


@dataclass(frozen=True)
class Signing:
    """How a signer-change boot differs from a plain Secure Boot one."""

    shim_signatures: Tuple[str, ...]  # table order: "ms-2011"/"ms-2023" (Debian's) or "ca1"/"ca2" (our leaf)
    uki_signer: str                   # "ca1", "ca2" (db) or "mok" (MokList)
    after: Optional[str] = None       # start from the OVMF variables this scenario left behind
    sbat_date: Optional[str] = None   # rewrite the datestamp of both .sbatlevel strings to this one
    dbx_certs: Tuple[str, ...] = ()   # "ms-2011": add the Microsoft UEFI CA 2011 to dbx first
    mok_certs: Tuple[str, ...] = ()   # "mok": enroll that test CA in MokList first (as MokManager does)


class SigningError(RuntimeError):
    pass


@dataclass(frozen=True)
class TestCa:
    ca_cert: Path
    leaf_key: Path
    leaf_cert: Path

    @classmethod
    def in_directory(cls, directory: Path, tag: str) -> "TestCa":
        return cls(directory / (tag + ".crt"), directory / (tag + "-signer.key"), directory / (tag + "-signer.crt"))


def microsoft_cert(name: str) -> Path:
    """A Microsoft certificate as virt-firmware ships it (ms-uefi-2011.pem, ms-uefi-2023.pem)."""
    import virt.firmware

    path = Path(virt.firmware.__file__).parent / "certs" / "microsoft.com" / name
    if not path.exists():
        raise SigningError("virt-firmware does not ship %s" % path)
    return path


def load_test_cas(directory: Path = TEST_CAS_DIR) -> Dict[str, TestCa]:
    """The committed test CAs (see make_test_cas)."""
    cas = {tag: TestCa.in_directory(directory, tag) for tag in sorted(TEST_CA_NAMES)}
    missing = [str(p) for ca in cas.values() for p in (ca.ca_cert, ca.leaf_key, ca.leaf_cert) if not p.exists()]
    if missing:
        raise SigningError("test CA files missing: " + ", ".join(missing))
    return cas


def make_test_cas(directory: Path, tags: Sequence[str] = tuple(TEST_CA_NAMES)) -> Dict[str, TestCa]:
    """A self-signed CA per tag (ca1/ca2 go into db, mok into MokList) and a code-signing
    leaf it issued."""
    directory.mkdir(parents=True, exist_ok=True)
    cas = {}
    for tag in tags:
        name, serial = TEST_CA_NAMES[tag], TEST_CA_SERIALS[tag]
        ca = TestCa.in_directory(directory, tag)
        ca_key, ca_cert, leaf_key, leaf_cert = directory / (tag + ".key"), ca.ca_cert, ca.leaf_key, ca.leaf_cert
        leaf_csr, extensions = directory / (tag + "-signer.csr"), directory / (tag + "-signer.ext")
        realbins.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
                      "-subj", "/CN=" + name, "-keyout", str(ca_key), "-out", str(ca_cert),
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        realbins.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s signer" % name,
                      "-keyout", str(leaf_key), "-out", str(leaf_csr)])
        extensions.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                              "extendedKeyUsage=codeSigning\n")
        realbins.run(["openssl", "x509", "-req", "-in", str(leaf_csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                      "-set_serial", str(serial), "-days", "3650", "-sha256",
                      "-extfile", str(extensions), "-out", str(leaf_cert)])
        leaf_csr.unlink()
        extensions.unlink()
        cas[tag] = ca
    return cas


# ---------------------------------------------------------------------------------------------
# the certificate table (PE/COFF 4.0 "The Attribute Certificate Table")


def _security_directory(data: bytes) -> int:
    """File offset of the IMAGE_DIRECTORY_ENTRY_SECURITY (VirtualAddress, Size) pair."""
    (lfanew,) = struct.unpack_from("<I", data, 0x3C)
    if data[lfanew:lfanew + 4] != b"PE\0\0":
        raise SigningError("not a PE image")
    optional = lfanew + 24
    (magic,) = struct.unpack_from("<H", data, optional)
    if magic != 0x20B:
        raise SigningError("not a PE32+ image")
    return optional + 112 + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY


def signature_entries(data: bytes) -> List[bytes]:
    """The WIN_CERTIFICATE entries (header included, without the 8-byte alignment padding)."""
    offset, size = struct.unpack_from("<II", data, _security_directory(data))
    if offset + size != len(data):
        raise SigningError("the certificate table is not at the end of the file")
    entries, position = [], offset
    while position < offset + size:
        (length,) = struct.unpack_from("<I", data, position)
        entries.append(data[position:position + length])
        position += (length + 7) & ~7
    return entries


def with_signature_entries(data: bytes, entries: Sequence[bytes]) -> bytes:
    """The image with its certificate table replaced by ``entries`` (none: unsigned)."""
    directory = _security_directory(data)
    offset, size = struct.unpack_from("<II", data, directory)
    body = bytearray(data[:offset] if size else data)
    if len(body) % 8:
        raise SigningError("the image does not end on an 8-byte boundary")
    table = b"".join(e + b"\0" * (-len(e) % 8) for e in entries)
    struct.pack_into("<II", body, directory, len(body) if entries else 0, len(table))
    return bytes(body) + table


def rewrite_sbatlevel_date(data: bytes, section: Tuple[int, int], new_date: str) -> bytes:
    """Both .sbatlevel strings ("sbat,1,YYYYMMDDNN\\n...") with ``new_date`` as their
    datestamp, in place: lengths and the section header stay as they were."""
    start, length = section
    level = bytearray(data[start:start + length])
    marker = b"sbat,1,"
    found = 0
    position = level.find(marker)
    while position >= 0:
        date_at = position + len(marker)
        if not level[date_at:date_at + len(new_date)].isdigit():
            raise SigningError(".sbatlevel has an unexpected datestamp at +%d" % date_at)
        level[date_at:date_at + len(new_date)] = new_date.encode()
        found += 1
        position = level.find(marker, date_at)
    if found != 2:
        raise SigningError(".sbatlevel holds %d level strings, expected previous and latest" % found)
    return data[:start] + bytes(level) + data[start + length:]


def section_file_range(pe: Path, name: str) -> Tuple[int, int]:
    """(file offset, size) of a section as ``objdump -h`` reports it: shim's ".sbatlevel" is
    longer than 8 characters, so its name lives in the COFF string table."""
    for line in realbins.run(["objdump", "-h", str(pe)]).stdout.decode().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == name:
            return int(fields[5], 16), int(fields[2], 16)
    raise SigningError("%s has no %s section" % (pe, name))


def build_shim(debian_shim: Path, plan: Signing, cas: Dict[str, TestCa], out: Path) -> Path:
    """Debian's signed shim with the table ``plan.shim_signatures`` (and a newer
    .sbatlevel, which voids Microsoft's signatures: only ours can sign that one)."""
    original = debian_shim.read_bytes()
    microsoft = signature_entries(original)
    issuers = listed_issuers(debian_shim)
    for tag, index in DEBIAN_SHIM_SIGNATURES.items():
        if DEBIAN_SHIM_ISSUERS[tag] not in issuers[index]:
            raise SigningError("%s signature %d is not by the %s: %s"
                               % (debian_shim, index + 1, DEBIAN_SHIM_ISSUERS[tag], issuers[index]))
    unsigned = with_signature_entries(original, [])
    if plan.sbat_date:
        if any(t in DEBIAN_SHIM_SIGNATURES for t in plan.shim_signatures):
            raise SigningError("a shim with a rewritten .sbatlevel cannot keep Microsoft's signatures")
        unsigned = rewrite_sbatlevel_date(unsigned, section_file_range(debian_shim, ".sbatlevel"), plan.sbat_date)
    stripped = out.with_suffix(".unsigned.efi")
    stripped.write_bytes(unsigned)
    entries = []
    for tag in plan.shim_signatures:
        if tag in DEBIAN_SHIM_SIGNATURES:
            entries.append(microsoft[DEBIAN_SHIM_SIGNATURES[tag]])
        else:
            signed = realbins.sign(stripped, cas[tag].leaf_key, cas[tag].leaf_cert, out.with_suffix("." + tag + ".efi"))
            (entry,) = signature_entries(signed.read_bytes())
            entries.append(entry)
    out.write_bytes(with_signature_entries(unsigned, entries))
    return out


def listed_issuers(pe: Path) -> List[str]:
    """Per signature (table order), the issuers ``sbverify --list`` prints for it."""
    text = realbins.run(["sbverify", "--list", str(pe)]).stdout.decode()
    signatures: List[str] = []
    for line in text.splitlines():
        if line.startswith("signature "):
            signatures.append("")
        elif line.startswith(" - ") and signatures and "subject:" not in line and "issuer:" not in line:
            signatures[-1] += line[3:] + "\n"
    return signatures


def signature_certificates(pe: Path, count: int, directory: Path, prefix: str) -> List[str]:
    """Each signature's certificates as a PEM bundle, by sbattach --detach --signum and
    openssl pkcs7 -print_certs; returns the file names (in table order)."""
    names = []
    for number in range(1, count + 1):
        detached = directory / ("%s-signature-%d.p7" % (prefix, number))
        realbins.run(["sbattach", "--detach", str(detached), "--signum", str(number), str(pe)])
        name = "%s-signature-%d.pem" % (prefix, number)
        realbins.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(detached), "-print_certs",
                      "-out", str(directory / name)])
        detached.unlink()
        names.append(name)
    return names


def make_signing_vars(template: Path, previous: Optional[Path], out: Path, entries_json: Path,
                      plan: Signing, cas: Dict[str, TestCa]) -> List[str]:
    """The OVMF variables of a signer-change boot: the first starts from the Microsoft template
    with the Microsoft UEFI CA 2023 and both db test CAs added to db; later ones from the
    variables the previous boot left (SbatLevel included); then dbx and MokList additions."""
    if plan.mok_certs:  # one --set-json file: virt-fw-vars keeps only the last one given
        merged = json.loads(entries_json.read_text())
        merged["variables"].append(mok_list_variable([cas[tag].ca_cert for tag in plan.mok_certs]))
        entries_json = out.with_suffix(".vars.json")
        entries_json.write_text(json.dumps(merged))
    argv = [sys.executable, "-m", "virt.firmware.vars", "-i", str(previous or template), "-o", str(out),
            "--set-json", str(entries_json)]
    if previous is None:
        changes = ["started from %s" % template,
                   "db += Microsoft UEFI CA 2023 (virt-firmware's ms-uefi-2023.pem), owner %s" % MICROSOFT_OWNER_GUID]
        argv += ["--add-db", MICROSOFT_OWNER_GUID, str(microsoft_cert("ms-uefi-2023.pem"))]
        for tag in DB_CAS:
            argv += ["--add-db", TEST_CA_OWNER_GUIDS[tag], str(cas[tag].ca_cert)]
            changes.append("db += %s (%s.crt), owner %s" % (TEST_CA_NAMES[tag], tag, TEST_CA_OWNER_GUIDS[tag]))
    else:
        changes = ["started from the variables scenario %s left after its boot" % plan.after]
    for tag in plan.dbx_certs:
        if tag != "ms-2011":
            raise SigningError("unknown dbx certificate %s" % tag)
        argv += ["--add-dbx-cert", MICROSOFT_OWNER_GUID, str(microsoft_cert("ms-uefi-2011.pem"))]
        changes.append("dbx += Microsoft Corporation UEFI CA 2011 (ms-uefi-2011.pem), owner %s" % MICROSOFT_OWNER_GUID)
    if plan.mok_certs:
        changes.append("MokList (NV|BS, as MokManager leaves it) = %s, owner %s (virt-fw-vars --set-json)"
                       % (", ".join(TEST_CA_NAMES[t] for t in plan.mok_certs), SHIM_LOCK_GUID))
    changes.append("Boot0007 and BootOrder from efibootmgr (virt-fw-vars --set-json)")
    realbins.run(argv)
    return changes


def mok_list_variable(certs: Sequence[Path]) -> Dict[str, object]:
    """MokList as a virt-fw-vars --set-json entry: one EFI_SIGNATURE_LIST (X.509) per
    certificate, owner SHIM_LOCK_GUID, attributes NON_VOLATILE|BOOTSERVICE_ACCESS (shim
    ignores a MokList that has RUNTIME_ACCESS)."""
    data = b""
    for cert in certs:
        der = realbins.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"]).stdout
        size = 16 + len(der)
        data += uuid.UUID(EFI_CERT_X509_GUID).bytes_le + struct.pack("<III", 28 + size, 0, size)
        data += uuid.UUID(SHIM_LOCK_GUID).bytes_le + der
    return {"name": "MokList", "guid": SHIM_LOCK_GUID, "attr": 3, "data": data.hex()}


def sbatlevel_strings(shim: Path) -> Dict[str, str]:
    """The previous and latest level strings of a shim's .sbatlevel, extracted by objcopy
    (header: u32 version, then the two offsets, relative to the end of the version field)."""
    data = realbins.extract_section(shim, ".sbatlevel", shim.with_suffix(".sbatlevel.bin")).read_bytes()
    _, previous, latest = struct.unpack_from("<III", data)
    return {name: data[4 + at:data.index(b"\0", 4 + at)].decode() for name, at in
            (("previous", previous), ("latest", latest))}


def describe(plan: Signing, shim: Path, uki: Path, target: Path, cas: Dict[str, TestCa]) -> Dict[str, object]:
    """boot.json's "signing" record; writes each signature's certificates beside it."""
    shim_issuers, uki_issuers = listed_issuers(shim), listed_issuers(uki)
    if len(shim_issuers) != len(plan.shim_signatures) or len(uki_issuers) != 1:
        raise SigningError("sbverify lists %d shim and %d UKI signatures, expected %d and 1"
                           % (len(shim_issuers), len(uki_issuers), len(plan.shim_signatures)))
    shim_files = signature_certificates(shim, len(shim_issuers), target, "shim")
    (uki_file,) = signature_certificates(uki, 1, target, "uki")
    csv = realbins.extract_section(shim, ".sbat", shim.with_suffix(".sbat.csv")).read_bytes().rstrip(b"\0").decode()
    return {
        "after": plan.after,
        "dbx_added": list(plan.dbx_certs),
        "shim_signatures": [{"signer": tag, "certificates": name, "sbverify_issuers": issuers.strip()}
                            for tag, name, issuers in zip(plan.shim_signatures, shim_files, shim_issuers)],
        "uki_signatures": [{"signer": plan.uki_signer, "certificates": uki_file,
                            "sbverify_issuers": uki_issuers[0].strip()}],
        "shim_sbatlevel": sbatlevel_strings(shim),
        "shim_sbat": csv,
        "certificates_tool": "sbattach --detach --signum N | openssl pkcs7 -print_certs",
        "test_cas": {tag: {"subject": TEST_CA_NAMES[tag], "owner_guid": TEST_CA_OWNER_GUIDS[tag],
                           "sha256_fingerprint": realbins.cert_sha256_fingerprint(ca.ca_cert)}
                     for tag, ca in sorted(cas.items()) if tag in DB_CAS + plan.mok_certs},
    }
