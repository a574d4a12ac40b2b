"""User-facing errors. Each message is one line that names the file or argument and what is valid.

The CLI prints `error: <message>` and exits with `exit_code`; a traceback is shown only with --debug.
"""


class GptExportError(Exception):
    """Bad input from the user: a file, a directory or a value we cannot use."""

    exit_code = 1


class UsageError(GptExportError):
    """A command-line or API argument outside its valid range."""

    exit_code = 2


class CheckpointError(GptExportError):
    """A checkpoint file that is missing, unreadable or not a nanoGPT/GPT-2 checkpoint."""


class TokenizerError(GptExportError):
    """A tokenizer file that is missing or malformed, or text it cannot encode."""


class ModelDirError(GptExportError):
    """A model directory that is missing files, was tampered with, or has an unknown format."""


class BackendUnavailable(GptExportError):
    """A backend whose libraries or hardware are not present on this machine."""


def check_format(header: object, where: object, what: str, fmt: str, version: int,
                 error: type = GptExportError, hint: str = "") -> None:
    """The header of one of our self-describing files ({"format": fmt, "format_version": version}),
    or a one-line `error` naming `where` and what this gptexport reads."""
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise error(f"{where}: not a gptexport {what} (format must be {fmt!r})")
    found = header.get("format_version")
    if found != version:
        raise error(f"{where}: format_version {found!r} is not supported (this gptexport reads {version}){hint}")
