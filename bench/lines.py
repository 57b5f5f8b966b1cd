"""Many agents, each its own model line: what the daemon holds, and what each line learns.

    python -m bench.lines [--agents 20] [--decisions 1500] [--scope agent]
    python -m bench.lines --idle 20 3000

Every agent logs ``--decisions`` uniformly explored decisions of its own world (the same contexts;
each agent's best action differs), then one ``train`` request trains every line in turn. The table
shows the daemon's RSS (idle, with every line made, its peak while the lines trained, after), the
trainer subprocess's peak, how many lines promoted a model, and how often each agent's own model
picks that agent's best action. Writes bench/out/lines.json. ``--idle`` measures instead what
many agents' lines cost a daemon standing still: its CPU share, RSS and a ``status``'s time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench._daemon import BenchDaemon, ChildWatcher
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decide, Decision, Flush, Outcome, Scored, Train

OUT = Path(__file__).resolve().parent / "out" / "lines.json"
ACTIONS = ["a", "b", "c", "d"]
TASKS = ("code", "chat", "math", "search")


def best(agent: int, task: str) -> str:
    """Agent k's world: the best action turns with the task, each agent starting elsewhere."""
    return ACTIONS[(agent + TASKS.index(task)) % len(ACTIONS)]


def log_experience(daemon: BenchDaemon, agents: int, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with Connection(daemon.socket, timeout=600) as conn:
        batch: list[Any] = []
        for i in range(n * agents):
            k = i % agents
            task = rng.choice(TASKS)
            chosen = rng.choice(ACTIONS)
            did = f"d{i}"
            reward = (1.0 if chosen == best(k, task) else 0.2) + rng.gauss(0, 0.1)
            batch += [
                Decision(id=did, agent=f"agent-{k:02d}", context={"task": task, "x": rng.random()}, actions=ACTIONS,
                         chosen=chosen, prob=1 / len(ACTIONS)),
                Outcome(decision_id=did, reward=reward, id=f"o{i}", agent=f"agent-{k:02d}"),
            ]
            if len(batch) >= 2000:
                conn.send(batch)
                batch = []
        conn.send([*batch, Flush(req="all", loaded=True)])
        while not isinstance(conn.receive(), Ack):
            pass


def accuracy(daemon: BenchDaemon, agents: int) -> list[float]:
    found = []
    with Connection(daemon.socket) as conn:
        for k in range(agents):
            hits = 0
            for task in TASKS:
                reply = conn.request(Decide(agent=f"agent-{k:02d}", context={"task": task, "x": 0.5}, actions=ACTIONS, log=False))
                assert isinstance(reply, Scored)
                if reply.scores is not None:
                    hits += ACTIONS[reply.scores.index(max(reply.scores))] == best(k, task)
            found.append(hits / len(TASKS))
    return found


def run(agents: int, decisions: int, scope: str, seed: int) -> dict[str, Any]:
    overrides = {"learning": {"scope": scope}, "online": {"enabled": False}, "rewards": {"wait_window": 0.2}}
    daemon = BenchDaemon(train_rows=decisions * (agents if scope == "shared" else 1), overrides=overrides).start()
    try:
        idle = daemon.rss()
        t0 = time.time()
        log_experience(daemon, agents, decisions, seed)
        wanted = 1 if scope == "shared" else agents
        deadline = time.monotonic() + 120
        while len(daemon.status().lines) < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(daemon.status().lines)} of {wanted} lines after 120 s")
            time.sleep(0.2)
        time.sleep(0.5)  # past the reward wait window
        with_lines = daemon.rss()
        watcher = ChildWatcher(daemon.pid or 0)
        watcher.start()
        t1 = time.time()
        done = daemon.request(Train(), timeout=3600)
        t2 = time.time()
        watcher.stop()
        status = daemon.status()
        promoted = sum(1 for line in status.lines.values() if line["serving"])
        hits = accuracy(daemon, agents)
        return {
            "scope": scope,
            "agents": agents,
            "decisions_per_agent": decisions,
            "lines": len(status.lines),
            "promoted": promoted,
            "rss_idle_mib": idle / 2**20,
            "rss_with_lines_mib": with_lines / 2**20,
            "rss_peak_training_mib": daemon.peak_rss_between(t1, t2) / 2**20,
            "rss_after_mib": daemon.rss() / 2**20,
            "rss_peak_mib": daemon.peak_rss() / 2**20,
            "trainer_peak_mib": watcher.peak / 2**20,
            "train_seconds": t2 - t1,
            "log_seconds": t1 - t0,
            "best_action_accuracy": sum(hits) / len(hits),
            "runs": done.message.count("\n") + 1,
        }
    finally:
        daemon.stop()


def cpu_seconds(pid: int) -> float:
    """The process's user and system CPU time so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(agents: int, seconds: float = 20.0) -> dict[str, Any]:
    """A daemon with ``agents`` model lines, one decision each and nothing else to do: its CPU over
    ``seconds`` (what its lines cost it standing still), its RSS, and how long a ``status`` takes."""
    daemon = BenchDaemon(train_rows=1_000_000, overrides={"rewards": {"wait_window": 0.2}}).start()
    try:
        with Connection(daemon.socket, timeout=600) as conn:
            conn.send([
                *(Decision(id=f"d{k}", agent=f"agent-{k:05d}", context={"task": TASKS[k % 4]}, actions=ACTIONS, chosen="a",
                           prob=0.25) for k in range(agents)),
                Flush(req="all", loaded=True),
            ])
            while not isinstance(conn.receive(), Ack):
                pass
        deadline = time.monotonic() + 300
        while len(daemon.status().lines) < agents:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(daemon.status().lines)} of {agents} lines after 300 s")
            time.sleep(0.5)
        time.sleep(5.0)  # every line started (its model looked for, its scheduler counting)
        before = cpu_seconds(daemon.pid or 0)
        time.sleep(seconds)
        cpu = (cpu_seconds(daemon.pid or 0) - before) / seconds
        t0 = time.perf_counter()
        daemon.status()
        return {"agents": agents, "cpu_share": cpu, "rss_mib": daemon.rss() / 2**20, "status_seconds": time.perf_counter() - t0}
    finally:
        daemon.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--decisions", type=int, default=1500, help="logged decisions per agent")
    parser.add_argument("--scope", nargs="+", default=["agent", "shared"], choices=["agent", "shared"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--idle", type=int, nargs="+", metavar="AGENTS",
        help="instead: a daemon with this many agents' lines (one decision each) standing still, its CPU share, "
        "RSS and a status request's time, e.g. --idle 20 3000",
    )
    args = parser.parse_args(argv)
    if args.idle:
        print(f"{'agents':>8}{'daemon CPU, idle':>20}{'RSS (MiB)':>12}{'status (s)':>12}")
        for n in args.idle:
            r = idle(n)
            print(f"{n:>8}{r['cpu_share'] * 100:>19.1f}%{r['rss_mib']:>12.0f}{r['status_seconds']:>12.2f}", flush=True)
        return 0
    results = []
    for scope in args.scope:
        print(f"scope {scope}: {args.agents} agents × {args.decisions} decisions…", file=sys.stderr)
        results.append(run(args.agents, args.decisions, scope, args.seed))
    keys = [
        ("lines", "model lines", "{:.0f}"), ("promoted", "lines serving a model", "{:.0f}"),
        ("best_action_accuracy", "each agent's model picks its best action", "{:.2f}"),
        ("rss_idle_mib", "daemon RSS at start (MiB)", "{:.0f}"), ("rss_with_lines_mib", "daemon RSS, lines made (MiB)", "{:.0f}"),
        ("rss_peak_training_mib", "daemon RSS peak while training (MiB)", "{:.0f}"),
        ("rss_after_mib", "daemon RSS after (MiB)", "{:.0f}"), ("trainer_peak_mib", "trainer subprocess peak (MiB)", "{:.0f}"),
        ("train_seconds", "training every line (s)", "{:.0f}"),
    ]
    print(f"{'':45}" + "".join(f"{'scope ' + r['scope']:>16}" for r in results))
    for key, label, fmt in keys:
        print(f"{label:45}" + "".join(f"{fmt.format(r[key]):>16}" for r in results))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
