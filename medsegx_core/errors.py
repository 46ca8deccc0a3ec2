"""One exception family for everything a user can get wrong.

Every error a user can cause (a bad file, a prompt outside the volume, mismatched weights) is a
``MedSegXError`` whose message is one line naming the thing and the problem and saying what to do. The CLI
prints it as ``medsegx: error: <message>`` and exits non-zero; the Slicer logic shows it in a dialog. Anything
that is not a ``MedSegXError`` is a bug in this project, and keeps its traceback.
"""


class MedSegXError(Exception):
    """Base class: a problem with the user's input, weights, or environment, explained in one line."""


class InputError(MedSegXError):
    """An input file or folder cannot be used (corrupt, unsupported, wrong dimensionality, NaN, ...)."""


class GeometryError(MedSegXError):
    """Two images that must share a grid do not (labelmap vs reference, mask vs volume)."""


class PromptError(MedSegXError):
    """A prompt is missing, malformed, or outside the volume."""


class UnknownTermError(PromptError):
    """A text prompt is not in the anatomical hierarchy; ``suggestions`` holds close names."""

    def __init__(self, text: str, suggestions: list[str]):
        self.text = text
        self.suggestions = list(suggestions)
        hint = f" Did you mean: {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        super().__init__(
            f"unknown structure {text!r}.{hint} Run 'medsegx categories --search TEXT' to list known names."
        )


class WeightsError(MedSegXError):
    """Weights are missing, unsafe to load (pickled code), or do not match the model."""


class OutputError(MedSegXError):
    """An output cannot be written (exists without --overwrite, unwritable folder, ...)."""


class Cancelled(MedSegXError):
    """The user cancelled a long operation; nothing was written."""

    def __init__(self, message: str = "cancelled by the user; nothing was written"):
        super().__init__(message)
