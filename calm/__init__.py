"""The ``calm`` command line: runs actors, workers, the supervisor and the client tools."""

__version__ = "0.1.0"
