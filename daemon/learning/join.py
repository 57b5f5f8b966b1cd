"""The reward join as SQL text: what turns logged decisions and outcomes into experiences.

Pure data (SQL strings and the per-agent rules as an Arrow table), run by whoever holds the
tables: the daemon's store on its DuckDB database (``reflexd.service.store.rewards``) and
``reflexd fleet train`` on an in-memory DuckDB over hosts' Parquet archives
(``reflexd.fleet.archive``), so a fleet model learns from experiences joined exactly as a host's
own snapshot joins them. Tables are named as the store names them: ``decisions``, ``outcomes``
and ``rules`` (one row per agent with overrides, plus the global settings under the agent id
``''``; ids are never empty).
"""

from __future__ import annotations

import pyarrow as pa

from reflexd.config import Config

# Decisions whose agent's wait window has passed by $now, each with its agent's reward rules.
MATURED = """
    SELECT d.*, r.wait_window, r.default_reward, r.aggregation
    FROM decisions d
    LEFT JOIN rules own ON own.agent = d.agent
    JOIN rules r ON r.agent = coalesce(own.agent, '')
    WHERE d.received_at <= $now - r.wait_window
"""

# The reward join, shared by training snapshots and live rewards: given a CTE `recent` of matured
# decisions, `rewards` aggregates each one's outcomes within its wait window, and JOINED_REWARD
# (over `recent m LEFT JOIN rewards r`) falls back to the default reward when none came.
# Outcomes sharing a received_at (one ingest batch) are ordered by the agent's ts, then id, so
# first/last are deterministic. Rewards are aggregated before joining back, so the wide JSON
# columns are never grouped on.
REWARDS = """
    rewards AS (
        SELECT m.id,
            CASE m.aggregation
                WHEN 'sum' THEN sum(o.reward)
                WHEN 'mean' THEN avg(o.reward)
                WHEN 'min' THEN min(o.reward)
                WHEN 'max' THEN max(o.reward)
                WHEN 'first' THEN arg_min(o.reward, (o.received_at, o.ts, o.id))
                WHEN 'last' THEN arg_max(o.reward, (o.received_at, o.ts, o.id))
            END AS reward,
            count(*) AS outcomes
        FROM recent m
        JOIN outcomes o ON o.decision_id = m.id AND o.received_at <= m.received_at + m.wait_window
        GROUP BY m.id, m.aggregation
    )
"""
JOINED_REWARD = "coalesce(r.reward, m.default_reward)"

# The snapshot's rows (reflexd.learning.dataset reads them): the newest $max_rows matured
# decisions of a window, with their joined reward, oldest first.
EXPERIENCES = f"""
    WITH recent AS (
        SELECT * FROM ({MATURED})
        -- a window of them (reflexd evaluate, the rollback monitor): each filter is off when NULL
        WHERE ($agent IS NULL OR agent = $agent) AND ($since IS NULL OR ts >= $since)
            AND ($until IS NULL OR ts < $until) AND ($version IS NULL OR model_version = $version)
        ORDER BY received_at DESC, ts DESC, id DESC LIMIT $max_rows
    ),
    {REWARDS}
    SELECT
        m.id, m.agent, m.received_at,
        CAST(m.context AS VARCHAR) AS context,
        CAST(m.actions AS VARCHAR) AS actions,
        m.chosen, m.prob,
        {JOINED_REWARD} AS reward,
        m.model_version,
        CAST(coalesce(r.outcomes, 0) AS INTEGER) AS outcomes,
        m.slot, m.slate
    FROM recent m LEFT JOIN rewards r ON r.id = m.id
    -- decisions spooled in one ingest batch share received_at; their own ts keeps them in the
    -- order they were made, where their random ids would shuffle them (and the model trained)
    ORDER BY m.received_at, m.ts, m.id
"""

# The columns of the two tables the join reads (the store's schema; the archive adds its
# partition columns, agent and date, which the join does not need beyond agent).
DECISION_COLUMNS = (
    "id", "agent", "ts", "received_at", "context", "actions", "chosen", "prob", "model_version", "slot", "slate",
)
OUTCOME_COLUMNS = ("id", "decision_id", "agent", "reward", "ts", "received_at")


def reward_rules(config: Config) -> pa.Table:
    """The ``rules`` table: the global reward settings under agent ``''``, and each agent's override."""
    rules = {"": config.rewards} | {agent: override.rewards for agent, override in config.agents.items()}
    return pa.table(
        {
            "agent": list(rules),
            "wait_window": [r.wait_window for r in rules.values()],
            "default_reward": [r.default for r in rules.values()],
            "aggregation": [r.aggregation for r in rules.values()],
        }
    )
