"""The configuration table: defaults, type checks that name the key, file selection."""

import pytest

from rhel_cvm_update.config import CONFIG_ITEMS, config_from_mapping, example_config, load_config
from rhel_cvm_update.errors import ConfigError


def test_every_key_has_a_default():
    config = config_from_mapping({})
    assert config.tpm == "device:/dev/tpmrm0"
    assert config.pcrs == [4, 7]
    assert set(config.as_dict()) == {item.key for item in CONFIG_ITEMS}


@pytest.mark.parametrize("data,message", [
    ({"pcrs": "4,7"}, "'pcrs' must be a list"),
    ({"pcrs": [4, 24]}, "PCR numbers 0-23"),
    ({"keep_previous": True}, "'keep_previous' must be a int"),
    ({"keep_previous": -1}, "0 or more"),
    ({"esp": 5}, "'esp' must be a str"),
    ({"espdir": "/boot"}, "unknown key(s) espdir"),
    (["tpm"], "must be a mapping"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_mapping(data, "cfg.yaml")
    assert message in str(err.value) and "cfg.yaml" in str(err.value)


def test_explicit_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_environment_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("vendor: centos\npcrs: [7, 4, 4]\n")
    monkeypatch.setenv("RHEL_CVM_UPDATE_CONFIG", str(path))
    config = load_config()
    assert config.vendor == "centos" and config.pcrs == [4, 7] and config.source == str(path)


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tpm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_example_config_parses_to_the_defaults():
    import yaml

    uncommented = "\n".join(line[1:] for line in example_config().splitlines()
                            if line.startswith("#") and ":" in line and not line.startswith("# "))
    assert config_from_mapping(yaml.safe_load(uncommented)).as_dict() == config_from_mapping({}).as_dict()
