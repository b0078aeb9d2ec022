"""Build the project's RPM and small stand-in kernel packages with the real rpmbuild.

On Debian, rpm's database knows nothing of the host's packages, so builds and installs
use --nodeps (as `make rpm` does); everything else is rpm's own behaviour.
"""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "rpm" / "rhel-cvm-update.spec"
RPMLINT_CONFIG = REPO / "rpm" / "rpmlint.toml"
NAME = "rhel-cvm-update"


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip("not installed: " + ", ".join(missing))


def run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 600)
    return subprocess.run(list(argv), **kwargs)


def build_project_rpm(topdir: Path) -> Dict[str, Path]:
    """sdist of the working tree, then rpmbuild -ba: the binary and source RPM paths."""
    sources = topdir / "SOURCES"
    sources.mkdir(parents=True)
    sdist = run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                 "print(build_meta.build_sdist(sys.argv[1]))", str(sources)], cwd=str(REPO))
    assert sdist.returncode == 0, sdist.stderr
    build = run(["rpmbuild", "-ba", "--nodeps", "--define", "_topdir %s" % topdir, str(SPEC)])
    assert build.returncode == 0, "rpmbuild failed:\n" + build.stdout[-3000:] + build.stderr[-3000:]
    binary = sorted((topdir / "RPMS" / "noarch").glob(NAME + "-*.noarch.rpm"))
    source = sorted((topdir / "SRPMS").glob(NAME + "-*.src.rpm"))
    assert len(binary) == 1 and len(source) == 1, (binary, source)
    return {"binary": binary[0], "source": source[0]}


def build_payload_rpm(topdir: Path, name: str, files: Dict[str, bytes]) -> Path:
    """A noarch package shipping ``files`` (absolute path -> content) and nothing else:
    the stand-in for kernel-uki-virt or shim-x64 in a transaction."""
    payload = topdir / ("payload-" + name)
    for path, content in files.items():
        target = payload / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    spec = topdir / (name + ".spec")
    spec.write_text(textwrap.dedent("""\
        Name: {name}
        Version: 1
        Release: 1
        Summary: stand-in package for the packaging tests
        License: MIT
        BuildArch: noarch
        %description
        Ships files under the paths rhel-cvm-update's file triggers watch.
        %install
        cp -a {payload}/. %{{buildroot}}/
        %files
        {files}
        """).format(name=name, payload=payload, files="\n".join(files)))
    build = run(["rpmbuild", "-bb", "--nodeps", "--define", "_topdir %s" % (topdir / "top"), str(spec)])
    assert build.returncode == 0, build.stderr[-3000:]
    return next((topdir / "top" / "RPMS" / "noarch").glob(name + "-1-1.noarch.rpm"))


@pytest.fixture(scope="session")
def project_rpm(tmp_path_factory) -> Dict[str, Path]:
    require("rpmbuild")
    return build_project_rpm(tmp_path_factory.mktemp("rpmbuild"))
