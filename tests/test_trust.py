"""rhel_cvm_update.trust: files the tool believes must be writable by no one but root.

Checked on real files and directories (chmod/chown as root), through the real entry points:
load_config, reseal's prediction step and its state directory.  The non-root case runs a
child process under another UID, so the "trusted owner = effective UID" rule is exercised
for real rather than by switching anything off.
"""

import ast
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from rhel_cvm_update import trust
from rhel_cvm_update.boot_events import Prediction
from rhel_cvm_update.config import config_from_mapping, load_config
from rhel_cvm_update.errors import ConfigError, PredictionError
from rhel_cvm_update.journal import writing_command
from rhel_cvm_update.reseal import predict_target

PACKAGE = Path(__file__).resolve().parents[1] / "rhel_cvm_update"
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other users needs root")


def write(path: Path, text: str = "keep_previous: 2\n", mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_root_owned_config_is_read(tmp_path):
    assert load_config(str(write(tmp_path / "c.yaml"))).keep_previous == 2


@pytest.mark.parametrize("mode,who", [(0o664, "group"), (0o646, "others"), (0o666, "group and others")])
def test_group_or_world_writable_config_is_refused(tmp_path, mode, who):
    path = write(tmp_path / "c.yaml", mode=mode)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(path) in str(e.value) and f"writable by {who}" in str(e.value) and f"{mode:04o}" in str(e.value)


@needs_root
def test_config_owned_by_another_user_is_refused(tmp_path):
    path = write(tmp_path / "c.yaml")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        load_config(str(path))


def test_config_in_a_world_writable_directory_is_refused(tmp_path):
    # Whoever can write the directory can replace the file with their own.
    directory = tmp_path / "etc"
    directory.mkdir()
    os.chmod(directory, 0o777)
    path = write(directory / "c.yaml")
    with pytest.raises(ConfigError, match=f"directory {directory} is writable by group and others"):
        load_config(str(path))


def test_sticky_world_writable_directory_is_allowed(tmp_path):
    # /tmp-like: others may add files but cannot replace one root owns.
    directory = tmp_path / "sticky"
    directory.mkdir()
    os.chmod(directory, 0o1777)
    assert load_config(str(write(directory / "c.yaml"))).keep_previous == 2


def test_symlinked_config_is_checked_where_it_points(tmp_path):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    os.chmod(hostile, 0o777)
    target = write(hostile / "c.yaml")
    link = tmp_path / "c.yaml"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match=f"directory {hostile} is writable"):
        load_config(str(link))


def test_symlink_in_a_writable_directory_is_refused(tmp_path):
    target = write(tmp_path / "c.yaml")
    links = tmp_path / "links"
    links.mkdir()
    os.chmod(links, 0o775)
    (links / "c.yaml").symlink_to(target)
    with pytest.raises(ConfigError, match=f"directory {links} is writable by group"):
        load_config(str(links / "c.yaml"))


def test_oversized_config_is_refused(tmp_path):
    path = write(tmp_path / "c.yaml", "# padding\n" * 10000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(path))


def test_missing_default_config_still_means_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("RHEL_CVM_UPDATE_CONFIG", raising=False)
    monkeypatch.setattr("rhel_cvm_update.config.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    assert load_config().source == "<defaults>"


def _load_as(uid: int, path: Path) -> str:
    """load_config(path) in a forked child whose effective UID is ``uid``; its verdict."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_fd)
            os.setegid(uid)
            os.seteuid(uid)
            try:
                load_config(str(path))
                verdict = "trusted"
            except ConfigError as e:
                verdict = f"refused: {e}"
            os.write(write_fd, verdict.encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        verdict = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"child failed with {status}"
    return verdict


@needs_root
def test_unprivileged_process_trusts_its_own_and_roots_files_only():
    """With effective uid 65534: its own file and root's are trusted, a third user's is not,
    and a group-writable file of its own is still refused."""
    top = tempfile.mkdtemp(prefix="trust-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        own = write(Path(top) / "own.yaml")
        os.chown(own, NOBODY, NOBODY)
        roots = write(Path(top) / "root.yaml")
        other = write(Path(top) / "other.yaml")
        os.chown(other, 4242, 4242)
        own_writable = write(Path(top) / "own-g.yaml", mode=0o664)
        os.chown(own_writable, NOBODY, NOBODY)
        verdicts = [_load_as(NOBODY, p) for p in (own, roots, other, own_writable)]
        # The same third-party file as root: refused too (root trusts only root).
        as_root = _load_as(0, own)
    finally:
        subprocess.run(["rm", "-rf", top], check=True)
    assert verdicts[0] == "trusted"
    assert verdicts[1] == "trusted"
    assert verdicts[2].startswith("refused:") and "owned by uid 4242" in verdicts[2]
    assert verdicts[3].startswith("refused:") and "writable by group" in verdicts[3]
    assert as_root.startswith("refused:") and f"owned by uid {NOBODY}" in as_root


# --- what the key is sealed to --------------------------------------------------------------

def _reseal_config(tmp_path, **values):
    return config_from_mapping({"state_dir": str(tmp_path / "state"), "tpm": "swtpm:port=1", **values})


def test_world_writable_event_log_is_refused_before_predicting(tmp_path):
    log = write(tmp_path / "log.bin", "x", mode=0o666)
    uki = write(tmp_path / "new.efi", "not even parsed")
    # tpm=None and an unreachable TCTI: the refusal must come before any TPM or file parsing.
    with pytest.raises(ConfigError, match=f"event log {log}.*writable by group and others"):
        predict_target(_reseal_config(tmp_path, event_log=str(log)), None, str(uki))


def test_group_writable_uki_is_refused_before_predicting(tmp_path):
    uki = write(tmp_path / "new.efi", "not even parsed", mode=0o664)
    with pytest.raises(ConfigError, match=f"UKI {uki}.*writable by group"):
        predict_target(_reseal_config(tmp_path, event_log=str(tmp_path / "absent")), None, str(uki))


def test_state_directory_must_be_trusted(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    with pytest.raises(ConfigError, match="state directory"):
        with writing_command(str(state), "reseal") as record:
            record({"action": "added"})
    assert not (state / "last-reseal.json").exists()


def test_state_directory_is_created_private(tmp_path):
    with writing_command(str(tmp_path / "new-state"), "reseal") as record:
        record({"action": "added"})
    assert (tmp_path / "new-state").stat().st_mode & 0o777 == 0o700
    assert json.loads((tmp_path / "new-state" / "last-reseal.json").read_text())["action"] == "added"


def _prediction(checked_against):
    return Prediction(source="log", uki="u", shim="s", banks={"sha256": {4: bytes(32), 7: bytes(32)}},
                      events=(), checked_against=checked_against)


@pytest.mark.parametrize("checked_against", ["offline", "file /tmp/pcrs.txt", ""])
def test_prediction_not_checked_against_the_tpm_is_never_sealed(checked_against):
    with pytest.raises(PredictionError, match="refusing to seal"):
        trust.require_live_checked(_prediction(checked_against))
    trust.require_live_checked(_prediction("tpm"))


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == name) or \
                    (isinstance(func, ast.Attribute) and func.attr == name):
                yield node


def test_no_sealing_code_path_predicts_offline_or_from_given_pcrs():
    """Outside the display-only `predict` command nothing predicts offline, live PCR values
    handed to predict_next_boot are read from the TPM (read_live_pcrs) in the same module,
    and every caller checks the result with require_live_checked before sealing to it."""
    callers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel == "predict.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        # Read in this module, or in one of ours it imports them from (transaction.py passes
        # on what detect.py read).
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                    and n.module.startswith("rhel_cvm_update.")}
        reads_tpm = bool(list(_calls(tree, "read_live_pcrs"))) or any(
            list(_calls(ast.parse((PACKAGE.parent / (m.replace(".", "/") + ".py")).read_text()), "read_live_pcrs"))
            for m in imported if (PACKAGE.parent / (m.replace(".", "/") + ".py")).exists())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            calls = list(_calls(func, "predict_next_boot"))
            if not calls:
                continue
            if rel == "commands/predict.py":
                source = path.read_text()
                assert "reseal" not in source and ".seal(" not in source and "transaction" not in source
                continue
            callers[f"{rel}:{func.name}"] = func
            for call in calls:
                names = {k.arg for k in call.keywords}
                assert "offline" not in names, f"{rel}:{func.name} predicts offline"
                assert "live" not in names or reads_tpm, f"{rel}:{func.name} passes live PCRs not read from the TPM"
    assert {"reseal.py:predict_target", "transaction.py:predict"} <= set(callers)
    for name, func in callers.items():
        assert list(_calls(func, "require_live_checked")), f"{name} seals a prediction without require_live_checked"
        assert len(list(_calls(func, "check_trusted_path"))) >= 2, f"{name} does not check the UKI and event log"


# Modules that decide what goes into a Boot entry, a token or a prediction.
DECIDING_MODULES = ("bootmgr.py", "reseal.py", "predict.py", "predict_log.py", "predict_model.py", "measure.py",
                    "adapters/esp.py", "adapters/efivarfs.py", "adapters/tpm.py", "adapters/cryptsetup.py")


def test_deciding_modules_never_read_the_environment():
    """The UKI path of a Boot entry comes from the ESP listing (Esp.list_ukis/read_uki), the
    device and PCR values from the configuration and the TPM: never from an environment
    variable, which a caller (sudo -E, a hook's environment) could set."""
    for rel in DECIDING_MODULES:
        path = PACKAGE / rel
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                pytest.fail(f"{rel}:{node.lineno} reads os.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    any(a.name in ("environ", "getenv") for a in node.names):
                pytest.fail(f"{rel}:{node.lineno} imports os.{node.names[0].name}")


def test_transaction_lock_refuses_a_writable_state_directory(tmp_path):
    from rhel_cvm_update.journal import state_lock

    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o770)
    with pytest.raises(ConfigError, match=f"state directory {state}.*writable by group"):
        with state_lock(str(state)):
            pass
    assert not (state / "lock").exists()


def test_journal_writable_by_others_is_refused(tmp_path):
    from rhel_cvm_update.journal import read_json

    journal = write(tmp_path / "journal.json", '{"chains": {}}', mode=0o646)
    with pytest.raises(ConfigError, match=f"state file {journal}.*writable by others"):
        read_json(str(journal))
    os.chmod(journal, 0o600)
    assert read_json(str(journal)) == {"chains": {}}


@pytest.mark.swtpm
def test_update_refuses_a_uki_others_can_write(tmp_path):
    """On the sandbox CVM: a new UKI that any user could have replaced is not sealed for."""
    from rhel_cvm_update.transaction import run_update
    from tests.sandbox import built_or_skip

    cvm = built_or_skip(tmp_path / "cvm")
    try:
        tokens_before = sorted(cvm.luks_json()["tokens"])
        uki = cvm.install_uki("b")
        os.chmod(uki, 0o666)
        with pytest.raises(ConfigError, match=f"UKI {uki}.*writable by group and others"):
            run_update(cvm.config())
        assert sorted(cvm.luks_json()["tokens"]) == tokens_before
        os.chmod(uki, 0o644)
        assert [s["action"] for s in run_update(cvm.config()).sealed] == ["added"]
    finally:
        cvm.close()
