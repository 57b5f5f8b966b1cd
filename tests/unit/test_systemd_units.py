"""The shipped systemd files: the exposure systemd-analyze gives the service, that both units
verify, and that the service, the socket, the snippets and the default config agree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reflexd.config import SocketConfig

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
MAX_EXPOSURE = 1.5
PREFIX = "/opt/reflexd"


def settings(unit: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of each key in order (comments skipped)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def exposure(unit: Path) -> float:
    """systemd-analyze's overall exposure of a unit file (0 safest, 10 least safe)."""
    analyze = systemd_analyze()
    # --offline (systemd 250 and later) rates a unit file without loading it into a running systemd
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=120
    )
    if "offline" in done.stderr and ("unrecognized" in done.stderr or "unknown" in done.stderr):
        pytest.skip(f"this systemd-analyze cannot rate a unit offline: {done.stderr.strip()}")
    level = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)", done.stdout)
    assert level is not None, done.stdout + done.stderr
    return float(level.group(1))


def test_the_shipped_service_is_rated_at_most_1_5() -> None:
    rated = exposure(SYSTEMD / "reflexd.service")
    assert rated <= MAX_EXPOSURE, f"exposure {rated} > {MAX_EXPOSURE}"


def test_with_the_metrics_port_drop_in_it_is_still_at_most_1_5(tmp_path: Path) -> None:
    # a drop-in's lines count as if they came after the unit's own, in its [Service] section
    drop_in = (SYSTEMD / "reflexd-metrics-port.conf").read_text().split("[Service]\n", 1)[1]
    unit = (SYSTEMD / "reflexd.service").read_text().replace("\n[Install]\n", f"\n{drop_in}\n[Install]\n")
    (tmp_path / "reflexd.service").write_text(unit)
    merged = settings(tmp_path / "reflexd.service")
    assert merged["PrivateNetwork"][-1] == "no" and merged["IPAddressAllow"] == ["localhost"]
    rated = exposure(tmp_path / "reflexd.service")
    assert rated <= MAX_EXPOSURE, f"exposure {rated} > {MAX_EXPOSURE}"


def test_both_units_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    # the console script they run, in a stand-in for /opt/reflexd (verify checks that it exists)
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "reflexd").write_text("#!/bin/sh\n")
    (prefix / "bin" / "reflexd").chmod(0o755)
    for unit in ("reflexd.service", "reflexd.socket"):
        (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace(PREFIX + "/", f"{prefix}/"))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "reflexd.service"), str(tmp_path / "reflexd.socket")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "reflexd" not in done.stderr, done.stderr  # a setting systemd ignores is only a warning


def test_the_service_runs_the_installed_console_script() -> None:
    service = settings(SYSTEMD / "reflexd.service")
    commands = service["ExecStartPre"] + service["ExecStart"] + service["ExecReload"]
    ours = [c for c in commands if "reflexd " in c]
    assert len(ours) == 3 and all(c.startswith(f"{PREFIX}/bin/reflexd ") for c in ours), ours
    for doc in ("README.md", "docs/operations.md", "docs/getting-started.md", "systemd/reflexd.service"):
        assert "/usr/bin/reflexd" not in (ROOT / doc).read_text(), doc


def test_the_socket_unit_matches_the_service_the_snippets_and_the_config() -> None:
    socket_unit = settings(SYSTEMD / "reflexd.socket")
    service = settings(SYSTEMD / "reflexd.service")
    assert socket_unit["ListenStream"] == [SocketConfig().path]  # clients find it through socket.path
    assert socket_unit["SocketMode"] == ["0660"]
    assert socket_unit.get("Accept", ["no"]) == ["no"]
    user = re.search(r"^u (\S+) ", (SYSTEMD / "reflexd.sysusers").read_text(), flags=re.MULTILINE)
    assert user is not None
    assert socket_unit["SocketUser"] == socket_unit["SocketGroup"] == service["User"] == service["Group"] == [user[1]]
    assert "reflexd.socket" in service["Wants"][0] and "reflexd.socket" in service["After"][0]
    assert service["Also"] == ["reflexd.socket"]
    # the socket file lives in the runtime directory: stopping the service must not delete it
    assert service["RuntimeDirectory"] == ["reflexd"] and service["RuntimeDirectoryPreserve"] == ["yes"]
    run_dir = str(Path(SocketConfig().path).parent)
    tmpfiles = (SYSTEMD / "reflexd.tmpfiles").read_text()
    assert re.search(rf"^d {re.escape(run_dir)}\s+0750 reflexd reflexd", tmpfiles, re.M)


def test_the_hardening_the_docs_describe_is_in_the_unit() -> None:
    service = settings(SYSTEMD / "reflexd.service")
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert service["SystemCallErrorNumber"] == ["EPERM"]
    assert service["ProtectProc"] == ["invisible"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["IPAddressDeny"] == ["any"] and service["PrivateNetwork"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    # left out on purpose, each with its reason in a comment (docs/operations.md, "Hardening")
    for absent in ("MemoryDenyWriteExecute", "PrivateUsers", "ProcSubset"):
        assert absent not in service
        assert f"Not {absent}=" in (SYSTEMD / "reflexd.service").read_text(), absent
