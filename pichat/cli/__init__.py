"""The `pichat` command: options in, a config object out, then the service runs.

Every option can also be set by the environment variable shown in `--help` (PICHAT_*),
so a systemd EnvironmentFile or a compose file can hold the whole configuration, and
every option's default is its config dataclass's (pichat/config.py), stated once.

    daemons.py   pichat router, pichat worker
    clients.py   pichat ask, chat, status, conversations
    tools.py     pichat up, health, keygen, models
    options.py   what they share
"""

from __future__ import annotations

import click

from pichat import __version__
from pichat.cli import clients, daemons, joining, tools

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pichat")
def main() -> None:
    """pichat: one chat service from a handful of small computers.

    \b
    Quick start on one machine:
      pichat up --workers 2              # a router and two workers
      pichat ask "Hello, how are you?"   # in another shell
    """


for command in (daemons.router, daemons.worker, clients.ask, clients.chat, clients.status,
                clients.conversations, tools.up, tools.models, tools.health,
                tools.keygen_command, joining.invite_command, joining.join_command,
                joining.keys_command):
    main.add_command(command)
