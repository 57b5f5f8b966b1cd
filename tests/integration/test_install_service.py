"""``make install-service`` and ``reflexd install-service``, staged under a temporary DESTDIR.

A fresh venv with torch takes about a minute to build, so the venv under the staged PREFIX is made
here first, seeing this test run's packages through a .pth file: the install then takes the path
of an upgrade (an existing venv at PREFIX) and pip installs reflexd itself, from a clean copy of
the source tree, with its dependencies already satisfied. Everything else is what a host gets.
"""

from __future__ import annotations

import ast
import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from reflexd.tools.install import DEFAULT_PREFIX, InstallError, service_config, unit_text

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = "--pip-arg=--no-index --pip-arg=--no-build-isolation"


def has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def staged_venv(destdir: Path) -> Path:
    """A venv at DESTDIR/opt/reflexd that sees this interpreter's packages (torch included)."""
    venv = destdir / DEFAULT_PREFIX.lstrip("/")
    venv.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    paths = sysconfig.get_paths()
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip())
    (site / "_reflexd_test_deps.pth").write_text(f"{paths['purelib']}\n{paths['platlib']}\n")
    return venv


def verify(destdir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify of the installed units, their /opt/reflexd mapped into DESTDIR (where the
    staged console script is) and nothing else changed."""
    checked = tmp_path / "verify"
    checked.mkdir()
    for unit in ("reflexd.service", "reflexd.socket"):
        text = (destdir / "etc/systemd/system" / unit).read_text()
        (checked / unit).write_text(text.replace(DEFAULT_PREFIX + "/", str(destdir / DEFAULT_PREFIX.lstrip("/")) + "/"))
    return subprocess.run(
        ["systemd-analyze", "verify", str(checked / "reflexd.service"), str(checked / "reflexd.socket")],
        capture_output=True, text=True, timeout=120,
    )


def test_install_service_lays_down_a_venv_units_and_config(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    dest = tmp_path / "stage"
    venv = staged_venv(dest)
    done = subprocess.run(
        ["make", "--no-print-directory", "install-service", f"DESTDIR={dest}", f"PYTHON={sys.executable}",
         f"INSTALL_ARGS={OFFLINE}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    # the console script, where the unit runs it, naming the venv it will run in
    script = venv / "bin" / "reflexd"
    assert os.access(script, os.X_OK)
    assert script.read_text().splitlines()[0] == f"#!{DEFAULT_PREFIX}/bin/python"
    assert str(dest) not in (venv / "pyvenv.cfg").read_text()
    python = str(venv / "bin" / "python")
    version = subprocess.run([python, str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("reflexd "), version.stderr
    where = subprocess.run([python, "-c", "import reflexd; print(reflexd.__file__)"], capture_output=True, text=True)
    assert where.stdout.startswith(str(venv / "lib")), where  # installed, not the source tree
    dist = next((venv / "lib").glob("python3*/site-packages/reflexd-*.dist-info"))
    direct = json.loads((dist / "direct_url.json").read_text()) if (dist / "direct_url.json").exists() else {}
    assert not direct.get("dir_info", {}).get("editable"), direct

    # the units point at it; the snippets are the shipped ones
    etc = dest / "etc"
    service = (etc / "systemd/system/reflexd.service").read_text()
    assert f"ExecStart={DEFAULT_PREFIX}/bin/reflexd run --config ${{REFLEXD_CONFIG}}" in service
    assert "/usr/bin/reflexd" not in service
    assert (etc / "systemd/system/reflexd.socket").read_text() == (ROOT / "systemd/reflexd.socket").read_text()
    assert (etc / "sysusers.d/reflexd.conf").read_text() == (ROOT / "systemd/reflexd.sysusers").read_text()
    assert (etc / "tmpfiles.d/reflexd.conf").read_text() == (ROOT / "systemd/reflexd.tmpfiles").read_text()

    # the documented default config, with the service's group given the socket
    config = etc / "reflexd/reflexd.yaml"
    shipped = yaml.safe_load((ROOT / "configs/reflexd.yaml").read_text())
    installed = yaml.safe_load(config.read_text())
    assert installed["socket"]["group"] == "reflexd"
    installed["socket"]["group"] = shipped["socket"]["group"]
    assert installed == shipped
    check = subprocess.run([python, str(script), "check-config", "--json", str(config)], capture_output=True, text=True)
    report = json.loads(check.stdout)
    if has_group("reflexd"):
        assert check.returncode == 0 and report["ok"], report
    else:  # no reflexd group on this machine (systemd-sysusers makes it on a host): the one complaint
        assert check.returncode == 78 and report["problems"] == ["socket.group: no group named 'reflexd' on this host"]

    # modes: readable by the service user, writable by root alone
    for path in [dest, *dest.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o022, f"{path} is {mode:04o}"
        assert mode & 0o004 and (not path.is_dir() or mode & 0o001), f"{path} is {mode:04o}"
    snippets = [etc / "sysusers.d/reflexd.conf", etc / "tmpfiles.d/reflexd.conf"]
    for path in [config, *(etc / "systemd/system").iterdir(), *snippets]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

    # installing again (the subcommand this time) upgrades the venv and keeps an edited config
    config.write_text(config.read_text() + "\n# edited on this host\n")
    edited = config.read_text()
    (etc / "systemd/system/reflexd.service").write_text("stale\n")
    again = subprocess.run(
        [str(Path(sys.executable).parent / "reflexd"), "install-service", "--destdir", str(dest), "--torch-index", "",
         *OFFLINE.split()],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text() == edited and f"kept {config}" in again.stdout
    assert (etc / "systemd/system/reflexd.service").read_text() == service

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the installed units were not verified")
    checked = verify(dest, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "reflexd" not in checked.stderr, checked.stderr  # warnings (a setting ignored) exit 0 too


def test_another_prefix_is_written_into_the_units() -> None:
    shipped = (ROOT / "systemd/reflexd.service").read_text()
    moved = unit_text(shipped, "/srv/reflexd/")
    commands = [line for line in moved.splitlines() if line.startswith("Exec") and "reflexd " in line]
    assert len(commands) == 3
    assert all(line.split("=", 1)[1].startswith("/srv/reflexd/bin/reflexd ") for line in commands)
    assert unit_text(shipped, DEFAULT_PREFIX) == shipped
    with pytest.raises(InstallError, match="no longer runs"):
        unit_text("[Service]\nExecStart=/usr/bin/reflexd run\n", "/srv/reflexd")


def test_the_service_config_changes_only_the_sockets_group() -> None:
    text = (ROOT / "configs/reflexd.yaml").read_text()
    changed = service_config(text)
    diff = [(a, b) for a, b in zip(text.splitlines(), changed.splitlines()) if a != b]
    assert len(diff) == 1 and diff[0][0] == "  group: null" and diff[0][1].startswith("  group: reflexd")
    with pytest.raises(InstallError):
        service_config("socket:\n  path: /x\n")


def imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    return imported


def test_the_installer_uses_the_standard_library_only() -> None:
    """make install-service runs it with the system's python3, before reflexd or its dependencies exist;
    of reflexd it uses errors.py, which it reads from its file then, and which needs nothing more."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert {m.split(".")[0] for m in imports(ROOT / "daemon/tools/install.py")} - stdlib == {"reflexd"}
    assert {m for m in imports(ROOT / "daemon/tools/install.py") if m.startswith("reflexd")} == {"reflexd.errors"}
    assert {m.split(".")[0] for m in imports(ROOT / "daemon/errors.py")} <= stdlib
    # -S: no site-packages, so no reflexd and none of its dependencies, as on a fresh host
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "daemon/tools/install.py"), "--source", "/nonexistent"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1 and "--source DIR" in done.stderr, done.stderr


def test_without_a_source_tree_it_says_how_to_name_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "reflexd"), "install-service", "--source", str(tmp_path),
         "--destdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and "--source DIR" in done.stderr, done.stderr
