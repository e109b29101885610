"""Error types that map to documented exit codes, so scripts and systemd can tell failures apart."""


class LinewatchError(Exception):
    """A failure the user can act on; the message says what and where."""

    exit_code = 1


class ConfigError(LinewatchError):
    """Bad command line, config file or calibration settings."""

    exit_code = 2


class BundleError(LinewatchError):
    """A model bundle (or weights file) that is missing, corrupt or does not match."""

    exit_code = 3


class DataError(LinewatchError):
    """Input images or datasets that are missing, unreadable or in the wrong layout."""

    exit_code = 4


EXIT_CODES = {
    0: "success",
    1: "runtime failure",
    2: "usage or configuration error",
    3: "model bundle or weights error",
    4: "input data error",
    130: "interrupted (Ctrl-C)",
}
