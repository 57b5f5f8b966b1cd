"""How soon an online update reaches the agent's other processes: one command, one table.

    python -m bench.sharing [--updates N] [--rate R] [--refresh S]

A learner process (``reflexd.Policy``) decides and rewards ``--rate`` times a second; an observer
Policy in this process, deciding for the same agent, checks every 2 ms how many of the learner's
updates its head has absorbed. An update's delay is from the learner's reward to the first check
that sees it: its trip to the daemon (the learner's sender, every 20 ms), the daemon's relay, and
the observer's look (every ``--refresh`` s, the Policy's ``refresh_interval``, 0.5 by default).
Writes bench/out/sharing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench._daemon import BenchDaemon
from reflexd.client.policy import Policy

OUT = Path(__file__).resolve().parent / "out" / "sharing.json"
ACTIONS = ["small", "large", "tools"]

LEARNER = """
import json, random, sys, time
from reflexd.client.policy import Policy
best = {"code": "large", "chat": "small", "math": "tools"}
rng = random.Random(5)
n, pause = int(sys.argv[3]), 1.0 / float(sys.argv[4])
with Policy("router", socket=sys.argv[1], state_dir=sys.argv[2], seed=7) as policy:
    at = []
    for i in range(n):
        task = rng.choice(list(best))
        choice = policy.decide({"task": task, "n": rng.random()}, ["small", "large", "tools"])
        policy.reward(choice.id, 1.0 if choice.action == best[task] else 0.0)
        at.append(time.time())
        time.sleep(pause)
    assert policy.flush(60)
    print(json.dumps(at))
"""


def run(updates: int, rate: float, refresh: float) -> dict[str, float]:
    daemon = BenchDaemon(train_rows=1000, overrides={"rewards": {"wait_window": 3600}}).start()
    try:
        with Policy("router", socket=daemon.socket, state_dir=daemon.state_dir, refresh_interval=refresh) as observer:
            observer.decide({"task": "code"}, ACTIONS)
            learner = subprocess.Popen(
                [sys.executable, "-c", LEARNER, daemon.socket, str(daemon.state_dir), str(updates), str(rate)],
                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            seen: list[tuple[float, int]] = []
            deadline = time.monotonic() + updates / rate + 120
            while time.monotonic() < deadline:
                n = observer.stats()["online"]["absorbed"]
                seen.append((time.time(), n))
                if n >= updates:
                    break
                time.sleep(0.002)
            out, _ = learner.communicate(timeout=120)
        learned_at = json.loads(out)
    finally:
        daemon.stop()
    delays = []
    for k, at in enumerate(learned_at, start=1):
        arrived = next((t for t, n in seen if n >= k), None)
        if arrived is not None:
            delays.append(arrived - at)
    ordered = sorted(delays)
    return {
        "updates": updates,
        "arrived": len(delays),
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_s": ordered[-1],
        "refresh_s": refresh,
        "rate": rate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sharing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="the learner's rewards per second")
    parser.add_argument("--refresh", type=float, nargs="+", default=[0.5, 0.1], help="the observer's refresh_interval (s)")
    args = parser.parse_args(argv)
    results = [run(args.updates, args.rate, r) for r in args.refresh]
    print(f"{'refresh_interval':>18}{'updates':>10}{'arrived':>10}{'p50':>10}{'p99':>10}{'max':>10}   (load {os.getloadavg()[0]:.1f})")
    for r in results:
        print(f"{r['refresh_s']:>16.2f} s{r['updates']:>10}{r['arrived']:>10}{r['p50_s']:>9.3f}s{r['p99_s']:>9.3f}s{r['max_s']:>9.3f}s")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
