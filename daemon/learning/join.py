"""The reward join as SQL text: what turns logged decisions and outcomes into experiences.

Pure data (SQL strings and the per-agent rules as an Arrow table), run by whoever holds the
tables: the daemon's store on its DuckDB database (``reflexd.service.store.rewards``) and
``reflexd fleet train`` on an in-memory DuckDB over hosts' Parquet archives
(``reflexd.fleet.archive``), so a fleet model learns from experiences joined exactly as a host's
own snapshot joins them. Tables are named as the store names them: ``decisions``, ``outcomes``,
``events`` (episode ends) and ``rules`` (one row per agent with overrides, plus the global
settings under the agent id ``''``; ids are never empty).
"""

from __future__ import annotations

import pyarrow as pa

from reflexd.config import Config

# The end of each episode (an EpisodeEnd, stored as an event of kind 'episode_end') received by
# $now: when it came, and its final reward (none: 0). An episode ended twice keeps its first end.
ENDS = """
    SELECT agent, json_extract_string(data, '$.episode') AS episode, min(received_at) AS ended_at,
        arg_min(coalesce(TRY_CAST(json_extract(data, '$.reward') AS DOUBLE), 0.0), (received_at, ts, id)) AS final
    FROM events
    WHERE kind = 'episode_end' AND received_at <= $now
    GROUP BY ALL
"""

# Each episode named by decisions: when its last decision came, and its end, if any.
EPISODES = f"""
    SELECT x.agent, x.episode, x.last_at, en.ended_at, en.final
    FROM (SELECT agent, episode, max(received_at) AS last_at FROM decisions WHERE episode IS NOT NULL GROUP BY ALL) x
    LEFT JOIN ({ENDS}) en ON en.agent = x.agent AND en.episode = x.episode
"""

# Decisions whose agent's wait window has passed by $now, each with its agent's reward rules.
# A decision credited with its episode's return (its agent's rewards.episode_return, and an episode
# named) matures with its whole episode instead: once the episode has ended (or gone
# episode_timeout seconds since its last decision without) and its last decision's wait window has
# passed. `episode_end_reward` is set for those alone: the final reward credited to the episode's
# last decision (the end's, 0 for an end without one; the default reward for an episode timed out).
MATURED = f"""
    SELECT d.*, r.wait_window, r.default_reward, r.aggregation, r.discount,
        CASE WHEN e.agent IS NOT NULL THEN coalesce(e.final, r.default_reward) END AS episode_end_reward
    FROM decisions d
    LEFT JOIN rules own ON own.agent = d.agent
    JOIN rules r ON r.agent = coalesce(own.agent, '')
    LEFT JOIN ({EPISODES}) e ON r.episode_return AND e.agent = d.agent AND e.episode = d.episode
    WHERE CASE WHEN e.agent IS NULL THEN d.received_at <= $now - r.wait_window
        ELSE e.last_at <= $now - r.wait_window AND (e.ended_at IS NOT NULL OR e.last_at <= $now - r.episode_timeout)
    END
"""

# The reward join, shared by training snapshots and live rewards: given a CTE `recent` of matured
# decisions, `rewards` holds each one's reward (NULL: none came), and JOINED_REWARD (over `recent m
# LEFT JOIN rewards r`) falls back to the default reward when none came.
# A decision's own reward aggregates its outcomes within its wait window. Outcomes sharing a
# received_at (one ingest batch) are ordered by the agent's ts, then id, so first/last are
# deterministic. Rewards are aggregated before joining back, so the wide JSON columns are never
# grouped on.
# A decision credited with its episode's return gets G_t = sum over k >= 0 of discount^k * r_(t+k):
# the own rewards (default when none came) of it and the later decisions of its episode (agent and
# episode id, in ts order), the episode's final reward added to its last decision's. Every
# decision of the episode counts, in the window or not. The list a decision's return is folded
# from holds the rest of its episode: episodes are meant to be tens or hundreds of decisions long.
# An outcome is a decision's by its decision_id and, where it names its agent, by that too: ids are
# to be unique across a host's agents, and an outcome one agent sends for an id another agent's
# decision holds is that decision's no more than a stranger's (it counts as joining nothing).
def owns(outcome: str, decision: str) -> str:
    """SQL: the outcome aliased ``outcome`` is the decision aliased ``decision``'s."""
    return f"{outcome}.decision_id = {decision}.id AND ({outcome}.agent IS NULL OR {outcome}.agent = {decision}.agent)"


REWARDS = f"""
    episodic AS (
        SELECT DISTINCT agent, episode, wait_window, aggregation, default_reward, discount, episode_end_reward
        FROM recent WHERE episode_end_reward IS NOT NULL
    ),
    members AS (
        SELECT d.id, d.agent, d.episode, d.ts, d.received_at, e.wait_window, e.aggregation, e.default_reward,
            e.discount, e.episode_end_reward
        FROM decisions d JOIN episodic e ON d.agent = e.agent AND d.episode = e.episode
    ),
    credited AS (
        SELECT id, agent, received_at, wait_window, aggregation, false AS in_episode FROM recent
        WHERE episode_end_reward IS NULL
        UNION ALL
        SELECT id, agent, received_at, wait_window, aggregation, true AS in_episode FROM members
    ),
    own AS (
        SELECT m.id, m.in_episode,
            CASE m.aggregation
                WHEN 'sum' THEN sum(o.reward)
                WHEN 'mean' THEN avg(o.reward)
                WHEN 'min' THEN min(o.reward)
                WHEN 'max' THEN max(o.reward)
                WHEN 'first' THEN arg_min(o.reward, (o.received_at, o.ts, o.id))
                WHEN 'last' THEN arg_max(o.reward, (o.received_at, o.ts, o.id))
            END AS reward,
            count(*) AS outcomes
        FROM credited m
        JOIN outcomes o ON {owns('o', 'm')} AND o.received_at <= m.received_at + m.wait_window
        GROUP BY m.id, m.aggregation, m.in_episode
    ),
    steps_back AS (
        SELECT b.id, b.agent, b.episode, b.ts, b.received_at, b.discount, coalesce(o.outcomes, 0) AS outcomes,
            coalesce(o.reward, b.default_reward) + CASE WHEN row_number() OVER (
                PARTITION BY b.agent, b.episode ORDER BY b.ts DESC, b.received_at DESC, b.id DESC
            ) = 1 THEN b.episode_end_reward ELSE 0.0 END AS r
        FROM members b LEFT JOIN own o ON o.id = b.id
    ),
    returns AS (
        SELECT id, outcomes,
            list_reduce(list_reverse(list(r) OVER (
                PARTITION BY agent, episode ORDER BY ts, received_at, id
                ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING
            )), lambda acc, x: x + discount * acc) AS reward
        FROM steps_back
    ),
    rewards AS (
        SELECT id, reward, outcomes FROM own WHERE NOT in_episode
        UNION ALL
        SELECT id, reward, outcomes FROM returns
    )
"""
JOINED_REWARD = "coalesce(r.reward, m.default_reward)"

# The snapshot's rows (reflexd.learning.dataset reads them): the newest $max_rows matured
# decisions of a window, with their joined reward, oldest first.
EXPERIENCES = f"""
    WITH recent AS (
        SELECT * FROM ({MATURED})
        -- a window of them (reflexd evaluate, the rollback monitor): each filter is off when NULL
        -- $agents: a model line's agents (reflexd.lines); NULL: every agent; $after: only those
        -- received after it (what a run's snapshot did not hold: reflexd.learning.runs.confirm_first)
        WHERE ($agent IS NULL OR agent = $agent) AND ($agents IS NULL OR list_contains($agents, agent))
            AND ($since IS NULL OR ts >= $since) AND ($after IS NULL OR received_at > $after)
            AND ($until IS NULL OR ts < $until) AND ($version IS NULL OR model_version = $version)
        ORDER BY received_at DESC, ts DESC, id DESC LIMIT $max_rows
    ),
    {REWARDS}
    SELECT
        m.id, m.agent, m.received_at, m.ts,
        CAST(m.context AS VARCHAR) AS context,
        CAST(m.actions AS VARCHAR) AS actions,
        m.chosen, m.prob,
        {JOINED_REWARD} AS reward,
        m.model_version,
        CAST(coalesce(r.outcomes, 0) AS INTEGER) AS outcomes,
        m.slot, m.slate, m.episode
    FROM recent m LEFT JOIN rewards r ON r.id = m.id
    -- decisions spooled in one ingest batch share received_at; their own ts keeps them in the
    -- order they were made, where their random ids would shuffle them (and the model trained)
    ORDER BY m.received_at, m.ts, m.id
"""

# The columns of the two tables the join reads (the store's schema; the archive adds its
# partition columns, agent and date, which the join does not need beyond agent).
DECISION_COLUMNS = (
    "id", "agent", "ts", "received_at", "context", "actions", "chosen", "prob", "model_version", "slot", "slate", "episode",
)
OUTCOME_COLUMNS = ("id", "decision_id", "agent", "reward", "ts", "received_at")
# The events the join reads (episode ends: kind 'episode_end').
EVENT_COLUMNS = ("id", "agent", "kind", "data", "ts", "received_at")


def reward_rules(config: Config) -> pa.Table:
    """The ``rules`` table: the global reward settings under agent ``''``, and each agent's override."""
    rules = {"": config.rewards} | {agent: override.rewards for agent, override in config.agents.items()}
    return pa.table(
        {
            "agent": list(rules),
            "wait_window": [r.wait_window for r in rules.values()],
            "default_reward": [r.default for r in rules.values()],
            "aggregation": [r.aggregation for r in rules.values()],
            "episode_return": [r.episode_return for r in rules.values()],
            "discount": [r.discount for r in rules.values()],
            "episode_timeout": [r.episode_timeout for r in rules.values()],
        }
    )
