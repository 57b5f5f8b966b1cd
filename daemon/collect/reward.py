"""Reward expressions: arithmetic over an episode's (or a step's) outcomes, from the config.

``traces.reward`` and ``traces.step_reward`` are written like ``success - 0.001 * tokens - 0.1 *
seconds``. The text is parsed by ``ast`` and every node checked against a short whitelist:
numbers, the names in ``VARIABLES``, ``+ - * / // % **``, unary ``- + not``, comparisons (1 or 0),
``and``/``or``, ``x if c else y`` and the functions in ``FUNCTIONS``. The checked tree becomes a
tree of closures; nothing is ever handed to ``eval`` or ``compile``. Numbers are floats
throughout, so ``**`` overflows (an error) instead of computing a huge integer.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable, Mapping

VARIABLES = (
    "success",  # 1 when the span's status is not an error and it has no error.type, else 0
    "error",  # 1 - success
    "seconds",  # the span's duration
    "tokens",  # input_tokens + output_tokens
    "input_tokens",  # gen_ai.usage.input_tokens (an episode without its own: its steps' sum)
    "output_tokens",  # gen_ai.usage.output_tokens (likewise)
    "score",  # the mean gen_ai.evaluation.score.value of its gen_ai.evaluation.result events; 0 without
    "scored",  # 1 with such an event, else 0
    "steps",  # an episode's steps (1 for a step)
    "failed_steps",  # of those, the ones that failed
)
FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "log": math.log,
    "exp": math.exp,
    "sqrt": math.sqrt,
}
_ARITY = {"min": (2, 64), "max": (2, 64), "abs": (1, 1), "log": (1, 2), "exp": (1, 1), "sqrt": (1, 1)}
MAX_CHARS = 1000
MAX_DEPTH = 40

_Fn = Callable[[Mapping[str, float]], float]
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[float, float], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


class Expression:
    """A checked reward expression; call it with the variables to get a finite float.

    Building one raises ValueError naming what is not allowed; calling one raises ValueError when
    the result is not a finite number (a division by zero, an overflow, log of 0).
    """

    __slots__ = ("text", "names", "_fn")

    def __init__(self, text: str, names: tuple[str, ...] = VARIABLES) -> None:
        self.text = text
        self.names = names
        if len(text) > MAX_CHARS:
            raise ValueError(f"longer than {MAX_CHARS} characters")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"not an expression: {exc.msg}") from None
        except (RecursionError, MemoryError):
            raise ValueError("nested too deeply") from None
        self._fn = self._compile(tree.body, 0)

    def __call__(self, variables: Mapping[str, float]) -> float:
        try:
            value = float(self._fn(variables))
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise ValueError(f"{self.text!r}: {exc}") from None
        if not math.isfinite(value):
            raise ValueError(f"{self.text!r} is {value}, not a finite number")
        return value

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    def _compile(self, node: ast.AST, depth: int) -> _Fn:
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        below = depth + 1
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (int, float)):  # bool is an int: True counts as 1
                constant = float(node.value)
                return lambda env: constant
            raise ValueError(f"{node.value!r}: only numbers are allowed")
        if isinstance(node, ast.Name):
            name = node.id
            if name not in self.names:
                raise ValueError(f"{name!r} is not a variable; use {', '.join(self.names)}")
            return lambda env: float(env[name])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op, left, right = _BINARY[type(node.op)], self._compile(node.left, below), self._compile(node.right, below)
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.UnaryOp):
            operand = self._compile(node.operand, below)
            if isinstance(node.op, ast.USub):
                return lambda env: -operand(env)
            if isinstance(node.op, ast.UAdd):
                return operand
            if isinstance(node.op, ast.Not):
                return lambda env: 0.0 if operand(env) else 1.0
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            first = self._compile(node.left, below)
            rest = [(_COMPARE[type(op)], self._compile(c, below)) for op, c in zip(node.ops, node.comparators)]

            def compare(env: Mapping[str, float]) -> float:
                left = first(env)
                for op, fn in rest:
                    right = fn(env)
                    if not op(left, right):
                        return 0.0
                    left = right
                return 1.0

            return compare
        if isinstance(node, ast.BoolOp):
            parts = [self._compile(v, below) for v in node.values]
            if isinstance(node.op, ast.And):
                return lambda env: _and(parts, env)
            return lambda env: _or(parts, env)
        if isinstance(node, ast.IfExp):
            test, yes, no = self._compile(node.test, below), self._compile(node.body, below), self._compile(node.orelse, below)
            return lambda env: yes(env) if test(env) else no(env)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise ValueError(f"{ast.unparse(node.func)!r} is not a function here; use {', '.join(FUNCTIONS)}")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) or not node.args:
                raise ValueError(f"{node.func.id}() takes plain arguments")
            low, high = _ARITY[node.func.id]
            if not low <= len(node.args) <= high:
                raise ValueError(f"{node.func.id}() takes {low if low == high else f'{low} to {high}'} arguments")
            fn = FUNCTIONS[node.func.id]
            args = [self._compile(a, below) for a in node.args]
            return lambda env: fn(*(a(env) for a in args))
        raise ValueError(f"{_describe(node)} is not allowed")


def _and(parts: list[_Fn], env: Mapping[str, float]) -> float:
    value = 1.0
    for part in parts:
        value = part(env)
        if not value:
            return value
    return value


def _or(parts: list[_Fn], env: Mapping[str, float]) -> float:
    value = 0.0
    for part in parts:
        value = part(env)
        if value:
            return value
    return value


def _describe(node: ast.AST) -> str:
    try:
        return repr(ast.unparse(node))
    except Exception:  # an odd node ast cannot print: its type says enough
        return type(node).__name__


def problem(text: str) -> str | None:
    """Why ``text`` is not a reward expression, or None if it is."""
    try:
        Expression(text)
    except ValueError as exc:
        return str(exc)
    return None


def variables(**values: Any) -> dict[str, float]:
    """Every name in VARIABLES, 0 unless given."""
    out = dict.fromkeys(VARIABLES, 0.0)
    out.update({k: float(v) for k, v in values.items()})
    return out
