"""The one error type of the data stack: it names the dataset root, the file and the episode.

Every failure to read a sample (a truncated mp4, a corrupt parquet, a missing column, an episode shorter than its
metadata says) is raised as ``DataError`` from the code that knows which file and episode it was reading, so a
DataLoader worker's traceback starts with a sentence a person can act on instead of a PyAV or Arrow internal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class DataError(RuntimeError):
    """A dataset could not be read. ``root``, ``file`` and ``episode`` say where (any may be None)."""

    def __init__(self, message: str, *, root: Optional[str | Path] = None, file: Optional[str | Path] = None,
                 episode: Optional[int | str] = None):
        self.root = None if root is None else str(root)
        self.file = None if file is None else str(file)
        self.episode = episode
        where = []
        if root is not None:
            where.append(f"dataset {self.root}")
        if file is not None:
            where.append(f"file {self.file}")
        if episode is not None:
            where.append(f"episode {episode}")
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)
        self.message = message

    def __reduce__(self):
        # picklable across DataLoader worker processes with its fields intact
        return (_rebuild, (self.message, self.root, self.file, self.episode))


def _rebuild(message, root, file, episode):
    return DataError(message, root=root, file=file, episode=episode)
