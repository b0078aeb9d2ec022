# make setup : Debian packages (as root, when apt-get exists) + .venv (Python 3.11) + .venv39 (Python 3.9)
# make test  : the whole suite on both Pythons (VM tests on 3.11 only, beside the 3.9 suite; PYTEST_ARGS to narrow)
# make demo  : a kernel update on a sandbox CVM (swtpm vTPM, LUKS2 image, real shim and UKIs), step by step
SHELL := /bin/bash
PY311 ?= $(shell command -v python3.11 || echo $(HOME)/.pyenv/versions/3.11.7/bin/python3.11)
PY39  ?= $(shell ls -d $(HOME)/.pyenv/versions/3.9*/bin/python3.9 2>/dev/null | tail -1 || command -v python3.9)
PYTEST_ARGS ?=
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev cryptsetup-bin efibootmgr pesign sbsigntool \
	osslsigncode ovmf qemu-system-x86 shim-signed shim-unsigned systemd-boot-efi mtools rpm rpmlint gdisk \
	dosfstools busybox-static cpio build-essential pkg-config libsystemd-dev libgirepository1.0-dev \
	libcairo2-dev xz-utils zstd efitools openssl binutils util-linux dnf dnf-plugins-core man-db groff-base bash-completion dbus debootstrap qemu-utils

.PHONY: setup apt venvs test test311 test39 bench clean demo rpm vm-test
setup: apt venvs

apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; \
	else echo "not root or no apt-get: install the Debian packages yourself: $(APT_PACKAGES)"; fi

venvs: .venv/.installed .venv39/.installed

.venv/.installed: pyproject.toml
	$(PY311) -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[test]'
	touch $@

.venv39/.installed: pyproject.toml
	$(PY39) -m venv .venv39
	.venv39/bin/pip install -q --upgrade pip
	.venv39/bin/pip install -q -e '.[test]'
	touch $@

# In the order that fits 2 cores: the unit suite on 3.11 first (it fills cache/ with the
# kernels and UKIs both Pythons read), then the VM tests (one QEMU TCG thread busy) beside the
# 3.9 suite on the other core; the 3.9 output is printed when both are done.
test: .venv/.installed .venv39/.installed
	.venv/bin/python -m pytest -q -m 'not vm' $(PYTEST_ARGS)
	@mkdir -p build; \
	$(MAKE) --no-print-directory test39 > build/test39.log 2>&1 & py39=$$!; \
	.venv/bin/python -m pytest -q -rs -m vm $(PYTEST_ARGS); vm=$$?; \
	wait $$py39; py39=$$?; echo "== Python 3.9 (-m 'not vm'), run beside the VM tests: exit $$py39 =="; \
	cat build/test39.log; exit $$(( vm != 0 || py39 != 0 ))

test311: .venv/.installed
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# The VM tests boot real firmware and are the same on both Pythons; run them once (on 3.11).
# No .pytest_cache: `make test` runs this beside another pytest in the same checkout.
test39: .venv39/.installed
	.venv39/bin/python -m pytest -q -p no:cacheprovider -m 'not vm' $(PYTEST_ARGS)

# The end-to-end VM scenarios only (tests/vm/test_e2e_*.py; guest image cached under cache/guest/).
vm-test: .venv/.installed
	.venv/bin/python -m pytest -q -rs tests/vm/test_e2e_root.py $(PYTEST_ARGS)

demo: apt .venv/.installed
	.venv/bin/python demo/run.py

bench: .venv/.installed
	.venv/bin/python -m benchmarks

clean:
	rm -rf .venv .venv39 build *.egg-info .pytest_cache .hypothesis

# The RPM (noarch) from the sdist.  --nodeps: on Debian, rpm's database does not know
# the build host's packages.  RPM_TOPDIR holds SOURCES, RPMS, SRPMS.
RPM_TOPDIR ?= $(CURDIR)/build/rpm
# Extra rpmbuild options, e.g. the e2e guest's (Debian's) Python path:
#   make rpm RPM_DEFINES='--define "python3_sitelib /usr/lib/python3/dist-packages"'
RPM_DEFINES ?=
rpm: .venv/.installed
	rm -rf $(RPM_TOPDIR) && mkdir -p $(RPM_TOPDIR)/SOURCES
	.venv/bin/python -c 'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])' $(RPM_TOPDIR)/SOURCES
	rpmbuild -ba --nodeps --define "_topdir $(RPM_TOPDIR)" $(RPM_DEFINES) rpm/rhel-cvm-update.spec
