"""Configuration: one table of items drives the YAML file, the defaults and `config show`.

The file is ``/etc/rhel-cvm-update/config.yaml``; ``--config FILE`` or the environment
variable ``RHEL_CVM_UPDATE_CONFIG`` name another.  Every key is optional.  Unknown keys
and values of the wrong type are errors that name the key, so a typo never silently
falls back to a default.
"""

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from rhel_cvm_update.errors import ConfigError
from rhel_cvm_update.trust import read_trusted_file

DEFAULT_CONFIG_PATH = "/etc/rhel-cvm-update/config.yaml"
CONFIG_ENV = "RHEL_CVM_UPDATE_CONFIG"
# A dozen keys fit in a few hundred bytes; a larger file is not a configuration.
MAX_CONFIG_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ConfigItem:
    key: str
    default: Any
    kind: type
    help: str


CONFIG_ITEMS: Tuple[ConfigItem, ...] = (
    ConfigItem("tpm", "device:/dev/tpmrm0", str,
               "TCTI string of the TPM (e.g. 'swtpm:host=127.0.0.1,port=2321')."),
    ConfigItem("event_log", "/sys/kernel/security/tpm0/binary_bios_measurements", str,
               "TCG event log of the current boot."),
    ConfigItem("efivars", "/sys/firmware/efi/efivars", str, "efivarfs mount point (or a copy of one)."),
    ConfigItem("esp", "/boot/efi", str, "Mount point of the EFI system partition."),
    ConfigItem("esp_device", "", str,
               "Disk or image file holding the ESP; empty: find it from the mounted 'esp'."),
    ConfigItem("uki_dir", "/boot/efi/EFI/Linux", str, "Directory of the Unified Kernel Images."),
    ConfigItem("vendor", "redhat", str, "Directory under EFI/ holding shimx64.efi and BOOTX64.CSV."),
    ConfigItem("luks_device", "auto", str,
               "LUKS2 device or image; 'auto' finds the GPT x86-64 root partition."),
    ConfigItem("pcrs", [4, 7], list, "PCRs (sha256 bank) the LUKS key is sealed to."),
    ConfigItem("state_dir", "/var/lib/rhel-cvm-update", str, "Journal, lock and last result."),
    ConfigItem("keep_previous", 1, int, "Older chains (entry, token, keyslot) kept after a confirmed boot."),
)


@dataclasses.dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    source: Optional[str]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.values)


def _check_value(item: ConfigItem, value: Any, source: str) -> Any:
    # bool is an int subclass; "keep_previous: true" is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, item.kind):
        raise ConfigError(f"{source}: key {item.key!r} must be a {item.kind.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    if item.key == "pcrs":
        if not value or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 24
                                for p in value):
            raise ConfigError(f"{source}: key 'pcrs' must be a non-empty list of PCR numbers 0-23, "
                              f"got {value!r}")
        return sorted(set(value))
    if item.key == "keep_previous" and value < 0:
        raise ConfigError(f"{source}: key 'keep_previous' must be 0 or more, got {value!r}")
    return value


def config_from_mapping(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping of keys to values")
    items = {item.key: item for item in CONFIG_ITEMS}
    unknown = sorted(str(k) for k in data if k not in items)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(items)}")
    values = {key: _check_value(items[key], data[key], source) if key in data else item.default
              for key, item in items.items()}
    return Config(values=values, source=source)


def _parse_yaml(raw: bytes, path: str) -> Any:
    import yaml  # imported here: `status` must start fast and yaml is not always needed

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        # PyYAML's composer recurses once per nesting level ("[[[[..." thousands deep).
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """Read the config file.  A missing default file means all defaults; a missing
    explicitly named file is an error."""
    explicit = path or os.environ.get(CONFIG_ENV)
    path = explicit or DEFAULT_CONFIG_PATH
    try:
        # The configuration names the LUKS device, the TPM and the event log: a file another
        # user can write would let them choose what the key is sealed to.
        raw = read_trusted_file(path, "configuration file", MAX_CONFIG_SIZE)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: configuration file not found") from None
        raw, path = b"", None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    data = _parse_yaml(raw, path) if raw else {}
    merged: Dict[str, Any] = dict(data or {}) if isinstance(data, dict) else data
    if overrides and isinstance(merged, dict):
        merged.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(merged, path or "<defaults>")


def example_config() -> str:
    lines: List[str] = ["# /etc/rhel-cvm-update/config.yaml: every key is optional."]
    for item in CONFIG_ITEMS:
        lines.append(f"# {item.help}")
        lines.append(f"#{item.key}: {item.default!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"
