"""The exception classes: each message names the fix."""

from __future__ import annotations


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
