"""reflexd's benchmarks, run from the repository's root as modules:

    python -m bench.perf        the performance benchmark (make bench)
    python -m bench.learning    the learning-quality benchmark (make bench-learning)
    python -m bench.replay      its in-process replay (make bench-replay)

Each needs the ``[bench]`` extra (Vowpal Wabbit, scikit-learn). The daemon each one starts is
``reflexd.testing.LocalDaemon``, the tests' and the demo's launcher.
"""
