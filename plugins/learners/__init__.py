"""Built-in learners, registered in the ``reflexd.learners`` entry-point group like any other.

The contract they meet is ``reflexd.extensions.Learner``. Each module imports torch itself: only
the trainer subprocess loads them.
"""
