"""Fuzz the text inputs: the YAML configuration file and predict's ``--pcrs-from`` file.

Seeds are real: the example configuration the tool prints, a configuration like the
sandbox's, and the pcrs.txt files the VM captures read from the guest's sysfs.  Hostile
YAML (deep nesting, aliases, tags, non-string keys, huge numbers) must end in ConfigError;
a broken PCR file in FormatError naming the file.
"""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhel_cvm_update.commands.predict import read_pcr_file
from rhel_cvm_update.config import example_config, load_config
from rhel_cvm_update.errors import ConfigError, FormatError
from tests.fuzz.mutation import mutated

BOOTS = Path(__file__).resolve().parents[1] / "data" / "boots"
FUZZ = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CONFIG_SEEDS = [
    # every key, uncommented, at its default value
    "".join(line[1:] + "\n" for line in example_config().splitlines() if line.startswith("#") and ": " in line
            and not line.startswith("# ")).encode(),
    b"tpm: 'swtpm:host=127.0.0.1,port=2321'\nluks_device: /dev/vda3\npcrs: [4, 7]\nkeep_previous: 1\n"
    b"state_dir: /var/lib/rhel-cvm-update\nesp_device: ''\n",
    b"pcrs:\n  - 4\n  - 7\nvendor: redhat\n",
]
YAML_SNIPPETS = [b"&a [*a]", b"!!python/object:os.system", b"? [a]\n: b", b"{", b"[" * 3000, b"\t", b"\xff\xfe",
                 b"%YAML 1.1\n---", b"*undefined", b"!!binary AAAA", b"1e400", b"0x" + b"f" * 40, b"<<: {a: 1}",
                 b"- - - - -", b": :", b"---\n---\n", b"\x00"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-config") / "config.yaml"


def _load(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    try:
        load_config(str(path))
    except ConfigError as e:
        assert str(path) in str(e)


def test_seeds_are_valid_configurations(config_file):
    for seed in CONFIG_SEEDS:
        config_file.write_bytes(seed)
        load_config(str(config_file))
    assert CONFIG_SEEDS[0].count(b"\n") == 11


@FUZZ
@given(st.data())
def test_mutated_configs(config_file, data):
    _load(config_file, data.draw(mutated(CONFIG_SEEDS, head=128)))


@FUZZ
@given(st.data())
def test_configs_with_hostile_yaml_spliced_in(config_file, data):
    seed = data.draw(st.sampled_from(CONFIG_SEEDS))
    at = data.draw(st.integers(0, len(seed)))
    _load(config_file, seed[:at] + data.draw(st.sampled_from(YAML_SNIPPETS)) + seed[at:])


def test_deeply_nested_config_is_a_config_error(config_file):
    with pytest.raises(ConfigError, match="nested too deeply"):
        config_file.write_bytes(b"pcrs: " + b"[" * 5000 + b"]" * 5000 + b"\n")
        load_config(str(config_file))


def _pcr_seeds():
    return sorted({p.read_bytes() for p in BOOTS.glob("*/pcrs.txt")})


@FUZZ
@given(st.data())
def test_mutated_pcr_files(tmp_path_factory, data):
    seeds = _pcr_seeds()
    if not seeds:
        pytest.skip("no captured pcrs.txt under tests/data/boots")
    path = tmp_path_factory.getbasetemp() / "pcrs.txt"
    path.write_bytes(data.draw(mutated(seeds, head=len(min(seeds, key=len)))))
    try:
        banks = read_pcr_file(str(path))
    except FormatError as e:
        assert e.source == str(path)
        return
    sizes = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
    assert all(len(v) == sizes[bank] and 0 <= pcr < 24 for bank, values in banks.items()
               for pcr, v in values.items())


def test_captured_pcr_files_parse():
    seeds = _pcr_seeds()
    if not seeds:
        pytest.skip("no captured pcrs.txt under tests/data/boots")
    for path in BOOTS.glob("*/pcrs.txt"):
        banks = read_pcr_file(str(path))
        assert set(banks["sha256"]) >= {4, 7}
