"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class PersonaProbeError(Exception):
    """Bad input or state that the user can fix. The CLI prints it as one line, no traceback."""
