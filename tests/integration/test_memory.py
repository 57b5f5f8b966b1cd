"""What bounds the daemon's memory: its DuckDB settings, and what it leaves unimported until needed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import yaml
from structlog.testing import capture_logs

from reflexd.config import load_config
from reflexd.errors import DaemonUnavailable
from reflexd.service.daemon import Daemon
from reflexd.wire.connection import request
from reflexd.wire.protocol import StatusReply, StatusRequest

START_TIMEOUT = 60.0


def _answers(socket: str) -> bool:
    try:
        return isinstance(request(StatusRequest(), socket, timeout=5), StatusReply)
    except DaemonUnavailable:
        return False


def test_the_daemon_opens_its_store_with_the_configured_settings_until_restart(tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="rxm-", dir="/tmp"))  # socket paths are capped at 108 bytes
    raw = {
        "state_dir": str(tmp_path / "state"),
        "socket": {"path": str(sock_dir / "r.sock")},
        "store": {"memory_limit_mb": 300, "threads": 1},
    }
    config_path = tmp_path / "reflexd.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    daemon = Daemon(config, str(config_path))
    untouched = signal.getsignal(signal.SIGTERM)

    def read_settings() -> dict[str, str]:
        with daemon.store._guard("reading settings") as con:
            rows = con.execute("SELECT name, value FROM duckdb_settings() WHERE name IN ('memory_limit', 'threads')")
            return dict(rows.fetchall())

    async def main() -> list[dict[str, str]]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(START_TIMEOUT):
                while not await anyio.to_thread.run_sync(_answers, config.socket.path):
                    await anyio.sleep(0.05)
                while signal.getsignal(signal.SIGTERM) == untouched:  # its signal handling is in place
                    await anyio.sleep(0.01)
            seen = [await anyio.to_thread.run_sync(read_settings)]
            config_path.write_text(yaml.safe_dump({**raw, "store": {"memory_limit_mb": 400}}))
            with capture_logs() as logs:
                assert await daemon.reload()
            assert {"event": "store changes take effect at restart", "log_level": "warning"} in logs
            seen.append(await anyio.to_thread.run_sync(read_settings))
            os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own stop: drain, close the store
        return seen

    try:
        at_start, after_reload = anyio.run(main)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert at_start == after_reload == {"memory_limit": "300.0 MiB", "threads": "1"}


def test_a_daemon_at_rest_imports_neither_torch_nor_parquet_reading() -> None:
    # pyarrow.parquet is needed only to gate a candidate, and costs resident memory from start-up
    code = (
        "import sys, reflexd.tools.cli, reflexd.service.daemon; "
        "bad = [m for m in ('torch', 'pyarrow.parquet') if m in sys.modules]; assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
