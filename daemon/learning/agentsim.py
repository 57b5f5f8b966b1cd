"""A simulated tool-using agent whose behaviour policy is known: the truth the behaviour model's
tests and bench are checked against.

Each episode is a task (``math``, ``lookup`` or ``coding``). At each step the agent sees
``{"task", "ready", "failures"}`` and, until it is ready, calls one of four tools with
probabilities that depend only on the task (``POLICY``); a call succeeds with a rate that depends
on the task and the tool (``SUCCESS_RATE``), and a failed call has reward -0.1. After two
successful calls the agent is ready and answers (always); the answer is right (reward 1, the
episode succeeded) with a probability that falls with the failures so far (``ANSWER_RATE``),
else reward 0. An episode that reaches ``MAX_STEPS`` ends there, failed.

Planted kinds: ``loop`` (the same successful tool call eight times over before answering),
``failures`` (one tool failing five times in a row), ``unlikely`` (tools chosen against the
policy: each task's least likely tools).
"""

from __future__ import annotations

import numpy as np

from reflexd.learning.steps import Episode

TOOLS = ("search", "calculator", "browser", "code")
ANSWER = "answer"
TASKS = ("math", "lookup", "coding")
POLICY = {
    "math": (0.15, 0.70, 0.05, 0.10),
    "lookup": (0.60, 0.05, 0.30, 0.05),
    "coding": (0.15, 0.05, 0.10, 0.70),
}
SUCCESS_RATE = {
    "math": (0.5, 0.9, 0.4, 0.7),
    "lookup": (0.85, 0.2, 0.8, 0.3),
    "coding": (0.5, 0.2, 0.5, 0.85),
}
ANSWER_RATE = (0.9, 0.6, 0.35, 0.15)  # by failures so far (the last for 3 or more)
FAIL_REWARD = -0.1
MAX_STEPS = 12


def true_probs(observation: dict) -> dict[str, float]:
    """The behaviour policy's distribution over actions given an observation."""
    if observation.get("ready"):
        return {ANSWER: 1.0, **{t: 0.0 for t in TOOLS}}
    return {**dict(zip(TOOLS, POLICY[observation["task"]])), ANSWER: 0.0}


class ToolAgent:
    def __init__(self, seed: int = 0, agent: str = "sim-agent") -> None:
        self.rng = np.random.default_rng(seed)
        self.agent = agent

    def episode(self, name: str, kind: str = "normal", task: str | None = None) -> Episode:
        rng = self.rng
        task = task or TASKS[int(rng.integers(len(TASKS)))]
        ep = Episode(self.agent, name)
        ok = failures = 0
        planted: list[str] = []
        if kind == "loop":
            planted = [TOOLS[int(np.argmax(POLICY[task]))]] * 8
        elif kind == "failures":
            planted = [TOOLS[int(np.argmax(POLICY[task]))]] * 5
        for t in range(MAX_STEPS):
            obs = {"task": task, "ready": ok >= 2, "failures": failures}
            if obs["ready"] and not planted:
                right = rng.random() < ANSWER_RATE[min(failures, 3)]
                self._add(ep, t, obs, ANSWER, 1.0 if right else 0.0)
                ep.done = True
                return ep
            if planted:
                tool = planted.pop(0)
                success = kind == "loop"
            else:
                probs = np.asarray(POLICY[task])
                if kind == "unlikely":
                    probs = np.where(probs <= np.sort(probs)[1], 1.0, 0.0)
                    probs = probs / probs.sum()
                i = int(rng.choice(len(TOOLS), p=probs))
                tool = TOOLS[i]
                success = rng.random() < SUCCESS_RATE[task][i]
            if success:
                ok = min(ok + 1, 2) if kind != "loop" or not planted else ok
            else:
                failures += 1
            self._add(ep, t, obs, tool, 0.0 if success else FAIL_REWARD)
        ep.done = True  # out of steps: failed
        ep.rewards[-1] = min(ep.rewards[-1], 0.0)
        return ep

    @staticmethod
    def _add(ep: Episode, t: int, obs: dict, action: str, reward: float) -> None:
        ep.observations.append(obs)
        ep.actions.append(action)
        ep.rewards.append(reward)
        ep.indices.append(t)
        ep.ids.append(f"{ep.agent}/{ep.episode}/{t}")

    def episodes(self, n: int, kind: str = "normal", prefix: str = "ep") -> list[Episode]:
        return [self.episode(f"{prefix}{i}", kind) for i in range(n)]
