"""``python -m memslot``: the same entry point as the ``memslot`` console script."""

from memslot.cli.main import entry

entry()
