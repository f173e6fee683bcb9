"""The package's errors: one base class with a diagnostic message, one subclass per kind.

Every error names *where* (a file or setting), *what was expected* and *what was
found*, so a Kaggle user can fix the input without reading a traceback.
"""

from __future__ import annotations

import os
from typing import Any


class Nx46Error(Exception):
    """Base of every error raised on purpose by nx46vx.

    Parameters
    ----------
    what : str
        One sentence saying what went wrong.
    path : str or os.PathLike, optional
        The file or folder concerned.
    expected, found : Any, optional
        What the input should have been and what it was.
    hint : str, optional
        What the user can do about it.
    """

    def __init__(
        self,
        what: str,
        *,
        path: str | os.PathLike[str] | None = None,
        expected: Any = None,
        found: Any = None,
        hint: str | None = None,
    ) -> None:
        self.what = what
        self.path = None if path is None else os.fspath(path)
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.what]
        if self.path is not None:
            parts.append(f"file: {self.path}")
        if self.expected is not None or self.found is not None:
            parts.append(f"expected {self.expected}, got {self.found}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return " | ".join(parts)


class ConfigError(Nx46Error):
    """A profile, config file or override is invalid."""


class DataLayoutError(Nx46Error):
    """The input folders do not hold the competition layout."""


class TestSetError(DataLayoutError):
    """test.csv and test_images/ disagree, or the test set is empty."""

    __test__ = False  # not a pytest test class


class VolumeError(Nx46Error):
    """A volume or label TIFF cannot be used."""


class VolumeReadError(VolumeError):
    """The file is not a readable TIFF."""


class VolumeShapeError(VolumeError):
    """The volume is not 3-D, or a label's shape differs from its image."""


class VolumeDtypeError(VolumeError):
    """The volume is not uint8."""


class LabelValueError(VolumeError):
    """A label volume holds values outside {0, 1, 2}."""


class JournalError(Nx46Error):
    """The journal cannot be written or does not verify."""


class SubmissionError(Nx46Error):
    """submission.zip failed its validation."""


class CheckpointError(Nx46Error):
    """A checkpoint is corrupt, incompatible or cannot be written."""


class OutputNotWritableError(Nx46Error):
    """The output folder cannot hold the run's files."""


class OutputLockedError(Nx46Error):
    """Another live nx46vx run holds the output folder's lock."""


class SearchError(Nx46Error):
    """The candidate search cannot give what was asked of it (no finished fit yet)."""


class DistillationNotExecuted(Nx46Error):
    """Distillation was asked for but no optimiser step ran or a teacher failed to load."""


class ModelFolderError(Nx46Error):
    """A trained-model folder (nnU-Net's) is incomplete, unsupported, or holds more than weights and plain data."""


class DependencyError(Nx46Error):
    """A package this work needs is not installed (the message names it and how to install it)."""


class ParallelTrainingError(Nx46Error):
    """A data-parallel training process failed, or a batch does not fit the data-parallel layout."""


class NativeKernelError(Nx46Error):
    """The fused CPU search kernel cannot be built or loaded (``search.kernel = "native"``)."""


class MemoryLimitError(Nx46Error):
    """A volume and the working copies its processing needs do not fit in the memory this process may use."""
