"""`python -m pichat` is the `pichat` command."""

from pichat.cli import main

main(prog_name="pichat")
