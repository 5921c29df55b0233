"""Atomic writing of checkpoint files and directories (safetensors + YAML, never pickles)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, malformed, or belongs to another base model."""


def fsync_file(path) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Flush a directory's entries (creations, renames) to the disk; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_file(path, write) -> None:
    """Call ``write(tmp_path)``, fsync the file, rename it over ``path`` (same directory) and fsync the
    directory: after a crash ``path`` holds either the old or the complete new contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_dir(path, write) -> None:
    """Call ``write(staging_dir)``, fsync what it wrote, then swap the staging directory in place of
    ``path`` and fsync the parent directory.

    A reader sees either the old directory or the complete new one, never a half-written mix; a
    process killed between the two renames leaves the old one set aside, which `recover_dir` puts
    back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        write(staging)
        for file in staging.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_dir(staging)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(path) -> Path:
    """Undo a swap that `atomic_write_dir` was killed in the middle of: if ``path`` is missing but the
    previous version was set aside, put it back. Returns ``path``."""
    path = Path(path)
    if not path.exists():
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if leftovers:
            os.replace(leftovers[-1], path)
    return path


def save_tensors(tensors: dict[str, torch.Tensor], path) -> None:
    """Save contiguous CPU copies of ``tensors`` as safetensors, atomically."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(plain, tmp))


def load_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {error}") from None


def save_yaml(data: dict, path) -> None:
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text))


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    return data
