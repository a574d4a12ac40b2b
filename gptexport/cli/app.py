"""The `gptexport` command: each subcommand is a thin shell over one library call.

Errors from bad input print one line (`error: ...`) and exit 1; usage errors exit 2; --debug
shows the traceback instead.
"""

from __future__ import annotations

import errno
import traceback

import click

from ..errors import GptExportError, ParameterError
from .inputs import flag_error


class Group(click.Group):
    """Turns GptExportError, click's usage errors and OS errors into one line and an exit code."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:  # the group's own options, e.g. `gptexport --nope`
            if isinstance(e, click.exceptions.NoArgsIsHelpError):
                raise  # no arguments at all: click prints the help
            _fail(None, _click_message(e), e.exit_code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ParameterError as e:  # a library argument: say it as the flag that set it
            _fail(ctx, str(flag_error(e)), e.exit_code)
        except GptExportError as e:
            _fail(ctx, str(e), e.exit_code)
        except click.UsageError as e:  # a subcommand's options: bad value, missing argument...
            _fail(ctx, _click_message(e), e.exit_code)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise  # stdout closed (`| head`): click exits quietly
            # a safety net: library code maps the OS errors it expects to messages of its own
            _fail(ctx, f"{e.filename}: {e.strerror}" if e.filename else str(e), 1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _fail(ctx: click.Context | None, message: str, code: int):
    """Print `error: message` on one line (the traceback first with --debug) and exit with `code`."""
    if ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get("debug"):
        traceback.print_exc()
    click.echo("error: " + " ".join(message.splitlines()), err=True)
    raise click.exceptions.Exit(code)


def _click_message(e: click.UsageError) -> str:
    """click's message, with the --help hint it would print on lines of its own."""
    command = e.ctx.command_path if e.ctx is not None else "gptexport"
    return f"{e.format_message()} (see `{command} --help`)"


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(package_name="gptexport")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Export nanoGPT checkpoints to ONNX / TensorRT and run them without PyTorch."""
    ctx.ensure_object(dict)["debug"] = debug
