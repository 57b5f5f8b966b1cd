"""Knowledge extraction: numbers in, findings out.

A snapshot of matured decisions (``reflexd.service.store.rewards.snapshot``'s Parquet) and what
the daemon knows besides (``findings.ExtractionInputs``) go in; ``findings.Insights`` comes out:
patterns, rules, anomalies and trends, each estimated counterfactually from the logged
propensities (doubly robust, with intervals), rules published only after holding on decisions
they were not found on. ``extract`` is the one entry; ``python -m reflexd.analysis`` runs it as
the daemon's idle-priority subprocess.

The daemon imports only ``findings`` and ``result`` (msgspec alone); ``extract`` and the finders
(numpy, pyarrow, scikit-learn) are loaded when first named, so naming this package costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflexd.analysis.extraction import extract

__all__ = ["extract"]


def __getattr__(name: str) -> Any:
    if name == "extract":
        from reflexd.analysis.extraction import extract

        return extract
    raise AttributeError(f"module 'reflexd.analysis' has no attribute {name!r}")
