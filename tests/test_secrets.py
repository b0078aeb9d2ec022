"""rhel_cvm_update.secrets: wiping, systemd's base64 passphrase, non-dumpable while held."""

import base64
import os

from hypothesis import given
from hypothesis import strategies as st

from rhel_cvm_update.secrets import Secret, is_dumpable


@given(st.binary(max_size=100))
def test_base64_matches_the_standard_encoding(data):
    with Secret(bytearray(data)) as secret, secret.base64() as encoded:
        assert bytes(encoded.data) == base64.b64encode(data)


def test_wipe_zeroes_the_buffer_and_forgets_it():
    buf = bytearray(b"secret bytes")
    secret = Secret(buf)
    secret.wipe()
    assert buf == bytearray(len(buf))
    assert repr(secret) == "<Secret wiped>"


def test_process_is_not_dumpable_while_a_secret_is_held():
    assert is_dumpable()
    with Secret.random(32) as first:
        assert len(first) == 32 and not is_dumpable()
        with Secret(bytearray(b"x")):
            assert not is_dumpable()
        assert not is_dumpable()
    assert is_dumpable()


def test_read_from_fd_reads_to_eof_keeping_newlines():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"pass\nphrase\n")
    os.close(write_fd)
    try:
        with Secret.read_from_fd(read_fd) as secret:
            assert bytes(secret.data) == b"pass\nphrase\n"
    finally:
        os.close(read_fd)
