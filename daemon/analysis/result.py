"""What the extraction subprocess hands the daemon: its files, its result, its exit statuses.

The daemon reaches the extraction only through this module and ``findings`` (``python -m
reflexd.analysis`` is run, never imported), so it imports nothing heavier than msgspec: no
numpy, no scikit-learn in the daemon's memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from reflexd.analysis.findings import ExtractionInputs, Insights
from reflexd.errors import AnalysisError

INSIGHTS_FILE = "insights.json"
EXIT_FAILED = 2  # the inputs, the snapshot or the settings cannot be used (one line on stderr)
EXIT_OUT_OF_MEMORY = 3  # insights.max_memory_mb was reached
# 1: a bug (a traceback on stderr); 0: insights.json holds an Insights


class Failure(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    error: str


_result_decoder = msgspec.json.Decoder(dict[str, Any])
_inputs_decoder = msgspec.json.Decoder(ExtractionInputs)


def write_insights(out_dir: Path, result: Insights | Failure) -> None:
    # written whole then renamed, so the daemon never reads half a result
    out_dir = Path(out_dir)
    tmp = out_dir / (INSIGHTS_FILE + ".tmp")
    tmp.write_bytes(msgspec.json.encode(result))
    os.replace(tmp, out_dir / INSIGHTS_FILE)


def read_insights(out_dir: str | os.PathLike[str]) -> Insights:
    """The run's insights, or AnalysisError with the extraction's own error message."""
    path = Path(out_dir) / INSIGHTS_FILE
    try:
        found = _result_decoder.decode(path.read_bytes())
        if "error" in found:
            raise AnalysisError(msgspec.convert(found, Failure).error)
        return msgspec.convert(found, Insights)
    except FileNotFoundError:
        raise AnalysisError(f"the extraction wrote no {path} (killed, or crashed before starting)") from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AnalysisError(f"unreadable extraction result {path}: {exc}") from None


def encode_inputs(inputs: ExtractionInputs) -> bytes:
    return msgspec.json.encode(inputs)


def read_inputs(path: str | os.PathLike[str]) -> ExtractionInputs:
    """The ``--inputs`` file, or AnalysisError naming what is wrong in it."""
    try:
        return _inputs_decoder.decode(Path(path).read_bytes())
    except OSError as exc:
        raise AnalysisError(f"cannot read --inputs {path}: {exc.strerror or exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AnalysisError(f"invalid --inputs {path}: {exc}") from None
