"""Errors that end a run with one clear line (see the book page "Re-running a chapter")."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error, to quote inside one of ours without breaking the one-line rule."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class FastmemError(Exception):
    """A problem with the reader's parameters or environment, not a bug: the message says what to do."""


class UnknownModelError(FastmemError):
    """The model name is neither a known name, a local folder, nor a hub id."""


class ModelFolderError(UnknownModelError):
    """A model name that is a path names a missing folder, or a folder that holds no loadable model."""


def missing_model_folder(name: str, folder) -> ModelFolderError:
    """The one line for a model folder that does not exist (all chapters; ``folder`` is where it was looked for)."""
    from .names import KNOWN_MODELS

    return ModelFolderError(f"model folder {name!r} does not exist ({folder}): check the path, "
                            f"or use one of {', '.join(KNOWN_MODELS)}")


class HubUnreachableError(FastmemError):
    """A hub model is not cached locally and the model hub cannot be reached."""


class DataError(FastmemError):
    """A vendored data file is missing or its checksum differs from the recorded one."""


class ParameterError(FastmemError):
    """A notebook parameter has the wrong type or an impossible value."""


class MemoryFileError(FastmemError):
    """A saved memory file is missing, damaged, of another kind or format, or belongs to another model."""
