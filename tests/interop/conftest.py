"""Interop tests run this project's code against real systemd (252 on Debian 12) and swtpm."""

from tests.swtpm_fixtures import fresh_swtpm, luks2_image, luks2_template, swtpm  # noqa: F401
