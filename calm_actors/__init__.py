"""CALM's MAPE-K actors and the scheduler; each runs as its own process and talks only through broker/."""
