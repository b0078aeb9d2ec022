"""Entry points for long coverage-guided fuzzing runs with atheris (not run in CI).

Each target feeds one parser the way the tool feeds it untrusted bytes; only the project's
errors (CvmUpdateError) are expected, anything else is a finding.  tests/fuzz runs every
target once per seed, so the targets stay in step with the parsers.

    pip install atheris            # into a scratch venv, not the project's
    python fuzz/targets.py pe CORPUS_DIR [atheris/libFuzzer options]

Seeds for CORPUS_DIR: the files tests/fuzz mutates (tests/data/boots/*, the shared event-log
corpus, /usr/lib/shim/*.efi*, /usr/lib/systemd/boot/efi/linuxx64.efi.stub).
"""

import sys
from typing import Callable, Dict

from rhel_cvm_update.errors import CvmUpdateError


def _pe(data: bytes) -> None:
    from rhel_cvm_update.formats import authenticode, pe, uki

    image = pe.PEImage.parse(data, "fuzz")
    authenticode.authenticode_digests(data, ("sha1", "sha256"), "fuzz", image=image)
    pe.certificates(data, image)
    uki.pe_sbat(data, image)
    uki.shim_sbat_levels(data, "fuzz", image)
    if uki.is_uki(image):
        u = uki.UKI.from_pe(data, image)
        (u.cmdline, u.osrel, u.uname, u.kernel_version_with_origin())
        u.linux_authenticode_digests(("sha256",))


def _event_log(data: bytes) -> None:
    from rhel_cvm_update.formats import tcg_describe, tcglog

    log = tcglog.parse_event_log(data, "fuzz")
    tcglog.replay(log)
    for event in log.events:
        tcg_describe.describe_event(event, log.uintn_size)


def _load_option(data: bytes) -> None:
    from rhel_cvm_update.formats.devpath import device_path_text
    from rhel_cvm_update.formats.loadopt import LoadOption

    option = LoadOption.from_bytes(data, "fuzz")
    device_path_text(option.device_path)
    option.to_json()


def _device_path(data: bytes) -> None:
    from rhel_cvm_update.formats.devpath import device_path_text, parse_device_path

    device_path_text(parse_device_path(data, "fuzz"))


def _boot_order(data: bytes) -> None:
    from rhel_cvm_update.formats.loadopt import parse_boot_next, parse_boot_order

    parse_boot_order(data, "fuzz")
    if len(data) == 2:
        parse_boot_next(data, "fuzz")


def _boot_csv(data: bytes) -> None:
    from rhel_cvm_update.formats.bootcsv import parse_boot_csv

    parse_boot_csv(data, "fuzz")


def _signature_lists(data: bytes) -> None:
    from rhel_cvm_update.formats.efi import parse_signature_lists

    parse_signature_lists(data, "fuzz")


def _gpt(data: bytes) -> None:
    from rhel_cvm_update.formats.gpt import GptHeader, parse_partition_entries

    header = GptHeader.from_bytes(data[:512], "fuzz", 512)
    parse_partition_entries(header, data[512:512 + header.entries_bytes], "fuzz", 1024)


def _luks_metadata(data: bytes) -> None:
    from rhel_cvm_update.formats import tpm_policy
    from rhel_cvm_update.formats.luks_token import LuksMetadata

    meta = LuksMetadata.from_json_bytes(data, "fuzz")
    for token in meta.systemd_tpm2_tokens().values():
        _, public = tpm_policy.split_sealed_blob(token.blob, source="fuzz")
        tpm_policy.parse_public_area(public[2:], source="fuzz")
    meta.tpm2_import_tokens()


def _config(data: bytes) -> None:
    import yaml

    from rhel_cvm_update.config import _parse_yaml, config_from_mapping

    try:
        config_from_mapping(_parse_yaml(data, "fuzz"), "fuzz")
    except yaml.YAMLError:
        raise AssertionError("a YAML error escaped as such") from None


TARGETS: Dict[str, Callable[[bytes], None]] = {
    "pe": _pe, "event-log": _event_log, "load-option": _load_option, "device-path": _device_path,
    "boot-order": _boot_order, "boot-csv": _boot_csv, "signature-lists": _signature_lists, "gpt": _gpt,
    "luks-metadata": _luks_metadata, "config": _config,
}


def run_one(target: str, data: bytes) -> None:
    """One input through one target: the project's errors are expected, anything else is not."""
    try:
        TARGETS[target](data)
    except CvmUpdateError:
        pass


def main(argv) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(f"usage: {argv[0]} {{{','.join(TARGETS)}}} CORPUS_DIR [libFuzzer options]", file=sys.stderr)
        return 2
    import atheris

    target = argv[1]
    atheris.Setup([argv[0]] + argv[2:], lambda data: run_one(target, data))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
