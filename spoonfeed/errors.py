"""The exception classes: each message names the fix, in the notebook's words or, headless, in spoonfeed_run's."""

from __future__ import annotations

import contextlib

_HEADLESS = []  # non-empty inside headless(): the run is a command (spoonfeed_run), not the notebook's cells


@contextlib.contextmanager
def headless():
    """Within the block, fixes worded with in_notebook give their headless wording: the run is driven by a command
    (`python -m spoonfeed_run`, `accelerate launch ... -m spoonfeed_run`), which has no cells to rerun. spoonfeed_run
    wraps its run in it; a papermill run is the notebook's cells, and keeps their wording."""
    _HEADLESS.append(True)
    try:
        yield
    finally:
        _HEADLESS.pop()


def in_notebook(notebook: str, headless: str) -> str:
    """A fix that names a notebook cell ("rerun cell 3"): the notebook's wording, or inside headless() the one for
    a command ("rerun the same spoonfeed_run command"). Every message that names a cell goes through here
    (tests/test_robustness.py checks the sources)."""
    return headless if _HEADLESS else notebook


class ConfigError(ValueError):
    """A setting that cannot work; the message names the fix."""


class PromptTooLongError(ValueError):
    """A prompt that leaves the student no position to generate into."""


class TeacherUnavailableError(RuntimeError):
    """The teacher could not be loaded; the message names the offline choice."""


class NonFiniteTeacherError(RuntimeError):
    """The teacher produced NaN/inf hidden states; the message names its dtype and what to change."""


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite value; the message names the cause (see _FaultGuard)."""


class NonFiniteTargetError(NonFiniteLossError):
    """The cached teacher states of a batch are not finite: the cache or the teacher is at fault, not the LR."""


class NonFiniteGradientError(NonFiniteLossError):
    """The loss was finite but its gradient was not, step after step: not a learning-rate problem."""


class PhaseOrderError(RuntimeError):
    """A cell ran before the one it needs; the message names the cell to run first."""
