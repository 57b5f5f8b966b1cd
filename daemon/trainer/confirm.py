"""Judge a first model again on the decisions made while its run trained.

``python -m reflexd.trainer.confirm`` runs ``learning.runs.confirm_first`` in a subprocess of its
own. The daemon writes those decisions to Parquet and the model about to go live to a folder, as it
does the live model for the trainer; reading, hashing and scoring them here keeps that work, and
its memory, out of the daemon, as the trainer's gate does for the holdout. No torch: onnxruntime
scores the model. Exit 0 with the verdict written to ``OUT`` (JSON); 2 with the reason on stderr
(1 with a traceback for anything unforeseen): the daemon then lets the run's verdict stand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from reflexd import worker
from reflexd.config import Config
from reflexd.deciding.scoring import Scorer
from reflexd.durable import atomic_write
from reflexd.errors import ReflexdError
from reflexd.learning import runs
from reflexd.learning.dataset import load_snapshot
from reflexd.manifest import GateResult
from reflexd.registry import read_model_dir


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reflexd.trainer.confirm", description=__doc__.splitlines()[0])
    parser.add_argument("fresh", help="the decisions received after the run's snapshot (Parquet, as a snapshot)")
    parser.add_argument("model_dir", help="a folder with the model about to go live (manifest.json and its file)")
    parser.add_argument("verdict", help="the gate's verdict on its run (a GateResult as JSON)")
    parser.add_argument("out", help="where to write the verdict, confirmed or overturned (JSON)")
    parser.add_argument("--config", required=True, help="a file holding the daemon's Config as JSON")
    return parser.parse_args(argv)


def confirm(fresh: str, model_dir: Path, verdict: GateResult, config: Config) -> GateResult:
    manifest, _, data = read_model_dir(model_dir)  # checked against its sha256
    live = Scorer(manifest, data, config.trainer.max_threads)
    rows = load_snapshot(fresh, manifest.features)
    return runs.confirm_first(
        live, verdict, rows, manifest.exploration_for, config.gate, lambda agent: config.for_agent(agent).rewards,
        config.online, manifest.training.cross_fitted,
    )


def main(argv: list[str] | None = None) -> int:
    worker.lower_priority()
    args = _parse_args(argv)
    try:
        config = msgspec.json.decode(Path(args.config).read_bytes(), type=Config)
        worker.limit_memory(config.trainer.max_memory_mb, worker.event_logger("reflexd.trainer.confirm"))
        verdict = msgspec.json.decode(Path(args.verdict).read_bytes(), type=GateResult)
        judged = confirm(args.fresh, Path(args.model_dir), verdict, config)
        atomic_write(Path(args.out), msgspec.json.encode(judged))
    except (OSError, ValueError, ReflexdError, msgspec.MsgspecError) as exc:
        print(f"reflexd.trainer.confirm: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
