"""The `gptexport` command: a thin shell over the library (app.py: the group and its error
handling; commands.py: one command per stage; inputs.py: flags, files and stdin as arguments)."""

from . import commands  # noqa: F401  (registers the commands on `main`)
from .app import main

__all__ = ["main"]
