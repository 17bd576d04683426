"""The reference graph runner: the engine under test that ships with npugraph-harness."""

__version__ = "0.1.0"  # the project's version too (pyproject.toml reads it from here)
