"""`python -m gptexport ...` runs the same CLI as the `gptexport` command."""

from .cli import main

main(prog_name="gptexport")
