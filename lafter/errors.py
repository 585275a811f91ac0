"""Typed errors: one class per failure a caller can act on, each with a stable machine code.

The service maps ``LafterError.code`` straight into problem-JSON responses and job errors, so codes
are part of the public contract: never rename one.
"""

from __future__ import annotations


class LafterError(Exception):
    """Base class. ``code`` is stable and machine-readable; the message is for humans."""

    code = "lafter_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidModelSpecError(LafterError):
    code = "invalid_model_spec"


class WeightsUnavailableError(LafterError):
    """The weights a spec names cannot be fetched or read (no network, unknown tag, missing file)."""

    code = "weights_unavailable"


class UnsupportedArchitectureError(LafterError):
    """LaFTer needs a ViT image tower (prompts are tokens); anything else is refused."""

    code = "unsupported_architecture"


class DescriptionError(LafterError):
    code = "descriptions_failed"


class LLMError(DescriptionError):
    """The language model could not produce usable descriptions (HTTP errors, timeouts, junk)."""

    code = "llm_failed"


class InvalidInputError(LafterError):
    code = "invalid_input"


class ClassNamesError(InvalidInputError):
    """Class names that cannot be trained on (``descriptions.validate_class_names``). ``code`` says
    which rule (``class_name_empty``, ``class_name_too_long``, ``class_names_duplicate``,
    ``class_names_too_few``, ``class_names_too_many``, ``class_names_invalid``) and ``field`` which
    name: ``class_names.3``, or ``class_names`` for the list as a whole."""

    code = "class_names_invalid"

    def __init__(self, message: str, *, code: str, field: str = "class_names") -> None:
        super().__init__(message, code=code)
        self.field = field


class ArtifactError(LafterError):
    code = "artifact_invalid"


class CorruptArtifactError(ArtifactError):
    code = "artifact_corrupt"


class ArtifactMismatchError(ArtifactError):
    """The artifact was made for another base model or has tensors of the wrong shape."""

    code = "artifact_mismatch"


class Cancelled(LafterError):
    """Raised between steps when the caller's cancellation check says stop."""

    code = "cancelled"

    def __init__(self, message: str = "cancelled", *, stage: str = "", step: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.step = step
