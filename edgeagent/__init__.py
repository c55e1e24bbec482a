"""edgeagent: a small log agent for embedded Linux that does not lose a line."""

__version__ = "0.1.0"
