"""The errors a service reports in one line at start-up and exits 1 for: the user can fix them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A command-line or configuration value is invalid; the message names the flag."""


class StartupError(RuntimeError):
    """The service cannot start as configured (a port in use, a missing directory, a KV cache
    too small for one sequence)."""
