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


class ParameterError(UsageError):
    """A library argument outside its valid range, named as the Python API names it (`top_k`).

    The CLI and the server say the same in their own words (`--top-k`, the request input
    `top_k`) with `worded`; str(e) is the API's wording.
    """

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(f"{param} {problem}")

    def worded(self, name: str) -> str:
        return f"{name} {self.problem}"


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name if it has none)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
