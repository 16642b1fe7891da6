"""Taps: what follows the relay's events (the log now; replay, Y fold and audit beside it)."""
