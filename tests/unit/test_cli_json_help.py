"""What `--help` says a command's `--json` prints is what it prints: the description and the option
name the same keys, every one of them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "reflexd.yaml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexd", *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        check=False,
    )


def help_parts(command: str) -> tuple[str, str]:
    """The command's description and its --json option's help, each on one line."""
    out = run(command, "--help").stdout
    description = " ".join(out.split("options:", 1)[0].split())
    options = out.split("options:", 1)[1].split("examples:", 1)[0]
    option = " ".join(re.split(r"\n  -", options.split("--json", 1)[1], maxsplit=1)[0].split())
    return description, option


@pytest.mark.parametrize("command", ["check-store", "check-config"])
def test_help_names_every_key_json_prints(command: str, tmp_path: Path) -> None:
    if command == "check-store":
        config = tmp_path / "reflexd.yaml"
        config.write_text(f"state_dir: {tmp_path / 'state'}\n")
        done = run("check-store", "--json", "--config", str(config))  # no store yet: exit 0
    else:
        done = run("check-config", "--json", str(SHIPPED))
    assert done.returncode == 0, done.stderr
    keys = list(json.loads(done.stdout))
    description, option = help_parts(command)
    for key in keys:
        assert f'"{key}"' in description, (key, description)
        assert f'"{key}"' in option, (key, option)
    # and no key it does not print
    assert set(re.findall(r'"(\w+)"', option)) == set(keys), option
