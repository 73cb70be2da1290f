"""Hostile files for the checkpoint-loading tests."""

from __future__ import annotations

import os
from pathlib import Path


class PicklePayload:
    """Pickles as a call to os.system: unpickling it creates ``marker``. For tests that nothing unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import shlex

        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))
