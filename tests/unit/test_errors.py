"""Every error reflexd raises on purpose: one module, exported, each with its own stable code."""

from __future__ import annotations

import msgspec

import reflexd
from reflexd import errors
from reflexd.errors import FrameError, FrameTooLarge, ModelNotFound, ReflexdError, RequestFailed
from reflexd.service.server import _failure
from reflexd.wire.protocol import Promote

ERRORS = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ReflexdError)]


def test_every_error_type_is_exported_from_the_package() -> None:
    assert len(ERRORS) > 20
    assert {c.__name__ for c in ERRORS} <= set(reflexd.__all__)
    assert all(getattr(reflexd, c.__name__) is c for c in ERRORS)


def test_each_error_type_declares_its_own_code() -> None:
    declared: dict[str, list[str]] = {}
    for cls in ERRORS:
        if "code" in cls.__dict__:
            declared.setdefault(cls.__dict__["code"], []).append(cls.__name__)
    assert {code: names for code, names in declared.items() if len(names) > 1} == {}
    assert [c.__name__ for c in ERRORS if "code" not in c.__dict__] == []
    assert all(code.isidentifier() and code.islower() for code in declared)


def test_the_wire_sends_the_code_not_the_class_name() -> None:
    try:
        raise ModelNotFound("v0042")
    except ModelNotFound as exc:
        reply = _failure(exc, 3, Promote(version="v0042", req=7))
    assert (reply.code, reply.seq, reply.req) == ("model_not_found", 3, 7)
    assert "v0042" in reply.message
    assert msgspec.json.decode(msgspec.json.encode(reply))["code"] == "model_not_found"


def test_frame_errors_carry_the_code_they_were_given() -> None:
    assert FrameError("x").code == "malformed"
    assert FrameError("x", code="invalid").code == "invalid"
    assert FrameTooLarge(10, 5).code == "too_large"
    assert RequestFailed("busy", "too many").code == "busy"
