"""Errors a user can cause: each carries one sentence that names the file or key and the fix."""


class LmforgeError(Exception):
    """A mistake in the user's input or configuration (not a bug): printed as one line, exit 1."""


class ConfigError(LmforgeError, ValueError):
    """A model or sampling setting out of range: a ValueError that the CLI prints as one line."""
