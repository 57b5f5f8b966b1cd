"""Feature hashing: deterministic, seedable, and following the flattening rules it documents."""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import uuid
import zlib

import msgspec
import numpy as np
import pytest

from reflexd import features as F
from reflexd.features import FeatureSpec, Hasher, action_ids, action_parts, flatten
from reflexd.service import spool
from reflexd.wire.framing import decode_inbound, encode_frame
from reflexd.wire.protocol import Action, Decision

CTX = {
    "task": "code review for the parser",
    "lang": "python",
    "tokens": 1234,
    "temperature": -0.7,
    "urgent": True,
    "draft": False,
    "tags": ["fast", "cheap"],
    "history": [0.5, 2, {"ok": 1}],
    "user": {"tier": "gold", "age_days": 40, "meta": {"beta": True}},
    "missing": None,
}

ACTIONS = ["small", {"id": "large", "features": {"cost": 3.0, "family": "gpt"}}, Action(id="tool", features={"latency": 0.2})]


def slot(name: str, dim: int, seed: int = 0) -> tuple[int, float]:
    """The documented scheme, recomputed here: crc32(name, seed) mod dim, sign from the top bit."""
    h = zlib.crc32(name.encode("utf-8"), seed)
    return h % dim, (1.0 if h & 0x80000000 else -1.0)


def squash(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x)


def assert_items(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [name for name, _ in got] == [name for name, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-12)


def expected_vector(items: dict[str, float], dim: int, seed: int = 0) -> np.ndarray:
    out = np.zeros(dim, dtype=np.float32)
    for name, value in items.items():
        idx, sign = slot(name, dim, seed)
        out[idx] += sign * value
    return out


def expected_action(aid: str, features: dict[str, float], dim: int, seed: int = 0) -> np.ndarray:
    """The documented action scheme: the id in two slots (the second moved on if it hits the first)."""
    out = expected_vector(features, dim, seed)
    first, sign = slot("__action=" + aid, dim, seed)
    second, sign2 = second_slot(aid, dim, seed)
    out[first] += sign
    out[(first + 1) % dim if second == first else second] += sign2
    return out


def second_slot(aid: str, dim: int, seed: int = 0) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(aid.encode(), digest_size=4, key=seed.to_bytes(4, "little")).digest(), "little")
    return h % dim, (1.0 if h & 0x80000000 else -1.0)


# ---- determinism and seeding ------------------------------------------------------------------


def test_same_vector_across_hasher_instances() -> None:
    spec = FeatureSpec(context_dim=64, action_dim=16, seed=7)
    a, b = Hasher(spec), Hasher(spec)
    va = a.context(CTX)
    a.context({"warm": "cache"})  # a warmed cache changes nothing
    np.testing.assert_array_equal(va, b.context(CTX))
    np.testing.assert_array_equal(a.context(CTX), va)
    np.testing.assert_array_equal(a.actions(ACTIONS), b.actions(ACTIONS))
    assert np.count_nonzero(va) > 5


_CHILD = """
import json, sys
from reflexd.features import FeatureSpec, Hasher
ctx, actions = json.loads(sys.stdin.read())
h = Hasher(FeatureSpec(context_dim=64, action_dim=16, seed=7))
print(json.dumps([h.context(ctx).tolist(), h.actions(actions).tolist()]))
"""


def test_same_vector_across_processes() -> None:
    actions = ["small", {"id": "large", "features": {"cost": 3.0, "family": "gpt"}}]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash must not matter
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps([CTX, actions]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    ctx_child, act_child = json.loads(proc.stdout)
    h = Hasher(FeatureSpec(context_dim=64, action_dim=16, seed=7))
    np.testing.assert_array_equal(np.asarray(ctx_child, dtype=np.float32), h.context(CTX))
    np.testing.assert_array_equal(np.asarray(act_child, dtype=np.float32), h.actions(actions))


def test_seed_changes_indices() -> None:
    v0 = Hasher(FeatureSpec(context_dim=128, seed=0)).context(CTX)
    v1 = Hasher(FeatureSpec(context_dim=128, seed=1)).context(CTX)
    assert not np.array_equal(v0, v1)
    # index placement follows crc32 with the seed as its starting value
    for seed in (0, 1, 99):
        v = Hasher(FeatureSpec(context_dim=128, seed=seed)).context({"lang": "python"})
        idx, sign = slot("lang=python", 128, seed)
        assert v[idx] == sign
        assert np.count_nonzero(v) == 1
    assert slot("lang=python", 128, 0)[0] != slot("lang=python", 128, 1)[0]


def test_width_is_respected() -> None:
    for dim in (1, 3, 128):
        v = Hasher(FeatureSpec(context_dim=dim)).context(CTX)
        assert v.shape == (dim,) and v.dtype == np.float32


# ---- flattening rules -------------------------------------------------------------------------


def test_numbers_are_log1p_squashed_with_sign() -> None:
    got = dict(flatten({"a": 0, "b": 1, "c": -3, "d": 1e6, "e": -0.25}))
    assert got == pytest.approx({"a": 0.0, "b": math.log(2), "c": -math.log(4), "d": math.log1p(1e6), "e": -math.log1p(0.25)})


def test_booleans_are_zero_or_one() -> None:
    got = list(flatten({"t": True, "f": False}))
    assert got == [("t", 1.0), ("f", 0.0)]


def test_short_string_is_categorical() -> None:
    assert list(flatten({"lang": "python"})) == [("lang=python", 1.0)]
    assert list(flatten({"e": ""})) == [("e=", 1.0)]


def test_text_is_tokenised_with_inverse_sqrt_weights() -> None:
    got = list(flatten({"task": "fix the\tflaky\ntest"}))
    w = 1 / math.sqrt(4)
    assert got == [("task~fix", w), ("task~the", w), ("task~flaky", w), ("task~test", w)]
    # whitespace only: no tokens, no feature
    assert list(flatten({"task": "   "})) == []


def test_text_vector_weights_repeated_tokens() -> None:
    v = Hasher(FeatureSpec(context_dim=4096)).context({"q": "a a b"})
    w = 1 / math.sqrt(3)
    np.testing.assert_allclose(v, expected_vector({"q~a": 2 * w, "q~b": w}, 4096), rtol=1e-6)


def test_lists() -> None:
    got = list(flatten({"tags": ["x", "y"], "nums": [1, -2.5], "objs": [{"k": 1}, {"k": "v"}], "mixed": [None, True]}))
    assert_items(
        got,
        [
            ("tags=x", 1.0),
            ("tags=y", 1.0),
            ("nums[0]", math.log(2)),
            ("nums[1]", -math.log1p(2.5)),
            ("objs[0].k", math.log(2)),
            ("objs[1].k=v", 1.0),
            ("mixed[1]", 1.0),
        ]
    )


def test_nested_dicts_use_dotted_paths_and_none_is_skipped() -> None:
    got = list(flatten({"user": {"tier": "gold", "meta": {"n": 1, "gone": None}}, "none": None}))
    assert_items(got, [("user.tier=gold", 1.0), ("user.meta.n", math.log(2))])


def test_vectors_stay_finite_whatever_the_numbers() -> None:
    v = Hasher(FeatureSpec()).context({"nan": float("nan"), "pinf": float("inf"), "huge": 10**400, "big": 1e308})
    assert np.isfinite(v).all()
    np.testing.assert_array_equal(v, Hasher(FeatureSpec()).context({"huge": 10**400, "big": 1e308}))  # NaN, inf: missing


def test_a_float_that_is_not_finite_is_missing_as_the_store_keeps_it() -> None:
    # JSON has no inf or NaN: the store keeps null, which training reads as missing
    assert list(flatten({"x": float("inf"), "y": -math.inf, "z": math.nan})) == []


def test_huge_integer_does_not_crash() -> None:
    # msgspec's JSON decoder hands over arbitrary-precision ints (checked below), and an agent may
    # pass one in-process; hashing must treat it like a very large number, not raise OverflowError.
    big = int("1" + "0" * 400)
    assert msgspec.json.decode(b"1" + b"0" * 400) == big
    got = dict(flatten({"x": big, "y": -big}))
    assert math.isfinite(got["x"]) and got["x"] > 0
    assert got["y"] == -got["x"]


def test_context_vector_matches_flatten_and_scheme() -> None:
    spec = FeatureSpec(context_dim=256, seed=3)
    items: dict[str, float] = {}
    for name, value in flatten(CTX):
        items[name] = items.get(name, 0.0) + value
    np.testing.assert_allclose(Hasher(spec).context(CTX), expected_vector(items, 256, 3), rtol=1e-6, atol=1e-7)


def test_other_value_types_are_read_as_stored_or_refused() -> None:
    assert list(flatten({"raw": b"bytes"})) == [("raw=Ynl0ZXM=", 1.0)]  # JSON's base64
    with pytest.raises(TypeError, match="context 'obj'"):
        list(flatten({"obj": object()}))


# ---- actions ------------------------------------------------------------------------------------


def test_action_id_feature_present() -> None:
    spec = FeatureSpec(action_dim=64)
    rows = Hasher(spec).actions(["small", "large"])
    assert rows.shape == (2, 64) and rows.dtype == np.float32
    for row, aid in zip(rows, ["small", "large"]):
        np.testing.assert_array_equal(row, expected_action(aid, {}, 64))
        assert np.count_nonzero(row) == 2


def test_action_features_hashed_in_action_space() -> None:
    spec = FeatureSpec(context_dim=1024, action_dim=64, seed=5)
    h = Hasher(spec)
    row = h.actions([{"id": "large", "features": {"cost": 3.0, "family": "gpt"}}])[0]
    want = expected_action("large", {"cost": math.log1p(3.0), "family=gpt": 1.0}, 64, 5)
    np.testing.assert_allclose(row, want, rtol=1e-6)
    # the same features as a context land in the context space (different width, different vector)
    ctx = h.context({"cost": 3.0, "family": "gpt"})
    assert ctx.shape == (1024,)
    np.testing.assert_allclose(ctx, expected_vector({"cost": math.log1p(3.0), "family=gpt": 1.0}, 1024, 5), rtol=1e-6)


def test_an_id_whose_two_slots_collide_still_takes_two() -> None:
    dim = 4  # small enough that some ids hash both names to one slot
    aid = next(f"id{i}" for i in range(1000) if slot(f"__action=id{i}", dim)[0] == second_slot(f"id{i}", dim)[0])
    row = Hasher(FeatureSpec(action_dim=dim)).actions([aid])[0]
    np.testing.assert_array_equal(row, expected_action(aid, {}, dim))
    assert np.count_nonzero(row) == 2  # never one slot, where opposite signs could cancel to zero


def test_an_action_vector_never_depends_on_what_was_hashed_before() -> None:
    # whatever names features carry, the slots cached for one action cannot leak into another's
    odd = [{"id": "a", "features": {name: 1.0}} for name in ("\x00second:foo", "__action=foo", "foo", "__action#2=foo")]
    warm = Hasher(FeatureSpec())
    warm.actions(odd)
    np.testing.assert_array_equal(warm.actions(["foo"]), Hasher(FeatureSpec()).actions(["foo"]))
    fresh = Hasher(FeatureSpec())
    fresh.actions(["foo"])
    np.testing.assert_array_equal(fresh.actions(odd), Hasher(FeatureSpec()).actions(odd))


def test_with_one_slot_an_id_takes_it_once() -> None:
    rows = Hasher(FeatureSpec(action_dim=1)).actions([f"id{i}" for i in range(20)])
    assert set(rows[:, 0].tolist()) == {1.0, -1.0}  # never cancelled to zero, never doubled


def test_ten_action_ids_are_almost_never_indistinguishable() -> None:
    # with one signed slot per id, two of ten ids shared slot and sign about half the time at the
    # default width (1 - (63/64)**45); two slots make that about 2% (45 pairs, each matching in
    # both slots, in order or swapped, with both signs: 2 × 1/(32·31·4))
    h = Hasher(FeatureSpec())
    rng = random.Random(0)
    sets = [[f"tool-{rng.getrandbits(32):x}" for _ in range(10)] for _ in range(2000)]
    clashes = sum(len({h.actions(ids)[i].tobytes() for i in range(10)}) < 10 for ids in sets)
    assert clashes / len(sets) < 0.03
    one_slot = sum(len({slot("__action=" + a, 32) for a in ids}) < 10 for ids in sets)
    assert one_slot / len(sets) > 0.35  # what the single slot did


def test_action_forms_are_equivalent() -> None:
    h = Hasher(FeatureSpec(action_dim=32))
    feats = {"cost": 2, "tags": ["a"]}
    rows = h.actions(["x", {"id": "x"}, Action(id="x"), {"id": "y", "features": feats}, Action(id="y", features=feats)])
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])
    np.testing.assert_array_equal(rows[3], rows[4])
    assert not np.array_equal(rows[0], rows[3])


def test_action_parts_and_ids() -> None:
    assert action_parts("a") == ("a", None)
    assert action_parts({"id": "b", "features": {"c": 1}}) == ("b", {"c": 1})
    assert action_parts({"id": 7}) == ("7", None)
    assert action_parts(Action(id="d", features={"e": 2})) == ("d", {"e": 2})
    assert action_ids(["a", {"id": "b"}, Action(id="c")]) == ["a", "b", "c"]


# ---- output buffers -----------------------------------------------------------------------------


def test_context_out_buffer_is_zeroed_and_reused() -> None:
    h = Hasher(FeatureSpec(context_dim=32))
    buf = np.full(32, 99.0, dtype=np.float32)
    got = h.context({"lang": "python"}, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, h.context({"lang": "python"}))
    h.context({"other": 1}, out=buf)
    np.testing.assert_array_equal(buf, h.context({"other": 1}))


def test_action_out_buffer_is_zeroed_and_reused() -> None:
    h = Hasher(FeatureSpec(action_dim=16))
    buf = np.full((2, 16), -5.0, dtype=np.float32)
    got = h.actions(["a", "b"], out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, h.actions(["a", "b"]))
    h.actions(["c", "d"], out=buf)
    np.testing.assert_array_equal(buf, h.actions(["c", "d"]))


def test_cache_limit_does_not_change_results() -> None:
    h = Hasher(FeatureSpec(context_dim=64))
    first = h.context({"k": "v"})
    for i in range(F._CACHE_LIMIT + 10):  # overflow the cache once
        h._slot(f"n{i}", 64, h._ctx_cache)
    assert len(h._ctx_cache) <= F._CACHE_LIMIT
    np.testing.assert_array_equal(h.context({"k": "v"}), first)


def test_action_sets_that_encode_alike_are_not_confused() -> None:
    # JSON writes inf, -inf, NaN and None all as null; the cached sets must still differ
    h = Hasher(FeatureSpec())
    rows = [h.actions([{"id": "a", "features": {"x": v}}]).copy() for v in (math.inf, -math.inf, math.nan, None)]
    fresh = [Hasher(FeatureSpec()).actions([{"id": "a", "features": {"x": v}}]) for v in (math.inf, -math.inf, math.nan, None)]
    for got, want in zip(rows, fresh):
        np.testing.assert_array_equal(got, want)
    for row in rows[:3]:  # stored as null, as None is: missing
        np.testing.assert_array_equal(row, rows[3])


def test_action_sets_cached_apart_hash_as_stored() -> None:
    # the set cache's msgpack key keeps bytes and str apart; both hash as the store keeps them,
    # the bytes as their base64 text (JSON's)
    h = Hasher(FeatureSpec(action_dim=64))
    raw = h.actions([{"id": "a", "features": {"x": b"abc"}}]).copy()
    text = h.actions([{"id": "a", "features": {"x": "YWJj"}}])
    np.testing.assert_array_equal(raw, Hasher(FeatureSpec(action_dim=64)).actions([{"id": "a", "features": {"x": b"abc"}}]))
    np.testing.assert_array_equal(raw, text)
    assert not np.array_equal(raw, Hasher(FeatureSpec(action_dim=64)).actions(["a"]))


def test_action_sets_msgpack_cannot_encode_are_hashed_uncached() -> None:
    h = Hasher(FeatureSpec(action_dim=64))
    huge = [{"id": "a", "features": {"n": 2**70}}]  # past msgpack's 64-bit integers
    rows = h.actions(huge)
    assert rows.flags.writeable and not h._sets_cache  # hashed, not cached
    want = expected_action("a", {"n": math.log1p(2.0**70)}, 64)
    np.testing.assert_allclose(rows[0], want, rtol=1e-6)


def test_context_into_a_strided_or_double_buffer() -> None:
    h = Hasher(FeatureSpec(context_dim=32))
    want = h.context(CTX)
    cols = np.full((32, 3), 7.0, dtype=np.float32)
    h.context(CTX, out=cols[:, 1])  # a column: every other element of memory belongs to others
    np.testing.assert_array_equal(cols[:, 1], want)
    assert (cols[:, [0, 2]] == 7.0).all()
    wide = np.zeros(32, dtype=np.float64)
    np.testing.assert_allclose(h.context(CTX, out=wide), want, rtol=1e-6, atol=1e-7)


class TIER(str, enum.Enum):  # noqa: N801 -- named as an agent's enum might be
    GOLD = "gold"


@pytest.mark.parametrize(
    "value",
    [{"urgent", "vip"}, frozenset({"a"}), datetime.datetime(2026, 1, 1, 8), datetime.date(2026, 1, 1), decimal.Decimal("1.5"),
     uuid.UUID(int=5), b"\x01\xff", math.inf, -math.inf, math.nan, np.float64(1.0), np.int64(3), np.bool_(True),
     np.float32(2.5), np.longdouble(1.5), [np.int64(1), {"k": np.float64(2.0)}], msgspec.msgpack.Ext(5, b"x"),
     TIER.GOLD, [TIER.GOLD, "silver"]],
)
def test_a_context_value_is_scored_on_the_features_it_is_trained_on(value: object) -> None:
    """What a decision is scored on in-process equals what training reads from the stored JSON."""
    context = {"v": value, "task": "code"}
    stored = msgspec.json.decode(spool.encode_line([Decision(id="d", agent="a", context=context, actions=["x"], chosen="x", prob=1.0)], 1.0, 0))
    [kept] = stored["decisions"]
    assert sorted(F.flatten(context)) == sorted(F.flatten(kept["context"]))
    h = Hasher(FeatureSpec())  # its inline path for flat numbers and strings too
    np.testing.assert_array_equal(h.context(context), h.context(kept["context"]))


def test_a_context_value_the_store_cannot_keep_is_refused_naming_its_key() -> None:
    class Odd:
        pass

    with pytest.raises(TypeError, match=r"context 'x\.y\[1\]': a Odd is not a value the store can keep; send a str"):
        list(F.flatten({"x": {"y": [1, Odd()]}}))


def test_numpy_numbers_in_a_frame_go_as_the_values_they_hold() -> None:
    d = Decision(id="d", agent="a", context={"f": np.float64(0.5), "i": np.int64(2), "b": np.bool_(False)}, actions=["x"],
                 chosen="x", prob=1.0)
    for framing in ("json", "msgpack"):
        frame = encode_frame(d, framing)
        decoded = decode_inbound(frame[4:] if framing == "msgpack" else frame.rstrip(b"\n"), framing)
        assert decoded.context == {"f": 0.5, "i": 2, "b": False}
