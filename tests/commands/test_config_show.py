"""`rhel-cvm-update config show`: the effective configuration, file values over defaults."""

import json
import subprocess
import sys

import yaml

from rhel_cvm_update.config import CONFIG_ITEMS


def run(*argv):
    return subprocess.run([sys.executable, "-m", "rhel_cvm_update", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def test_show_json_merges_file_and_defaults(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("keep_previous: 3\npcrs: [7, 4]\nuki_dir: /srv/ukis\n")
    shown = run("--config", str(config), "config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["source"] == str(config)
    expected = {item.key: item.default for item in CONFIG_ITEMS}
    expected.update(keep_previous=3, pcrs=[4, 7], uki_dir="/srv/ukis")
    assert document["config"] == expected


def test_show_text_is_yaml_that_reads_back_to_the_same_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("tpm: 'swtpm:host=127.0.0.1,port=2321'\nkeep_previous: 0\n")
    shown = run("--config", str(config), "config", "show")
    assert shown.returncode == 0, shown.stderr
    again = tmp_path / "again.yaml"
    again.write_text(shown.stdout)
    assert yaml.safe_load(shown.stdout)["tpm"] == "swtpm:host=127.0.0.1,port=2321"
    reread = json.loads(run("--config", str(again), "config", "show", "--json").stdout)
    assert reread["config"] == json.loads(run("--config", str(config), "config", "show", "--json").stdout)["config"]


def test_unknown_key_and_wrong_type_are_errors_naming_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("keep_previus: 2\n")
    shown = run("--config", str(config), "config", "show")
    assert shown.returncode == 2 and "keep_previus" in shown.stderr
    config.write_text("keep_previous: yes\n")
    shown = run("--config", str(config), "config", "show")
    assert shown.returncode == 2 and "keep_previous" in shown.stderr
