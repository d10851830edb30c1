"""Exceptions with the exit status the command line gives them (SPEC section 9).

``InputError`` (and its subclasses) means the user's config or input is wrong: exit 2, one line
naming the key path, detector, parameter or event. Anything else is exit 1.
"""


class GpusmallError(Exception):
    """Base of the package's own errors."""

    exit_code = 1


class InputError(GpusmallError):
    """Bad config or input: the message names the key path, detector, parameter or event."""

    exit_code = 2


class ConfigError(InputError):
    """The config file does not validate."""


class ConstantsError(InputError):
    """A constants file is missing, has the wrong shape, or holds bad values."""


class BackendError(InputError):
    """The backend asked for cannot be used (e.g. cupy without a usable GPU)."""
