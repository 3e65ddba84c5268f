"""Errors a user can cause: each carries one sentence that names the file or key and the fix."""


class LmforgeError(Exception):
    """A mistake in the user's input or configuration (not a bug): printed as one line, exit 1."""


class ConfigError(LmforgeError, ValueError):
    """A model or sampling setting out of range: a ValueError that the CLI prints as one line."""


def missing_extra(command: str, extra: str, alternative: str = "") -> LmforgeError:
    """The error for ``command`` when its optional dependency is not installed: one line naming
    the ``pip install`` that adds the extra (``alternative``: another way out, in parentheses)."""
    return LmforgeError(f"{command} needs the `{extra}` extra: pip install 'lmforge[{extra}]'"
                        + (f" ({alternative})" if alternative else ""))
