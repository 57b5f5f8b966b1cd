"""An agent's steps as episodes: what the behaviour model learns from and is run over.

A steps snapshot is a Parquet file of the ``steps`` table as it is exported
(``reflexd.service.store.db.OUTSIDE["steps"]``): ``id, agent, episode, index, observation (JSON
object as text), action, reward, done, ts, received_at``. Rows are grouped by (agent, episode)
and ordered by ``index``; a row repeated (same agent, episode and index) counts once.

An episode is *complete* when one of its steps is ``done``; steps after the first done step are
dropped. A complete episode *succeeded* when its final (done) step's reward is > 0. An episode
with no done step is still running (or was cut off): its steps teach the model the agent's
actions, but not success.

Pure numpy and pyarrow: the daemon, the client and the trainer may all import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from reflexd.errors import SnapshotError

STEP_COLUMNS = ("id", "agent", "episode", "index", "observation", "action", "reward", "done", "ts", "received_at")
_REQUIRED = ("agent", "episode", "index", "observation", "action", "reward", "done")
_json = msgspec.json.Decoder()


@dataclass
class Episode:
    agent: str
    episode: str
    observations: list[dict[str, Any]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    done: bool = False  # a done step ended it
    received_at: float | None = None  # the newest step's

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def success(self) -> bool | None:
        """True/False for a complete episode (final done step's reward > 0), None while running."""
        if not self.done or not self.rewards:
            return None
        return self.rewards[-1] > 0.0


def success_of(rewards: list[float], done: bool) -> bool | None:
    if not done or not rewards:
        return None
    return rewards[-1] > 0.0


def episodes_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[Episode]:
    """Episodes from step rows (mappings with the snapshot's columns; ``observation`` a mapping or
    JSON text), each ordered by index, the episodes by their first row's appearance."""
    found: dict[tuple[str, str], dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        key = (str(row["agent"]), str(row["episode"]))
        found.setdefault(key, {}).setdefault(int(row["index"]), row)
    out = []
    for (agent, name), steps in found.items():
        ep = Episode(agent, name)
        for index in sorted(steps):
            row = steps[index]
            obs = row["observation"]
            if isinstance(obs, (str, bytes)):
                try:
                    obs = _json.decode(obs)
                except msgspec.DecodeError:
                    obs = {}
            if not isinstance(obs, dict):
                obs = {}
            ep.observations.append(obs)
            ep.actions.append(str(row["action"]))
            ep.rewards.append(float(row["reward"]))
            ep.indices.append(index)
            ep.ids.append(row.get("id"))
            at = row.get("received_at")
            if at is not None:
                ep.received_at = float(at) if ep.received_at is None else max(ep.received_at, float(at))
            if bool(row["done"]):
                ep.done = True
                break
        out.append(ep)
    return out


def load_steps(path: str) -> list[Episode]:
    """The episodes of a steps snapshot (Parquet); SnapshotError if it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        # the table's own column name for ``index`` is ``idx``
        if "index" not in names and "idx" in names:
            names = [("index" if n == "idx" else n) for n in names]
            table = pq.read_table(path).rename_columns(names)
        else:
            table = pq.read_table(path)
    except FileNotFoundError:
        raise SnapshotError(path, "no such file") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise SnapshotError(path, f"cannot read ({exc})") from None
    missing = [c for c in _REQUIRED if c not in table.column_names]
    if missing:
        raise SnapshotError(path, f"missing column(s) {', '.join(missing)}")
    return episodes_from_rows(table.to_pylist())


def write_steps(path: str, episodes: Iterable[Episode], ts: float = 0.0) -> int:
    """Write episodes as a steps snapshot (the exported table's columns); returns the rows written.
    Tests and the bench make snapshots this way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {c: [] for c in STEP_COLUMNS}
    enc = msgspec.json.encode
    n = 0
    for ep in episodes:
        for i, (obs, action, reward) in enumerate(zip(ep.observations, ep.actions, ep.rewards)):
            index = ep.indices[i] if i < len(ep.indices) else i
            cols["id"].append(f"{ep.agent}/{ep.episode}/{index}")
            cols["agent"].append(ep.agent)
            cols["episode"].append(ep.episode)
            cols["index"].append(index)
            cols["observation"].append(enc(obs).decode())
            cols["action"].append(action)
            cols["reward"].append(float(reward))
            cols["done"].append(ep.done and i == len(ep.actions) - 1)
            at = ts + n * 1e-3 if ep.received_at is None else ep.received_at
            cols["ts"].append(at)
            cols["received_at"].append(at)
            n += 1
    schema = pa.schema([
        ("id", pa.string()), ("agent", pa.string()), ("episode", pa.string()), ("index", pa.int32()),
        ("observation", pa.string()), ("action", pa.string()), ("reward", pa.float64()),
        ("done", pa.bool_()), ("ts", pa.float64()), ("received_at", pa.float64()),
    ])
    pq.write_table(pa.table(cols, schema=schema), path)
    return n


def rewards_array(ep: Episode) -> np.ndarray:
    return np.asarray(ep.rewards, dtype=np.float32)
