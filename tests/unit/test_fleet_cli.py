"""``reflexd fleet train`` and ``reflexd models pull`` at the command line, without a cluster or a daemon."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from reflexd.fleet.command import render
from reflexd.tools.cli import build_parser, main


def test_fleet_is_a_command_group_whose_train_takes_archives_and_an_out_folder() -> None:
    args = build_parser().parse_args(["fleet", "train", "a", "s3://b/c", "--out", "m", "--workers", "3", "--json"])
    assert (args.archives, args.out, args.workers, args.json) == (["a", "s3://b/c"], "m", 3, True)
    assert (args.address, args.storage, args.max_rows_per_host, args.seed) == (None, None, None, 0)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["fleet"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fleet", "train", "a"])  # --out is required


def test_fleet_help_describes_it_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fleet", "train", "--help"])
    text = capsys.readouterr().out
    assert "Ray Train's TorchTrainer" in text and "reflexd models pull OUT" in text
    assert "examples:\n  reflexd fleet train" in text and "pip install" not in text.split("examples:")[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)


def test_without_the_fleet_extra_the_command_says_how_to_install_it(tmp_path: Path) -> None:
    # Ray made unimportable, as on a host installed without [fleet]
    done = _run(
        "import sys; sys.modules['ray'] = None\n"
        "from reflexd.tools.cli import main\n"
        f"sys.exit(main(['fleet', 'train', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}]))"
    )
    assert done.returncode == 1
    assert "reflexd fleet needs Ray, the optional fleet extra" in done.stderr
    assert "pip install 'reflexd[fleet]'" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the fleet extra is not installed")
def test_a_path_that_is_no_archive_is_named_before_a_cluster_starts(tmp_path: Path) -> None:
    done = _run(
        "import sys\nfrom reflexd.tools.cli import main\n"
        f"sys.exit(main(['fleet', 'train', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}]))"
    )
    assert done.returncode == 1
    assert f"reflexd: {tmp_path}: no decisions/ folder here nor under archive/" in done.stderr
    assert "Started a local Ray instance" not in done.stderr


def test_models_pull_checks_the_files_before_it_reaches_for_a_daemon(tmp_path: Path, capsys) -> None:
    assert main(["models", "pull", str(tmp_path), "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert f"model {tmp_path} refused: cannot read {tmp_path / 'manifest.json'}" in err, err
    assert main(["models", "pull", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "models pull needs a PATH" in capsys.readouterr().err


def test_the_summary_names_each_host_the_costs_the_verdict_and_the_next_step() -> None:
    host = {"path": "/srv/h1/archive", "rows": 10, "train_rows": 8, "holdout_rows": 2, "window_start": 0.0, "window_end": 60.0}
    text = render(
        {
            "hosts": [host, {**host, "path": "/srv/h2/archive"}], "rows": 20, "train_rows": 16, "holdout_rows": 4,
            "dropped_rows": 0, "read_seconds": 1.0, "train_seconds": 20.0, "fit_seconds": 2.0, "export_seconds": 3.0,
            "gate_seconds": 0.1, "seconds": 25.0, "workers": 2, "config": "the defaults", "passed": False,
            "gate": "candidate 0.1 vs logged policy 0.2: rejected", "model": "m/policy.onnx", "manifest": "m/manifest.json",
            "sha256": "ab" * 32, "out": "m",
        }
    )
    assert "/srv/h2/archive" in text and "all 2 hosts" in text and "1970-01-01 00:00 – 1970-01-01 00:01" in text
    assert "pooled gate REJECTED: candidate 0.1" in text and "on 2 Ray workers" in text
    assert text.endswith("reflexd models pull m")


def test_without_address_a_new_local_cluster_is_started_and_rays_refusals_are_fleet_errors() -> None:
    from reflexd.errors import FleetError
    from reflexd.fleet.train import _init_ray

    class Ray:  # stands in for the ray module: records what ray.init is given, or refuses as Ray does
        def __init__(self, refusal: Exception | None = None) -> None:
            self.calls: list[dict] = []
            self.refusal = refusal

        def init(self, **kwargs: object) -> None:
            self.calls.append(kwargs)
            if self.refusal is not None:
                raise self.refusal

    ray = Ray()
    _init_ray(ray, None, 3, False)
    # "local": never a cluster already running here (or RAY_ADDRESS's), which refuses num_cpus
    assert ray.calls[0]["address"] == "local" and ray.calls[0]["num_cpus"] >= 3
    _init_ray(ray, "auto", 3, False)
    assert ray.calls[1]["address"] == "auto" and ray.calls[1]["num_cpus"] is None

    joined = Ray(ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided."))
    with pytest.raises(FleetError, match="cannot start a local Ray cluster: ValueError: When connecting to an existing"):
        _init_ray(joined, None, 2, False)
    unreachable = Ray(ConnectionError("Could not find any running Ray instance."))
    with pytest.raises(FleetError, match=r"cannot connect to the Ray cluster at 'ray://h:10001' \(--address\): ConnectionError"):
        _init_ray(unreachable, "ray://h:10001", 2, False)
