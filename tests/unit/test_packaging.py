"""The package-dir mapping only works if every package is listed; keep the list honest."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"daemon": "reflexd", "plugins": "reflexd.plugins", "exporters": "reflexd.exporters"}


def test_every_folder_with_an_init_is_a_listed_package() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed


def test_serving_path_imports_neither_torch_nor_duckdb() -> None:
    code = (
        "import sys, reflexd; from reflexd import Policy; import reflexd.deciding.scoring, reflexd.learning.gate, reflexd.learning.dataset;"
        "bad = [m for m in ('torch', 'duckdb') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_builtin_learner_is_registered_as_an_entry_point() -> None:
    from importlib.metadata import entry_points

    assert "mlp" in {ep.name for ep in entry_points(group="reflexd.learners")}
