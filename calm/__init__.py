"""The ``calm`` command line: runs actors, workers, the supervisor and the client tools."""

import os

# CALM runs one process per actor and per worker on shared cores. numpy's BLAS thread pool only
# oversubscribes them: the analyzer's 5,000-row matrix-vector product kept two cores busy for the
# wall time of one and starved the other actors. Set before numpy is imported; a user's value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
