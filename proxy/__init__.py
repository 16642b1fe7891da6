"""jupyter-replay-proxy: a reverse proxy for jupyter-server that keeps every kernel message."""

__version__ = "0.1.0"
