"""The one user-facing error type.

Anything the user must fix (a file, a key, a choice) is raised as VlaBenchError with a message that names it;
the CLI prints the message and exits 2, the pytest plugin turns it into a usage error. Bugs stay ordinary
exceptions with tracebacks.
"""


class VlaBenchError(Exception):
    """An error in the user's input or environment, with a message that says what to fix."""


def choices(valid) -> str:
    """Format the valid choices for an error message: 'a, b, c'."""
    return ", ".join(str(v) for v in valid)
