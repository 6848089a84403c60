"""One exception type for user-facing errors.

Everything a user can get wrong (a bad path, an unknown name, a shape mismatch) raises
:class:`FewstepError` with a one-line message that names the problem and the fix. The CLI prints
it as ``error: <message>`` and exits with status 2; Python callers catch it like any error.
"""

from __future__ import annotations


class FewstepError(ValueError):
    """A user-facing error: one line naming the problem and how to fix it."""
