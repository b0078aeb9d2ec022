"""The update transaction on the sandbox CVM (tests/sandbox.py): real shim and UKIs, the
captured boot's efivars and event log, swtpm, a LUKS2 image enrolled by systemd-cryptenroll,
and systemd 252's own token plugin deciding whether the disk unlocks.  Boots after an update
are SIMULATED FIRMWARE (the captured real log of the chain, or boot A's log rebuilt with the
new UKI's pesign digests)."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from rhel_cvm_update.errors import TransactionError
from rhel_cvm_update.journal import Journal, state_lock
from rhel_cvm_update.transaction import CONFIRM_STEPS, UPDATE_STEPS, run_confirm, run_update
from tests.sandbox import BOOTS, built_or_skip, read_u16_var, sandbox  # noqa: F401  (fixture)
from tests.swtpm_fixtures import header_bytes

pytestmark = [pytest.mark.swtpm, pytest.mark.root]


def cli(cvm, *argv, env=None):
    return subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(cvm.config_path), *argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def efibootmgr(cvm):
    if shutil.which("efibootmgr") is None:
        pytest.skip("efibootmgr is not installed")
    out = subprocess.run(["efibootmgr", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, EFIVARFS_PATH=str(cvm.efivars) + "/", LIBEFIVAR_OPS="efivarfs"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def tokens_by_uki(cvm):
    chains = Journal(str(cvm.state_dir)).chains.values()
    return {os.path.basename(c.uki): c.token for c in chains if c.status != "retired" and c.uki}


def keyslot_owners(cvm):
    """{keyslot: token id or None} from the LUKS2 header."""
    meta = cvm.luks_json()
    owners = {int(s): None for s in meta["keyslots"]}
    for token_id, token in meta["tokens"].items():
        for slot in token["keyslots"]:
            owners[int(slot)] = int(token_id)
    return owners


def efivars_snapshot(cvm):
    return {p.name: p.read_bytes() for p in sorted(cvm.efivars.iterdir())}


def test_update_reboot_confirm_with_the_real_token_plugin(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    result = run_update(cvm.config())
    assert result.outcome == "staged" and result.staged["uki"].endswith("uki-b.efi")
    new_token = result.sealed[0]["token"]
    listing = efibootmgr(cvm)
    entry = result.staged["entry"]
    assert f"BootNext: {entry[4:]}" in listing
    assert "BootOrder: 0007" in listing  # the trial leaves the head of BootOrder alone
    assert not cvm.plugin_unlocks(new_token)  # sealed to B's PCRs, not A's
    assert cvm.unlocking_tokens() == [0]       # systemd-cryptenroll's token still opens boot A

    booted = cvm.simulate_reboot()
    assert booted["entry"] == entry and booted["log"].startswith("real log of captured boot sb-off-uki-b")
    assert read_u16_var(cvm.efivars, "BootNext") is None
    assert cvm.unlocking_tokens() == [new_token]

    confirmed = run_confirm(cvm.config())
    assert confirmed.outcome == "confirmed" and confirmed.promoted == entry
    assert efibootmgr(cvm).splitlines()[1].startswith(f"BootOrder: {entry[4:]},0007")
    csv = (cvm.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes().decode("utf-16")
    assert "\\EFI\\Linux\\uki-b.efi" in csv
    assert set(tokens_by_uki(cvm)) == {"uki-a.efi", "uki-b.efi"}  # keep_previous = 1
    assert cvm.recovery_unlocks()
    status = cli(cvm, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    document = json.loads(status.stdout)
    assert document["next_boot"]["will_unlock"] and document["booted"]["entry"] == entry
    assert [t["token"] for t in document["tokens"] if t["matches_current_boot"]] == [new_token]


def test_second_update_changes_nothing(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    assert cli(cvm, "update").returncode == 0
    header, variables = header_bytes(str(cvm.luks)), efivars_snapshot(cvm)
    again = cli(cvm, "update", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["outcome"] == "nothing-to-do"
    assert header_bytes(str(cvm.luks)) == header and efivars_snapshot(cvm) == variables


def test_ten_concurrent_updates_make_one_transaction(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    argv = [sys.executable, "-m", "rhel_cvm_update", "--config", str(cvm.config_path), "update", "--json"]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    outputs = [(r.wait(timeout=600), r.stdout.read(), r.stderr.read()) for r in runs]
    assert all(code == 0 for code, _, _ in outputs), outputs
    outcomes = sorted(json.loads(out)["outcome"] for _, out, _ in outputs)
    assert outcomes == ["nothing-to-do"] * 9 + ["staged"]
    owners = keyslot_owners(cvm)
    assert len(owners) == 3 and owners[0] is None  # recovery, cryptenroll's, B's
    assert len(cvm.luks_json()["tokens"]) == 2


def test_lock_held_no_wait_exits_4_and_waiting_times_out(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    with state_lock(str(cvm.state_dir)):
        refused = cli(cvm, "update", "--no-wait")
        assert refused.returncode == 4 and "another rhel-cvm-update transaction" in refused.stderr
        with pytest.raises(TransactionError):
            run_update(cvm.config(), lock_timeout=0.3)
        # flock is per open file description: a second open in this process is refused too.
        with pytest.raises(TransactionError):
            with state_lock(str(cvm.state_dir)):
                pass
    assert len(cvm.luks_json()["tokens"]) == 1
    holder_released = threading.Event()

    def hold():
        with state_lock(str(cvm.state_dir)):
            holder_released.wait(5)
    holder = threading.Thread(target=hold)
    holder.start()
    threading.Timer(0.5, holder_released.set).start()
    waited = cli(cvm, "update")  # waits for the lock, then runs
    holder.join()
    assert waited.returncode == 0 and "staged" in waited.stdout


def test_failed_trial_boot_is_recorded_and_changes_nothing(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    staged = run_update(cvm.config())
    booted = cvm.simulate_reboot(hang=True)  # B hangs, reset: firmware boots BootOrder's head, A
    assert booted["entry"] == "Boot0007"
    order = read_u16_var(cvm.efivars, "BootOrder")
    header = header_bytes(str(cvm.luks))
    confirmed = cli(cvm, "confirm", "--json")
    assert confirmed.returncode == 1
    assert json.loads(confirmed.stdout)["outcome"] == "trial-failed"
    assert read_u16_var(cvm.efivars, "BootOrder") == order and header_bytes(str(cvm.luks)) == header
    assert cvm.unlocking_tokens() == [0]
    status = cli(cvm, "status")
    assert status.returncode == 1 and "trial boot of" in status.stdout
    # The admin's later update does not stage the failed kernel again on its own.
    assert run_update(cvm.config()).outcome == "nothing-to-do"
    assert staged.sealed[0]["token"] in [int(t) for t in cvm.luks_json()["tokens"]]


def test_deleted_uki_loses_its_token_but_foreign_tokens_stay(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    run_update(cvm.config())
    cvm.simulate_reboot()
    run_confirm(cvm.config())
    # A token the tool cannot account for: sealed by systemd-cryptenroll to PCR 7 only.
    env = dict(os.environ, PASSWORD="rhel-cvm-update test passphrase")
    enrolled = subprocess.run(["systemd-cryptenroll", "--tpm2-device=" + cvm.swtpm.tcti, "--tpm2-pcrs=7",
                               str(cvm.luks)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert enrolled.returncode == 0, enrolled.stderr
    cvm.swtpm.flush_all()
    foreign = max(int(t) for t in cvm.luks_json()["tokens"])
    a_token = tokens_by_uki(cvm)["uki-a.efi"]
    cvm.remove_uki("a")  # dnf erased the old kernel
    result = run_update(cvm.config())
    assert result.outcome == "removed" and [r["token"] for r in result.removed] == [a_token]
    tokens = {int(t) for t in cvm.luks_json()["tokens"]}
    assert a_token not in tokens and foreign in tokens
    owners = keyslot_owners(cvm)
    assert owners[0] is None and set(owners.values()) == {None, foreign, tokens_by_uki(cvm)["uki-b.efi"]}
    status = json.loads(cli(cvm, "status", "--json").stdout)
    assert any(line.startswith(f"token {foreign} ") for line in status["unaccounted"])
    assert cvm.recovery_unlocks() and cvm.plugin_unlocks(tokens_by_uki(cvm)["uki-b.efi"])


UPDATE_CRASHES = [(step, where) for step in UPDATE_STEPS for where in ("before", "inside", "after")]


def booted_b_then_c_installed_and_a_erased(cvm):
    """A -> B confirmed, then dnf installs UKI C and erases A: the next update has every
    step's work to do (predict and seal C, stage C, remove A's token).  Returns B's token."""
    cvm.install_uki("b")
    run_update(cvm.config())
    cvm.simulate_reboot()
    run_confirm(cvm.config())
    cvm.install_uki("c")
    cvm.remove_uki("a")
    return tokens_by_uki(cvm)["uki-b.efi"]


@pytest.mark.parametrize("step,where", UPDATE_CRASHES)
def test_update_killed_at_every_step_then_rerun(sandbox, step, where):
    """A -> B confirmed; then UKI C is installed and A deleted, and `update` is SIGKILLed at
    step:where.  The rerun must leave B (booted) unlocking now, C unlocking after the
    reboot, and no keyslot or token the journal does not account for."""
    cvm = sandbox
    b_token = booted_b_then_c_installed_and_a_erased(cvm)

    killed = cli(cvm, "update", env={"RHEL_CVM_UPDATE_CRASH_AT": f"{step}:{where}"})
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    cvm.process_killed()
    assert cvm.plugin_unlocks(b_token)  # a reboot right now would still unlock
    assert cli(cvm, "status").returncode == 1  # the interrupted transaction needs attention

    rerun = cli(cvm, "update", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert Journal(str(cvm.state_dir)).pending is None
    tokens = tokens_by_uki(cvm)
    assert set(tokens) == {"uki-b.efi", "uki-c.efi"}
    owners = keyslot_owners(cvm)
    assert sorted(o for o in owners.values() if o is not None) == sorted(tokens.values())
    assert [s for s, o in owners.items() if o is None] == [0]  # only the recovery passphrase
    assert cvm.unlocking_tokens() == [b_token]
    booted = cvm.simulate_reboot()
    assert booted["uki"] == "\\EFI\\Linux\\uki-c.efi"
    assert cvm.unlocking_tokens() == [tokens["uki-c.efi"]]
    assert cvm.recovery_unlocks()


CONFIRM_CRASHES = [(step, where) for step in CONFIRM_STEPS for where in ("before", "inside", "after")]


@pytest.fixture
def sandbox_keeping_none(tmp_path):
    cvm = built_or_skip(tmp_path / "cvm", keep_previous=0)
    try:
        yield cvm
    finally:
        cvm.close()


@pytest.mark.parametrize("step,where", CONFIRM_CRASHES)
def test_confirm_killed_at_every_step_then_rerun(sandbox_keeping_none, step, where):
    """keep_previous 0: confirming B retires A.  Killed anywhere, a rerun promotes B and
    retires A completely (token, keyslot) and B keeps unlocking."""
    cvm = sandbox_keeping_none
    cvm.install_uki("b")
    staged = run_update(cvm.config())
    cvm.simulate_reboot()
    b_token = staged.sealed[0]["token"]
    killed = cli(cvm, "confirm", env={"RHEL_CVM_UPDATE_CRASH_AT": f"{step}:{where}"})
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    cvm.process_killed()
    assert cvm.plugin_unlocks(b_token)
    rerun = cli(cvm, "confirm", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert Journal(str(cvm.state_dir)).pending is None
    assert {int(t) for t in cvm.luks_json()["tokens"]} == {b_token}
    assert keyslot_owners(cvm) == {0: None, staged.sealed[0]["keyslot"]: b_token}
    assert read_u16_var(cvm.efivars, "BootOrder")[0] == int(staged.staged["entry"][4:], 16)
    assert cvm.unlocking_tokens() == [b_token]
    assert cvm.simulate_reboot()["uki"] == "\\EFI\\Linux\\uki-b.efi"
    assert cvm.unlocking_tokens() == [b_token]


def test_fifty_update_cycles_stay_bounded(sandbox):
    """A cycle: dnf installs a new UKI build (and erases the one before the previous),
    update, reboot (SIMULATED FIRMWARE, log rebuilt with pesign digests), confirm."""
    cvm = sandbox
    config = cvm.config()
    installed = ["a"]
    for cycle in range(50):
        name = f"v{cycle:02d}"
        cvm.install_uki(name)
        installed.append(name)
        if len(installed) > 3:
            cvm.remove_uki(installed.pop(0))
        update = run_update(config)
        assert update.outcome == "staged", (cycle, update.to_json())
        booted = cvm.simulate_reboot()
        assert booted["uki"] == f"\\EFI\\Linux\\uki-{name}.efi"
        confirmed = run_confirm(config)
        assert confirmed.outcome == "confirmed", (cycle, confirmed.to_json())
        owners = keyslot_owners(cvm)
        tokens = cvm.luks_json()["tokens"]
        managed = [e for e in efibootmgr(cvm).splitlines() if "RHEL CVM UKI" in e]
        assert len(owners) <= 3 and len(tokens) <= 2 and len(managed) <= 2, (cycle, owners, managed)
        # keep_previous 1: exactly the booted chain and the one booted before it.
        assert set(tokens_by_uki(cvm)) == {f"uki-{installed[-2]}.efi", f"uki-{name}.efi"}, cycle
        if cycle % 10 == 9:
            assert cvm.unlocking_tokens() == [tokens_by_uki(cvm)[f"uki-{name}.efi"]]
    assert cvm.recovery_unlocks()


def test_shim_update_seals_every_uki_again_and_the_real_next_boot_unlocks(sandbox):
    """shim-x64 replaced in place by another build (Debian's shim-unsigned, captured booting
    UKI A as sb-off-shim-b-uki-a): the booted UKI needs a new chain; the copy of the booted
    shim the tool kept lets the log source predict it."""
    cvm = sandbox
    assert run_confirm(cvm.config()).outcome == "nothing-to-do"  # the boot-time run keeps the shim copy
    unsigned = "/usr/lib/shim/shimx64.efi"
    if not os.path.exists(unsigned):
        pytest.skip("shim-unsigned is not installed")
    shutil.copyfile(unsigned, cvm.shim)
    status = cli(cvm, "status", "--json")
    assert status.returncode == 1 and not json.loads(status.stdout)["next_boot"]["will_unlock"]
    result = run_update(cvm.config())
    assert result.shim_changed and result.outcome == "staged" and result.staged is None
    (sealed,) = result.sealed
    assert sealed["uki"].endswith("uki-a.efi") and sealed["source"] == "log"
    assert cli(cvm, "status").returncode == 0
    booted = cvm.simulate_reboot()
    assert booted["log"] == "real log of captured boot sb-off-shim-b-uki-a"
    assert cvm.unlocking_tokens() == [sealed["token"]]
    confirmed = run_confirm(cvm.config())
    assert confirmed.outcome == "confirmed"
    # The old shim's chain can never boot again: retired whatever keep_previous says.
    assert [r["token"] for r in confirmed.removed] == [0]
    assert [int(t) for t in cvm.luks_json()["tokens"]] == [sealed["token"]]


class RecordingHooks:
    def __init__(self):
        self.events = []

    def step(self, name, detail=""):
        self.events.append(name)

    def critical(self):
        import contextlib

        @contextlib.contextmanager
        def section():
            self.events.append("critical{")
            try:
                yield
            finally:
                self.events.append("}")
        return section()


def test_hooks_hear_every_step_and_seal_and_stage_are_critical(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    hooks = RecordingHooks()
    run_update(cvm.config(), hooks=hooks)
    assert hooks.events == ["critical{", "}", "detect", "predict", "critical{", "seal", "stage", "remove", "}"]
    assert [e for e in hooks.events if e.isalpha()] == list(UPDATE_STEPS)
    cvm.simulate_reboot()
    hooks = RecordingHooks()
    run_confirm(cvm.config(), hooks=hooks)
    assert hooks.events == ["critical{", "}", "detect", "critical{", "confirm", "remove", "}"]
    assert [e for e in hooks.events if e.isalpha()] == list(CONFIRM_STEPS)


@pytest.mark.parametrize("step,where", UPDATE_CRASHES)
def test_power_cut_right_after_a_killed_update_still_unlocks(sandbox, step, where):
    """No rerun: the VM loses power at once.  Whatever the firmware boots next must unlock
    with systemd's plugin, and update + confirm in that boot must clean up."""
    cvm = sandbox
    booted_b_then_c_installed_and_a_erased(cvm)
    killed = cli(cvm, "update", env={"RHEL_CVM_UPDATE_CRASH_AT": f"{step}:{where}"})
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    cvm.process_killed()
    booted = cvm.simulate_reboot()
    assert cvm.unlocking_tokens(), booted
    assert cli(cvm, "update").returncode == 0
    confirmed = cli(cvm, "confirm")
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    owners = keyslot_owners(cvm)
    journal_tokens = sorted(tokens_by_uki(cvm).values())
    assert sorted(o for o in owners.values() if o is not None) == journal_tokens
    assert [s for s, o in owners.items() if o is None] == [0]
    status = cli(cvm, "status")
    assert status.returncode == 0, status.stdout


def test_refused_prediction_seals_nothing_and_says_why(sandbox):
    """The event log no longer explains the live PCRs (boot B's real log while the TPM holds
    boot A): neither source is trusted, nothing is written, status says why."""
    cvm = sandbox
    cvm.install_uki("b")
    shutil.copyfile(BOOTS / "sb-off-uki-b" / "eventlog.bin", cvm.event_log)
    header = header_bytes(str(cvm.luks))
    refused = cli(cvm, "update", "--json")
    assert refused.returncode == 1
    result = json.loads(refused.stdout)
    assert result["outcome"] == "refused" and "neither source" in result["reason"]
    assert header_bytes(str(cvm.luks)) == header and read_u16_var(cvm.efivars, "BootNext") is None
    status = json.loads(cli(cvm, "status", "--json").stdout)
    assert any("update refused" in a for a in status["attention"])


def test_damaged_journal_stops_the_transaction(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    assert cli(cvm, "update").returncode == 0
    journal = json.loads((cvm.state_dir / "journal.json").read_text())
    key = next(iter(journal["chains"]))
    journal["chains"][key]["token"] = "0"
    (cvm.state_dir / "journal.json").write_text(json.dumps(journal))
    header = header_bytes(str(cvm.luks))
    for command in ("update", "confirm"):
        stopped = cli(cvm, command)
        assert stopped.returncode == 4 and "is damaged (fields token)" in stopped.stderr
    (cvm.state_dir / "journal.json").write_text("{not json")
    assert cli(cvm, "update").returncode == 4
    assert header_bytes(str(cvm.luks)) == header
    status = cli(cvm, "status")
    assert status.returncode == 2 and "ERROR:" in status.stdout and "Tokens:" in status.stdout


def test_settle_waits_for_a_quiet_directory_then_updates(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    settled = cli(cvm, "update", "--settle", "0.3", "--json")
    assert settled.returncode == 0, settled.stderr
    assert json.loads(settled.stdout)["outcome"] == "staged"


def test_erasing_a_kept_kernel_removes_its_boot_entry_token_and_keyslot(sandbox):
    cvm = sandbox
    for name in ("b", "c"):
        cvm.install_uki(name)
        run_update(cvm.config())
        cvm.simulate_reboot()
        assert run_confirm(cvm.config()).outcome == "confirmed"
    tokens = tokens_by_uki(cvm)
    assert set(tokens) == {"uki-b.efi", "uki-c.efi"}  # A retired: keep_previous is 1
    b_entries = [line.split()[0] for line in efibootmgr(cvm).splitlines() if "uki-b.efi" in line.replace(".", "")
                 or "u.k.i.-.b" in line]
    assert len(b_entries) == 1
    cvm.remove_uki("b")
    result = run_update(cvm.config())
    assert result.outcome == "removed"
    assert result.removed == [{"uki": str(cvm.uki_dir / "uki-b.efi"), "token": tokens["uki-b.efi"],
                               "keyslot": result.removed[0]["keyslot"], "entries": [b_entries[0].rstrip("*")]}]
    listing = efibootmgr(cvm)
    assert b_entries[0].rstrip("*") not in listing
    order = [line for line in listing.splitlines() if line.startswith("BootOrder:")][0]
    assert b_entries[0][4:8] not in order
    assert set(keyslot_owners(cvm).values()) == {None, tokens["uki-c.efi"]}
    csv = (cvm.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes().decode("utf-16")
    assert "uki-c.efi" in csv and "uki-b.efi" not in csv
    assert cvm.unlocking_tokens() == [tokens["uki-c.efi"]]


@pytest.mark.parametrize("keep_previous", [0, 2])
def test_keep_previous_chains_survive_confirmation(tmp_path, keep_previous):
    cvm = built_or_skip(tmp_path / "cvm", keep_previous=keep_previous)
    try:
        booted = ["a"]
        for name in ("k1", "k2", "k3", "k4"):
            cvm.install_uki(name)
            run_update(cvm.config())
            cvm.simulate_reboot()
            assert run_confirm(cvm.config()).outcome == "confirmed"
            booted.append(name)
            kept = {f"uki-{n}.efi" for n in booted[-(keep_previous + 1):]}
            assert set(tokens_by_uki(cvm)) == kept, name
            assert len(cvm.luks_json()["tokens"]) == len(kept)
        assert cvm.unlocking_tokens() == [tokens_by_uki(cvm)["uki-k4.efi"]]
    finally:
        cvm.close()


def test_many_new_ukis_seal_only_the_newest_that_can_be_kept(sandbox):
    # A LUKS2 header holds about ten tokens: with keep_previous 1, one update of five new
    # UKIs seals the two newest and says why the others got no key.
    cvm = sandbox
    for index, name in enumerate(["v1", "v2", "v3", "v4", "b"]):
        path = cvm.install_uki(name)
        os.utime(path, (1_700_000_000 + index, 1_700_000_000 + index))
    result = cli(cvm, "update", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    sealed = sorted(os.path.basename(s["uki"]) for s in out["sealed"])
    assert sealed == ["uki-b.efi", "uki-v4.efi"]
    assert sum("not sealed" in n for n in out["notes"]) == 3
    assert len(cvm.luks_json()["tokens"]) == 3  # cryptenroll's + two


def test_sources_that_disagree_seal_nothing_and_status_names_both(sandbox, monkeypatch):
    """Fault injection: a second source that reproduces this boot but predicts another PCR7
    (the log source's own answer with PCR7 zeroed).  Nothing is written anywhere."""
    import dataclasses

    import rhel_cvm_update.predict as predict

    def disagreeing_model(config, live, banks, uki, next_shim, booted_shim, inputs):
        prediction = predict._from_log(config, config.event_log, live, banks, uki, next_shim,
                                       booted_shim or predict.shim_path(config), inputs)
        return dataclasses.replace(prediction, source="model", banks={
            b: {**v, 7: bytes(len(v[7]))} for b, v in prediction.banks.items()})

    cvm = sandbox
    cvm.install_uki("b")
    monkeypatch.setattr(predict, "_from_model", disagreeing_model)
    header, variables = header_bytes(str(cvm.luks)), efivars_snapshot(cvm)
    result = run_update(cvm.config())
    assert result.outcome == "refused" and result.refusal == "sources-disagree"
    assert "log PCR4" in result.reason and "model PCR4" in result.reason
    assert "first differing event: PCR7" in result.reason
    assert header_bytes(str(cvm.luks)) == header and efivars_snapshot(cvm) == variables
    status = cli(cvm, "status", "--json")
    assert status.returncode == 1
    attention = " ".join(json.loads(status.stdout)["attention"])
    assert "disagree" in attention and "0" * 64 in attention


def test_shim_resigned_in_place_is_a_shim_change(sandbox, tmp_path):
    """The same shim with other signatures (the committed test CA's instead of Microsoft's):
    its Authenticode digest, and so PCR4, stays; PCR7 would change under Secure Boot (the VM
    scenario 'root: SB on, shim re-signed' boots it).  Status must not promise the next boot,
    update must seal the UKIs again for the new signers, and once that boot is confirmed the
    re-signed shim is the booted one."""
    from tests.vm import signing

    cvm = sandbox
    assert run_confirm(cvm.config()).outcome == "nothing-to-do"  # the boot-time run keeps the shim copy
    resigned = signing.build_shim(cvm.shim, signing.Signing(("ca1",), "ca1"), signing.load_test_cas(),
                                  tmp_path / "shim-ca1.efi")
    before = subprocess.run(["pesign", "-h", "-i", str(cvm.shim)], stdout=subprocess.PIPE, check=True).stdout
    after = subprocess.run(["pesign", "-h", "-i", str(resigned)], stdout=subprocess.PIPE, check=True).stdout
    assert before == after and cvm.shim.read_bytes() != resigned.read_bytes()  # the digest pesign computes stays
    shutil.copyfile(resigned, cvm.shim)
    status = json.loads(cli(cvm, "status", "--json").stdout)
    assert status["exit_code"] == 1 and not status["next_boot"]["will_unlock"]
    assert "re-signed" in status["next_boot"]["why"], status["next_boot"]
    result = run_update(cvm.config())
    assert result.shim_changed and result.outcome == "staged", result
    (sealed,) = result.sealed
    assert sealed["uki"].endswith("uki-a.efi")
    assert cli(cvm, "status").returncode == 0
    cvm.simulate_reboot()
    assert sealed["token"] in cvm.unlocking_tokens()
    confirmed = run_confirm(cvm.config())
    assert confirmed.outcome == "confirmed"
    # The chain sealed for the Microsoft-signed shim cannot boot again: retired.  With Secure
    # Boot off the re-signed shim measures as before, so sealing reused token 0, which the
    # booted chain keeps.
    assert sealed["action"] == "reused" and sealed["token"] == 0
    assert [(r["uki"], r["token"], r["keyslot"]) for r in confirmed.removed] == [(sealed["uki"], None, None)]
    assert 0 in cvm.unlocking_tokens()
    assert run_update(cvm.config()).outcome == "nothing-to-do"
    assert cli(cvm, "status").returncode == 0


def test_shim_change_after_a_kernel_update_keeps_the_new_kernel_next(sandbox, tmp_path):
    """uki-b booted and confirmed, uki-a kept as the previous kernel; then the shim is
    re-signed.  Every kept UKI is sealed again, but the older kernel must not be staged: the
    next boot is BootOrder's head, uki-b (the SB-on root VM once booted uki-a here)."""
    from tests.vm import signing

    cvm = sandbox
    cvm.install_uki("b")
    assert run_update(cvm.config()).outcome == "staged"
    assert cvm.simulate_reboot()["uki"].endswith("uki-b.efi")
    assert run_confirm(cvm.config()).outcome == "confirmed"
    resigned = signing.build_shim(cvm.shim, signing.Signing(("ca1",), "ca1"), signing.load_test_cas(),
                                  tmp_path / "shim-ca1.efi")
    shutil.copyfile(resigned, cvm.shim)
    result = run_update(cvm.config())
    assert result.shim_changed and result.staged is None, result
    assert sorted(os.path.basename(s["uki"]) for s in result.sealed) == ["uki-a.efi", "uki-b.efi"]
    status = json.loads(cli(cvm, "status", "--json").stdout)
    assert status["boot_next"] is None and status["exit_code"] == 0, status["attention"]
    assert status["next_boot"]["will_unlock"] and status["next_boot"]["uki"].endswith("uki-b.efi"), status
    assert cvm.simulate_reboot()["uki"].endswith("uki-b.efi")
    assert run_confirm(cvm.config()).outcome == "confirmed"
    assert cli(cvm, "status").returncode == 0
