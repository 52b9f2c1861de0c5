"""Exceptions that foldkit raises. The CLI maps each family to an exit code."""


class FoldkitError(Exception):
    """Base class of every error foldkit raises for bad input or a failed step."""

    def __str__(self) -> str:
        # KeyError-style quoting never reaches users: the message is the first argument as is.
        return str(self.args[0]) if self.args else self.__class__.__name__


class InputError(FoldkitError):
    """A base model, adapter or option that foldkit cannot use as given."""


class UsageError(FoldkitError):
    """An option value that is invalid whatever the inputs (a size, a device, a mode)."""


class CheckpointError(InputError):
    """A base checkpoint that is missing, unreadable, corrupt or inconsistent."""


class AdapterError(InputError):
    """An adapter that is missing, unreadable, corrupt or made for another base."""


class UnsupportedAdapterError(AdapterError):
    """An adapter feature that foldkit cannot fold (and will not skip silently)."""


class OutputError(FoldkitError):
    """An output directory that cannot be written as requested."""


class VerificationError(FoldkitError):
    """The merged model's outputs differ from the reference beyond tolerance."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
