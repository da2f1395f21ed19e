"""The installer's error types.

Every failure a user can cause or fix is an InstallerError: the CLI prints its
message and hint on one line each and exits with its code, no traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2


class InstallerError(Exception):
    """A failure with a one-line message, an optional hint and an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(InstallerError):
    """Bad input on the command line or in a pins/recipe override (exit 2)."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """A malformed recipe or pins file; the message names the file and key."""


class StepFailed(InstallerError):
    """A recipe step's command failed; its log stays on disk."""


def command(prefix: object, *args: str) -> str:
    """A hint that is a command the user can paste: `rdna4-install ARGS --prefix PREFIX`."""
    import shlex

    return "rdna4-install " + " ".join(shlex.quote(str(a)) for a in (*args, "--prefix", prefix))


class NotFound(InstallerError):
    """An artifact a pin names is not on its upstream. `pin` is the pin to change and
    `nearest` what the upstream has instead (newest first), for `pins check` and hints."""

    def __init__(self, message: str, hint: str | None = None, *, recipe: str = "", name: str = "",
                 want: str = "", url: str = "", pin: str = "", nearest: list[str] | None = None):
        super().__init__(message, hint)
        self.recipe, self.name, self.want, self.url, self.pin = recipe, name, want, url, pin
        self.nearest = list(nearest or [])
class Refused(InstallerError):
    """The bytes of a download are refused: wrong sha256, an unsafe or corrupt
    archive, a tree without the expected layout. download.fetch drops such a file
    from the cache and never records its hash, so a rerun downloads it afresh."""
