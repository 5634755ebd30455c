"""One exception hierarchy for attnmask: every error is an `AttnmaskError`, itself a `ValueError`.

Messages name the argument, what was expected and what was given, e.g.
``ShapeError: q: expected a 4D tensor (B, H, Q, D), got shape (2, 3, 4)``.
"""

from __future__ import annotations


class AttnmaskError(ValueError):
    """Base class of every error attnmask raises on bad input."""


class SpecError(AttnmaskError):
    """A mask spec was built or evaluated with inconsistent arguments."""


class ShapeError(AttnmaskError):
    """A tensor has the wrong number of dimensions or sizes that do not match."""


class DTypeError(AttnmaskError):
    """A tensor has a dtype the operation does not accept."""


class DeviceError(AttnmaskError):
    """Tensors that must share a device do not."""


class InputError(AttnmaskError):
    """Data (sequences, lengths, labels, options) that cannot be used as given."""


class LabelError(InputError):
    """Label hints (``labels``, ``assistant_masks``, ``completion_mask``, ``prompt_length(s)``) that cannot be used."""


class NoTargetError(LabelError):
    """A step or batch with no target token: its loss would be 0 and it would train nothing."""


class BackendError(AttnmaskError):
    """An attention backend or lowering cannot serve the requested mask or inputs."""


class UnsupportedModelError(BackendError):
    """A transformers model whose attention attnmask cannot serve exactly: it computes with the mask itself (its own
    attention code), mixes tokens outside attention (state-space, convolution, linear-attention layers) on packed
    rows, or does not hand the packed rows' document boundaries to its attention."""


class MaskObjectError(UnsupportedModelError, AttributeError):
    """A model used the mask description attnmask's transformers integration hands its layers (``HFMaskInfo``) as a
    tensor. Also an ``AttributeError``, so that ``hasattr`` / ``getattr(..., default)`` probes keep working."""


class ExprError(SpecError):
    """A mask expression that cannot be parsed or built. ``column`` is 1-based; ``caret()`` points at it.

    ``str(err)`` is one line, e.g. ``unknown name 'foo' at column 9``.
    """

    def __init__(self, message: str, text: str, column: int, hint: str | None = None):
        self.message, self.text, self.column, self.hint = message, text, column, hint
        super().__init__(f"{message} at column {column}" + (f"; {hint}" if hint else ""))

    def caret(self) -> str:
        """The expression and a caret under the offending column, two lines (at most 120 columns around it)."""
        start = max(0, self.column - 60)
        text = self.text[start : start + 120]
        return f"  {text}\n  {' ' * (self.column - 1 - start)}^"


class CliError(AttnmaskError):
    """A failure of the ``attnmask`` command caused by its arguments: printed as ``attnmask: error: <message>`` with
    exit code 2."""


def bad(cls: type[AttnmaskError], arg: str, expected: str, actual: object) -> AttnmaskError:
    """Build ``cls("<arg>: expected <expected>, got <actual>")``; the caller raises it. ``actual`` as ``str`` gives it,
    or, where that fails (an int past Python's 4,300-digit limit), its type (``shown``)."""
    return cls(f"{arg}: expected {expected}, got {shown(actual, str)}")


def shown(value: object, form=repr, limit: int | None = None) -> str:
    """``form(value)`` (``repr`` or ``str``), cut to ``limit`` characters when given, for an error message that must
    not fail itself: a value ``form`` cannot print (an int past Python's 4,300-digit limit) shows as ``<int that
    cannot be printed>``."""
    try:
        text = form(value)
    except ValueError:
        return f"<{type(value).__name__} that cannot be printed>"
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class ChatTemplateError(InputError):
    """A chat template renders a conversation in a way whose turns cannot be located exactly."""
