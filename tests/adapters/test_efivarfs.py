"""rhel_cvm_update.adapters.efivarfs over a directory laid out like efivarfs.

The immutable flag is checked with lsattr/chattr (e2fsprogs), not with the adapter's own
ioctl code.  Failures that root cannot provoke on a plain directory are produced by the real
kernel: a full tmpfs (ENOSPC), a read-only bind mount (EROFS), and a process without
CAP_LINUX_IMMUTABLE (EPERM), each in a private mount namespace or a child process.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from rhel_cvm_update.adapters.efivarfs import EfiVarFs, EfiVariable
from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE

GLOBAL = EFI_GLOBAL_VARIABLE
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_raw(directory, name, guid, raw: bytes):
    path = os.path.join(str(directory), f"{name}-{guid}")
    with open(path, "wb") as f:
        f.write(raw)
    return path


def is_immutable(path) -> bool:
    out = subprocess.run(["lsattr", "-d", path], check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return "i" in out.split()[0]


def chattr_supported(directory) -> bool:
    if shutil.which("chattr") is None or shutil.which("lsattr") is None:
        return False
    probe = os.path.join(str(directory), "probe")
    open(probe, "wb").close()
    ok = subprocess.run(["chattr", "+i", probe], stderr=subprocess.DEVNULL).returncode == 0
    if ok:
        subprocess.run(["chattr", "-i", probe], check=True)
    os.unlink(probe)
    return ok


def test_get_reads_attribute_prefix_and_data(tmp_path):
    write_raw(tmp_path, "BootOrder", GLOBAL, b"\x07\x00\x00\x00\x01\x00\x00\x00")
    var = EfiVarFs(str(tmp_path)).get("BootOrder", GLOBAL)
    assert var == EfiVariable("BootOrder", GLOBAL, 7, b"\x01\x00\x00\x00")


def test_get_missing_is_none(tmp_path):
    assert EfiVarFs(str(tmp_path)).get("BootNext", GLOBAL) is None


def test_get_file_shorter_than_prefix_is_format_error(tmp_path):
    write_raw(tmp_path, "BootNext", GLOBAL, b"\x07\x00")
    with pytest.raises(FormatError) as info:
        EfiVarFs(str(tmp_path)).get("BootNext", GLOBAL)
    assert "BootNext-8be4df61" in str(info.value) and "Attributes" in str(info.value)


def test_list_names_and_guids_and_skips_other_files(tmp_path):
    other = uuid.UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
    write_raw(tmp_path, "Boot0001", GLOBAL, b"\x07\0\0\0")
    write_raw(tmp_path, "MokListRT", other, b"\x06\0\0\0")
    (tmp_path / "README").write_text("not a variable")
    (tmp_path / "Boot0002-8BE4DF61-93CA-11D2-AA0D-00E098032B8C").write_bytes(b"\x07\0\0\0")
    assert EfiVarFs(str(tmp_path)).list() == [("Boot0001", GLOBAL), ("MokListRT", other)]


def test_set_creates_file_with_prefix_in_one_write(tmp_path):
    store = EfiVarFs(str(tmp_path))
    store.set("BootNext", GLOBAL, b"\x05\x00")
    assert (tmp_path / f"BootNext-{GLOBAL}").read_bytes() == b"\x07\0\0\0\x05\x00"


def test_set_replace_with_shorter_value_leaves_no_stale_bytes(tmp_path):
    store = EfiVarFs(str(tmp_path))
    store.set("BootOrder", GLOBAL, b"\x01\x00\x02\x00\x03\x00")
    store.set("BootOrder", GLOBAL, b"\x02\x00", attributes=0x7)
    assert (tmp_path / f"BootOrder-{GLOBAL}").read_bytes() == b"\x07\0\0\0\x02\x00"


def test_delete(tmp_path):
    store = EfiVarFs(str(tmp_path))
    store.set("Boot0003", GLOBAL, b"x\0")
    assert store.delete("Boot0003", GLOBAL) is True
    assert store.get("Boot0003", GLOBAL) is None
    assert store.delete("Boot0003", GLOBAL) is False


def test_bad_variable_names_are_refused(tmp_path):
    with pytest.raises(ValueError):
        EfiVarFs(str(tmp_path)).set("../etc", GLOBAL, b"")


@pytest.mark.root
def test_immutable_variable_is_replaced_and_flag_restored(tmp_path):
    if not chattr_supported(tmp_path):
        pytest.skip("chattr/lsattr or inode flags unavailable on this filesystem")
    path = write_raw(tmp_path, "MokSBState", GLOBAL, b"\x07\0\0\0\x01")
    subprocess.run(["chattr", "+i", path], check=True)
    try:
        EfiVarFs(str(tmp_path)).set("MokSBState", GLOBAL, b"\x00")
        assert is_immutable(path)
        with open(path, "rb") as f:
            assert f.read() == b"\x07\0\0\0\x00"
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.root
def test_immutable_variable_is_deleted(tmp_path):
    if not chattr_supported(tmp_path):
        pytest.skip("chattr/lsattr or inode flags unavailable on this filesystem")
    path = write_raw(tmp_path, "Boot0009", GLOBAL, b"\x07\0\0\0x")
    subprocess.run(["chattr", "+i", path], check=True)
    assert EfiVarFs(str(tmp_path)).delete("Boot0009", GLOBAL) is True
    assert not os.path.exists(path)


def run_adapter_child(script: str, prefix_argv=()):
    """Run a Python snippet using the adapter in a child (optionally under unshare/setpriv)."""
    code = "import sys; sys.path.insert(0, %r)\n" % REPO + textwrap.dedent(script)
    argv = list(prefix_argv) + [sys.executable, "-c", code]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


CHILD_WRITE = """
    import uuid
    from rhel_cvm_update.adapters.efivarfs import EfiVarFs
    from rhel_cvm_update.errors import MachineError
    store = EfiVarFs(sys.argv[1] if len(sys.argv) > 1 else {directory!r})
    try:
        store.set({name!r}, uuid.UUID({guid!r}), {data!r})
    except MachineError as e:
        print("MachineError:", e)
    else:
        print("written")
"""


def need_tools(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"tools not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.mark.root
def test_full_variable_store_gives_enospc_and_creates_nothing(tmp_path):
    need_tools("unshare", "mount")
    store_dir = tmp_path / "efivars"
    store_dir.mkdir()
    # A 4 KiB tmpfs filled by one existing variable: the next new variable has no room.
    script = f"""
        import os, subprocess, uuid
        d = {str(store_dir)!r}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,nr_inodes=16", "none", d], check=True)
        with open(os.path.join(d, "BootOrder-{GLOBAL}"), "wb") as f:
            f.write(b"\\x07\\0\\0\\0" + b"\\x01\\0" * 2046)
        from rhel_cvm_update.adapters.efivarfs import EfiVarFs
        from rhel_cvm_update.errors import MachineError
        store = EfiVarFs(d)
        before = sorted(os.listdir(d))
        try:
            store.set("Boot0001", uuid.UUID("{GLOBAL}"), b"\\x01" * 8000)
        except MachineError as e:
            print("MachineError:", e)
        print("unchanged" if sorted(os.listdir(d)) == before else "changed", sorted(os.listdir(d)))
        print(store.get("BootOrder", uuid.UUID("{GLOBAL}")).data == b"\\x01\\0" * 2046)
    """
    proc = run_adapter_child(script, ["unshare", "-m", "--propagation", "private"])
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot mount tmpfs in a mount namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "full (ENOSPC)" in proc.stdout
    assert "unchanged" in proc.stdout and proc.stdout.rstrip().endswith("True")


@pytest.mark.root
def test_read_only_store_gives_clear_error_and_keeps_variable(tmp_path):
    need_tools("unshare", "mount")
    store_dir = tmp_path / "efivars"
    store_dir.mkdir()
    write_raw(store_dir, "BootOrder", GLOBAL, b"\x07\0\0\0\x01\x00")
    script = f"""
        import subprocess, uuid
        d = {str(store_dir)!r}
        subprocess.run(["mount", "--bind", d, d], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", d], check=True)
        from rhel_cvm_update.adapters.efivarfs import EfiVarFs
        from rhel_cvm_update.errors import MachineError
        try:
            EfiVarFs(d).set("BootOrder", uuid.UUID("{GLOBAL}"), b"\\x02\\x00")
        except MachineError as e:
            print("MachineError:", e)
    """
    proc = run_adapter_child(script, ["unshare", "-m", "--propagation", "private"])
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot bind-mount in a mount namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "read-only (EROFS)" in proc.stdout
    assert (store_dir / f"BootOrder-{GLOBAL}").read_bytes() == b"\x07\0\0\0\x01\x00"


@pytest.mark.root
def test_immutable_variable_without_cap_linux_immutable_gives_eperm(tmp_path):
    need_tools("setpriv")
    if not chattr_supported(tmp_path):
        pytest.skip("chattr/lsattr or inode flags unavailable on this filesystem")
    path = write_raw(tmp_path, "Boot0004", GLOBAL, b"\x07\0\0\0old")
    subprocess.run(["chattr", "+i", path], check=True)
    try:
        script = CHILD_WRITE.format(directory=str(tmp_path), name="Boot0004", guid=str(GLOBAL),
                                    data=b"new")
        proc = run_adapter_child(script, ["setpriv", "--bounding-set", "-linux_immutable",
                                          "--inh-caps", "-linux_immutable"])
        assert proc.returncode == 0, proc.stderr
        assert "(EPERM)" in proc.stdout
        assert is_immutable(path)
        with open(path, "rb") as f:
            assert f.read() == b"\x07\0\0\0old"
    finally:
        subprocess.run(["chattr", "-i", path], check=True)
