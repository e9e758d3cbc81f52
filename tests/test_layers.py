"""The house's rules, read from the code's own imports (tests/layers.py): no circles, no
arrow up a floor or a room, pure modules free of I/O, every module in a named room, and no
side of a daemon reaching for its hub."""

from __future__ import annotations

import ast

import pytest
from layers import (
    FLOORS,
    PURE,
    ROOMS,
    Module,
    arrows_up,
    circles,
    floor_of,
    impure,
    modules,
    room_of,
)

HUBS = ("pichat.router.daemon.router", "pichat.worker.daemon.worker")
"""The daemons' classes: only the commands that start a daemon import them."""


@pytest.fixture(scope="module")
def found() -> dict[str, Module]:
    return modules()


def test_no_module_imports_itself_back_through_others(found):
    assert circles(found) == []


def test_no_arrow_runs_up_a_floor_or_a_room(found):
    assert arrows_up(found) == []


def test_pure_modules_do_no_io_and_import_only_pure_ones(found):
    assert [name for name in found if any(name.startswith(p) for p in PURE)], "none found"
    assert impure(found) == []


def test_every_module_has_a_floor_and_every_role_module_a_room(found):
    assert [name for name in found if floor_of(name) < 0] == []
    homeless = [name for name in found for role in ROOMS
                if name.startswith(role + ".") and room_of(name) is None]
    assert homeless == []


def test_the_http_faces_never_import_the_daemon(found):
    reaching = [(name, target) for name, module in found.items()
                if name.startswith("pichat.router.api") for target in module.imports
                if target.startswith("pichat.router.daemon")]
    assert reaching == []


def test_no_side_of_a_daemon_imports_its_hub(found):
    """Each side gets the narrow interface it declares: only commands import a hub."""
    reaching = [(name, target) for name, module in found.items() for target in module.imports
                if target in HUBS and floor_of(name) < len(FLOORS) - 1]
    assert reaching == []


def test_every_package_says_what_it_holds_and_what_it_may_import(found):
    silent = [name for name, module in found.items() if module.path.name == "__init__.py"
              and len(ast.get_docstring(ast.parse(module.path.read_text())) or "") < 80]
    assert silent == []
    for role, rooms in ROOMS.items():
        doc = ast.get_docstring(ast.parse(found[role].path.read_text())) or ""
        for room in rooms:
            assert f"`{room.rpartition('.')[2]}/`" in doc, (role, room)


# --- the checks themselves catch what they are for --------------------------------------

def _house(**imports: tuple[str, ...]) -> dict[str, Module]:
    """A made-up package: each keyword a module (underscores for dots), with its imports."""
    house = {name.replace("_", "."): Module(name.replace("_", "."), None, 1)  # type: ignore
             for name in imports}
    for name, targets in imports.items():
        module = house[name.replace("_", ".")]
        for target in targets:
            (module.imports if target.startswith("pichat") else module.libraries).add(target)
    return house


def test_a_pure_module_importing_io_or_an_impure_module_is_caught():
    house = _house(pichat_router_policy_scheduler=("zmq", "time", "pichat.config"),
                   pichat_config=())
    assert impure(house) == [("pichat.router.policy.scheduler", "time"),
                             ("pichat.router.policy.scheduler", "zmq"),
                             ("pichat.router.policy.scheduler", "pichat.config")]


def test_a_face_importing_the_daemon_or_the_wire_importing_a_role_is_caught():
    house = _house(pichat_router_api_app=("pichat.router.daemon.router",),
                   pichat_router_daemon_router=(),
                   pichat_protocol=("pichat.worker.engine.backend",),
                   pichat_worker_engine_backend=())
    assert arrows_up(house) == [("pichat.protocol", "pichat.worker.engine.backend"),
                                ("pichat.router.api.app", "pichat.router.daemon.router")]


def test_a_side_importing_its_hub_is_a_circle():
    house = _house(pichat_router_daemon_router=("pichat.router.daemon.workers",),
                   pichat_router_daemon_workers=("pichat.router.daemon.router",),
                   pichat_errors=())
    assert circles(house) == [["pichat.router.daemon.router", "pichat.router.daemon.workers"]]
