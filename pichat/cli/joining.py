"""`pichat invite`, `pichat join` and `pichat keys`: letting a new Pi in with a token
(pichat/invites.py), without copying any other host's secret to it."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import click
import zmq
import zmq.auth

from pichat.cli import options as o
from pichat.config import DEFAULT_JOIN_PORT, host_name
from pichat.errors import PichatError
from pichat.invites import (
    PREFIX,
    ROLES,
    InviteRefused,
    invite,
    members,
    parse,
    remember_router,
    revoke,
    stored_router,
)
from pichat.protocol import Error, Join, decode, encode
from pichat.security import DEFAULT_KEYS_DIR
from pichat.transport import ENDPOINT, port_of, this_host

__all__ = ["invite_command", "join_command", "keys_command", "this_host", "join",
           "join_once", "Unreachable"]


@click.command(name="invite")
@o.option("--keys", env="KEYS", default=str(DEFAULT_KEYS_DIR),
          help="The router's keys directory.")
@o.option("--role", env="INVITE_ROLE", type=click.Choice(ROLES), default="worker",
          help="What the new Pi will be.")
@o.option("--ttl", env="INVITE_TTL", type=click.FloatRange(1), default=3600.0,
          help="Seconds the token is good for.")
@o.option("--uses", env="INVITE_USES", type=click.IntRange(1, 1000), default=1,
          help="How many Pis may join with it.")
@o.option("--address", "addresses", env="INVITE_ADDRESS", multiple=True, show_default=False,
          help=f"The router's join endpoint as the Pi will reach it [default: tcp://THIS "
               f"HOST'S LAN ADDRESS:{DEFAULT_JOIN_PORT} and tcp://HOSTNAME.local:"
               f"{DEFAULT_JOIN_PORT}] (repeatable).")
def invite_command(keys: str, role: str, ttl: float, uses: int,
                   addresses: tuple[str, ...]) -> None:
    """Print a one-line token with which a new Pi joins the cluster (`pichat join`).

    \b
    Example, on the router's host:
      pichat invite                      # a worker, one use, good for an hour
      pichat invite --role client --uses 5 --ttl 86400
    The token holds the router's addresses and public key and a one-time secret; the Pi
    makes its own keys and the router admits them. No host's secret key travels.
    """
    directory = Path(keys).expanduser()
    try:
        router_key = zmq.auth.load_certificate(directory / "router.key")[0].decode()
    except (OSError, ValueError):
        o.fail(PichatError(f"no router keys in {directory}: run `pichat keygen --keys "
                           f"{directory}` first (on the router's host)"))
    where = addresses or (f"tcp://{this_host()}:{DEFAULT_JOIN_PORT}",
                          f"tcp://{socket.gethostname()}.local:{DEFAULT_JOIN_PORT}")
    made = invite(directory, role=role, addresses=tuple(where),  # type: ignore[arg-type]
                  router_key=router_key, ttl=ttl, uses=uses)
    from pichat.discovery import answers

    if not any(answers(address) for address in where):
        click.echo(f"warning: nothing answers at {' or '.join(where)} now: start the router "
                   "(its --join-bind reachable from the Pis, not 127.0.0.1), or give the "
                   "address the Pis reach it by with --address", err=True)
    click.echo(made.token())
    click.echo(f"(a {role} token, {uses} use{'s' if uses > 1 else ''}, good for "
               f"{ttl / 60:.0f} minutes: on the new Pi run  pichat join TOKEN)", err=True)


@click.command(name="join")
@click.argument("token")
@o.option("--keys", env="KEYS", default=str(DEFAULT_KEYS_DIR),
          help="This Pi's keys directory (made if missing).")
@o.option("--name", env="JOIN_NAME", default=None,
          help="The name the router admits this Pi under [default: the hostname].")
@o.option("--timeout", env="JOIN_TIMEOUT", type=click.FloatRange(0.1), default=10.0,
          help="Seconds to wait for the router at each address.")
def join_command(token: str, keys: str, name: str | None, timeout: float) -> None:
    """Join a cluster with a token from `pichat invite`: make this Pi's own key pair, let
    the router admit it, and remember the router (then `pichat worker` or `pichat ask`
    need no --router or --keys).

    \b
    Example:
      pichat join pichat1.eyJy...
    """
    try:
        found = parse(token)
    except InviteRefused as exc:
        o.fail(exc)
    directory = Path(keys).expanduser()
    name = name or host_name()
    try:
        endpoints = join(found, directory, name, timeout)
    except PichatError as exc:
        o.fail(exc)
    click.echo(f"joined as {found.role} {name!r}: router at {endpoints[found.role + 's']}; "
               f"keys in {directory}")
    others = sorted(p.name for p in directory.glob("*.key_secret")
                    if p.name != f"{found.role}.key_secret")
    if others:  # a directory copied the old way: the secrets a joined Pi need not hold
        click.echo(f"warning: {directory} also holds {', '.join(others)}, copied from "
                   f"elsewhere: this Pi does not need them; delete them so that a stolen "
                   f"SD card does not give them away", err=True)


def join(found, directory: Path, name: str, timeout: float) -> dict[str, str]:
    """Make this Pi's key pair (if it has none), redeem the token at the first address
    that answers, and keep the router's public key and endpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    role = found.role
    secret_path = directory / f"{role}.key_secret"
    if not secret_path.exists():
        public_path, secret_path_s = zmq.auth.create_certificates(directory, role)
        os.chmod(secret_path_s, 0o600)
    public, secret = zmq.auth.load_certificate(secret_path)
    errors = []
    for address in found.addresses:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = found.router_key.encode()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        try:
            sock.connect(address)
            sock.send_multipart(encode(Join(found.id, found.secret, name)))
            if not sock.poll(timeout * 1000):
                errors.append(f"{address}: no answer in {timeout:.0f} s")
                continue
            reply = decode(sock.recv_multipart())
        except (zmq.ZMQError, PichatError) as exc:
            errors.append(f"{address}: {exc}")
            continue
        finally:
            sock.close(linger=0)
        if isinstance(reply, Error):
            raise InviteRefused(f"the router refused: {reply.message}")
        if not isinstance(reply, Join):
            raise PichatError("the router answered something other than JOIN")
        host = address.rsplit(":", 1)[0]  # tcp://HOST
        endpoints = {"workers": _reachable(reply.workers, host),
                     "clients": _reachable(reply.clients, host)}
        if "," in endpoints["workers"] + endpoints["clients"]:
            click.echo(f"the router named {endpoints['workers'].count(',') + 1} routers "
                       "(sharing one store): this Pi will use each", err=True)
        (directory / "router.key").write_text(
            "metadata\ncurve\n    public-key = \"" + found.router_key + "\"\n")
        remember_router(directory, {**endpoints, "name": name})
        return endpoints
    raise Unreachable("could not reach the router: " + "; ".join(errors))


class Unreachable(PichatError):
    """No address of the token answered (the router may still be starting)."""


def join_once(token: str, directory: Path, role: str, name: str, timeout: float = 10.0
              ) -> bool:
    """`pichat worker --join`: join with `token` (or the token in the file it names)
    unless `directory` has joined already (this role's key pair, the router's key and
    endpoints: a restart, or a token given to every replica). True if it joined now."""
    if ((directory / f"{role}.key_secret").is_file() and (directory / "router.key").is_file()
            and stored_router(directory, role + "s")):
        return False
    if not token.startswith(PREFIX):
        try:
            token = Path(token).expanduser().read_text().strip()
        except OSError as exc:
            raise PichatError(f"--join takes a token from `pichat invite` or a file holding "
                              f"one; cannot read {token[:200]!r}: {exc.strerror}") from None
    found = parse(token)
    if found.role != role:
        raise InviteRefused(f"this is a {found.role} token: a {role} needs a {role} token "
                            f"(pichat invite --role {role})")
    join(found, directory, name, timeout)
    return True


def _reachable(listed: str, host: str) -> str:
    """A JOIN reply's endpoints as this Pi reaches them: the answering router's, as bound
    (tcp://0.0.0.0:5556), through `host` (tcp://HOST) it was reached by; then the other
    routers' (comma-separated, as they are reached), each checked."""
    first, *rest = listed.split(",")
    for endpoint in rest:
        if not ENDPOINT.fullmatch(endpoint):
            raise PichatError(f"the router named another router at {endpoint[:80]!r}, "
                              "not a tcp://HOST:PORT endpoint")
    return ",".join([f"{host}:{port_of(first)}", *rest])


@click.command(name="keys")
@click.argument("action", type=click.Choice(["list", "revoke"]))
@click.argument("name", required=False)
@o.option("--keys", env="KEYS", default=str(DEFAULT_KEYS_DIR),
          help="The router's keys directory.")
def keys_command(action: str, name: str | None, keys: str) -> None:
    """List the workers and clients the router admits, or revoke one (its key file goes;
    the router refuses it from its next handshake).

    \b
    Example:
      pichat keys list
      pichat keys revoke pi7
    """
    directory = Path(keys).expanduser()
    if action == "list":
        for role, who in members(directory):
            click.echo(f"{role:7} {who}")
        return
    if not name:
        o.fail(PichatError("name the key to revoke: pichat keys revoke NAME"))
    try:
        roles = revoke(directory, name)
    except PichatError as exc:
        o.fail(exc)
    click.echo(f"revoked {name} ({', '.join(roles)})", file=sys.stdout)
