"""The fleet: one model trained on many hosts' archives (``reflexd fleet train``), on Ray.

``archive`` reads a host's Parquet archive (a local path or any filesystem pyarrow supports) and
joins its decisions and rewards exactly as the host's own snapshot does (``reflexd.learning.join``
on an in-memory DuckDB); ``train`` reads every host as a Ray task, trains one model data-parallel
with Ray Train's CPU workers, gates it by off-policy evaluation on the pooled holdout
(``reflexd.learning.runs.judge_run``, as a host does) and writes the ONNX file and manifest a host's
registry holds, for ``reflexd models pull``.

Ray is the optional ``fleet`` extra (``pip install 'reflexd[fleet]'``): imported only inside
``train``'s functions, never by the daemon or the client (``tests/unit/test_layout.py``).
"""
