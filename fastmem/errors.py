"""Errors that end a run with one clear line (see the book page "Re-running a chapter")."""


class FastmemError(Exception):
    """A problem with the reader's parameters or environment, not a bug: the message says what to do."""


class UnknownModelError(FastmemError):
    """The model name is neither a known name, a local folder, nor a hub id."""


class HubUnreachableError(FastmemError):
    """A hub model is not cached locally and the model hub cannot be reached."""


class DataError(FastmemError):
    """A vendored data file is missing or its checksum differs from the recorded one."""


class ParameterError(FastmemError):
    """A notebook parameter has the wrong type or an impossible value."""
