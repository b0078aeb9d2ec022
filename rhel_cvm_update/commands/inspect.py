"""`rhel-cvm-update inspect FILE...`: Authenticode digests and UKI contents of PE files.

Each file is memory-mapped read-only, so a 100 MiB UKI is hashed without being read into
memory.  The digests are the ones edk2 extends into PCR4 (see formats/pe.py).
"""

import argparse
from typing import Dict, List

# The PCR banks --hash accepts (formats.authenticode.HASH_ALGORITHMS; a test keeps them equal).  Named
# here because every command's parser is built on every start, and importing the PE code
# for the choices would slow `status` down.
HASH_CHOICES = ("sha1", "sha256", "sha384", "sha512")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show the PCR4 Authenticode digest and UKI sections of PE files",
        description="For each PE file print its Authenticode digest as the firmware measures "
                    "it into PCR4; for a UKI also its sections, the digest of the embedded "
                    "kernel as systemd-stub loads it, the kernel version and the command line.")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    parser.add_argument("--hash", dest="algorithms", action="append", choices=HASH_CHOICES,
                        help="digest algorithm (PCR bank); repeatable; default sha256")
    parser.set_defaults(run=run, without_config=True)


def describe(buf, path: str, algorithms: List[str]) -> Dict[str, object]:
    from rhel_cvm_update.formats.authenticode import authenticode_digests
    from rhel_cvm_update.formats.pe import PEImage
    from rhel_cvm_update.formats.uki import UKI, is_uki, pe_sbat, shim_sbat_levels

    pe = PEImage.parse(buf, path)
    uki = UKI.from_pe(buf, pe) if is_uki(pe) else None
    if uki is not None:
        digests, linux = uki.authenticode_digests(algorithms)  # one pass over the file
    else:
        digests = authenticode_digests(buf, algorithms, source=path, image=pe)
    info: Dict[str, object] = {"file": path}
    info.update({f"authenticode_{name}": digest.hex() for name, digest in digests.items()})
    info["signed"] = pe.is_signed
    info["machine"] = f"{pe.machine:#06x}"
    info["sections"] = [s.to_json() for s in pe.sections]
    sbat = pe_sbat(buf, pe)
    if sbat is not None:
        info["sbat"] = sbat
    levels = shim_sbat_levels(buf, path, pe)
    if levels:
        info["sbatlevel"] = levels
    info["uki"] = uki is not None
    if uki is not None:
        info.update({f"linux_authenticode_{name}": digest.hex() for name, digest in linux.items()})
        version, origin = uki.kernel_version_with_origin()
        info["kernel_version"] = version
        info["kernel_version_from"] = origin
        info["cmdline"] = uki.cmdline
        info["uname"] = uki.uname
        info["osrel"] = uki.osrel
    return info


def _print_text(info: Dict[str, object]) -> None:
    print(f"{info['file']}:")
    for key, value in info.items():
        if key == "file":
            continue
        if key == "sections":
            print("  sections:")
            for s in value:  # type: ignore[attr-defined]
                print(f"    {s['full_name']:<12} vsize {s['virtual_size']:#010x} raw {s['size_of_raw_data']:#010x} "
                      f"at {s['pointer_to_raw_data']:#010x}")
        elif isinstance(value, str) and "\n" in value:
            print(f"  {key}:")
            for line in value.rstrip("\n").splitlines():
                print(f"    {line}")
        else:
            print(f"  {key}: {value}")


def run(args: argparse.Namespace, config) -> int:
    from rhel_cvm_update.mapped import mapped_file
    from rhel_cvm_update.output import print_json

    algorithms = list(dict.fromkeys(args.algorithms or ["sha256"]))
    results = []
    for path in args.files:
        with mapped_file(path) as mapping:
            info = describe(mapping, path, algorithms)
        if args.json:
            results.append(info)
        else:
            _print_text(info)
    if args.json:
        print_json(results)
    return 0
