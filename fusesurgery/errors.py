"""The one exception family of fusesurgery.

Library code raises these; only the CLI turns them into one-line messages and exit codes
(see :mod:`fusesurgery.cli`). Messages name the offending value and, where there is one,
the fix.
"""

from __future__ import annotations


class FuseSurgeryError(Exception):
    """Base class of every error fusesurgery raises on purpose.

    The fix is named as the caller spells it: ``str(error)`` says ``(pass overwrite=True)``
    to a Python caller when the error has an ``argument``, and the command line words it
    with :meth:`cli_message` as ``(pass --overwrite)``.

    Args:
        message: what is wrong.
        flag: the CLI option that supplies the missing value or permission, if any.
        argument: the same fix as a Python caller gives it (``overwrite=True``), where the
            library function takes one; without it both say ``flag``.
    """

    def __init__(self, message: str = "", *, flag: str | None = None,
                 argument: str | None = None) -> None:
        fix = argument if argument is not None else flag
        super().__init__(f"{message} (pass {fix})" if fix is not None else message)
        self.flag = flag
        self.argument = argument
        self.bare_message = message

    def cli_message(self) -> str:
        """The message with the fix spelled as the command-line option."""
        if self.argument is None or self.flag is None:
            return str(self)
        return f"{self.bare_message} (pass {self.flag})"


class CheckpointError(FuseSurgeryError):
    """A checkpoint cannot be read: missing, unreadable, truncated or corrupted."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle needs arbitrary code to load; fusesurgery only loads with weights_only=True."""


class UnrecognizedFormatError(CheckpointError):
    """A path holds nothing fusesurgery recognises as a checkpoint."""


class ConfigError(FuseSurgeryError):
    """A model configuration is missing, inconsistent, or cannot be inferred."""


class KeyMapError(FuseSurgeryError):
    """State-dict keys that no key map knows, or a map that is not one-to-one."""


class ShapeError(FuseSurgeryError):
    """A tensor's shape or dtype does not match what the model or plan expects."""


class WriteError(FuseSurgeryError):
    """An output cannot be written (exists, not writable, out of space)."""


class ValidationError(FuseSurgeryError):
    """A fused model does not compute what the original decoder computed."""


class HubError(FuseSurgeryError):
    """The Hugging Face Hub refused or failed a request: no token, no permission, a repo that
    is missing or cannot be created, a revision that does not exist, or the network."""


class InputError(FuseSurgeryError):
    """An input for running a fused model is unusable: an image that cannot be read, a prompt
    whose image tokens do not match its images, a missing tokenizer or preprocessor."""


class UnsupportedFamilyError(ConfigError):
    """A checkpoint of an architecture no family file describes (a transformers
    ``model_type`` such as ``olmo2`` or ``gemma3_text``).

    Args:
        message: what is wrong.
        model_type: the ``model_type`` met, or None when the keys alone gave it away.
        kind: ``"decoder"`` or ``"vision"``.
        closest: the supported family closest to it, where one was named.
    """

    def __init__(self, message: str = "", *, model_type: str | None = None,
                 kind: str | None = None, closest: str | None = None) -> None:
        super().__init__(message)
        self.model_type = model_type
        self.kind = kind
        self.closest = closest
