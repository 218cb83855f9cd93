"""The statistics cache (docs/algorithm.md section 4): file format, keys, checksums and the model fingerprint.

One safetensors file per layer, holding "mom2" (d_ff, d_ff) and string metadata: the `StatsKey`
fields, the token count, the format version and a checksum of the tensor's bytes. A file is
written to a temporary name and renamed into place (atomic: two processes writing the same file
both succeed, the last rename wins, a reader never sees half a file). On load the key, the
checksum, the shape and the finiteness are checked; anything wrong raises StatsError. A cache
directory that cannot be written (read-only, full) gives a warning and the statistics stay in
memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from .errors import StatsError
from .hparams import MEMITHyperParams

FORMAT_VERSION = "2"  # 2: crc32 checksum of the tensor data in the metadata
CHECKSUM_BLOCK = 16 << 20  # bytes per crc32 block; blocks are hashed in parallel threads


class CacheWarning(UserWarning):
    """The cache could not be written; the statistics were kept in memory only."""


def default_cache_dir() -> Path:
    """$MEMIT_FAST_CACHE, else ~/.cache/memit_fast (read through memit_fast.config)."""
    from .config import env_setting

    return env_setting("MEMIT_FAST_CACHE")


# ---------------------------------------------------------------------------------------------
# Model fingerprint

_PRIME = 2097143  # largest prime below 2^21
_CHUNK = 1 << 16  # elements per exact partial sum
_N_SUMS = 3  # independent weighted sums per parameter
_BLOCK_CHUNKS = 256  # chunks converted at a time (bounds the float64 temporary to 128 MiB)


def _mix(index: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of index + salt, reduced to weights in [1, _PRIME)."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(_PRIME - 1) + np.uint64(1)).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _weights(n: int, device: str) -> torch.Tensor:
    """(n, _N_SUMS) float64 pseudo-random integer weights in [1, _PRIME), the same on every device."""
    idx = np.arange(n)
    return torch.from_numpy(np.stack([_mix(idx, k) for k in range(_N_SUMS)], 1)).to(device)


def _chunk_weights(first: int, n: int) -> torch.Tensor:
    """(n, _N_SUMS) weights of chunks first..first+n-1 (other salts than the in-chunk weights)."""
    idx = np.arange(first, first + n)
    return torch.from_numpy(np.stack([_mix(idx, 1000 + k) for k in range(_N_SUMS)], 1))


def _param_sums(p: torch.Tensor) -> torch.Tensor:
    """(_N_SUMS,) float64 on p's device, congruent mod P to sum_j v_jk * (sum_i w_ik x_ij) over the
    chunks j of p's bfloat16 bit patterns x (as signed 16-bit integers); |result| < P.

    Exact in float64 whatever the summation order (so equal on CPU and GPU, for any BLAS): |x| <
    2^15 and w < 2^21, so a chunk's sum of 2^16 products stays below 2^52; after each reduction
    mod P the products with v_j stay below 2^42.
    """
    device = str(p.device)
    flat = p.detach().reshape(-1)
    w = _weights(_CHUNK, device)
    total = torch.zeros(_N_SUMS, dtype=torch.float64, device=p.device)
    block = _CHUNK * _BLOCK_CHUNKS
    for start in range(0, flat.numel(), block):
        x = flat[start : start + block].to(torch.bfloat16).view(torch.int16).to(torch.float64)
        n_full = x.numel() // _CHUNK
        parts = []
        if n_full:
            parts.append(x[: n_full * _CHUNK].view(n_full, _CHUNK) @ w)  # (n_full, _N_SUMS)
        if x.numel() > n_full * _CHUNK:
            tail = x[n_full * _CHUNK :]
            parts.append((tail @ w[: tail.numel()])[None])
        sums = torch.fmod(torch.cat(parts), _PRIME)  # (chunks, _N_SUMS), exact integers
        first = start // _CHUNK
        v = _chunk_weights(first, sums.shape[0]).to(p.device)
        total = torch.fmod(total + torch.fmod(sums * v, _PRIME).sum(0), _PRIME)
    return total


def model_fingerprint(model, hparams: MEMITHyperParams) -> str:
    """A hash of every element of every parameter except the MLP output projections (the weights
    MEMIT edits, so statistics stay valid for an edited model as in the original).

    Each parameter's values are rounded to bfloat16 (a float32 model and its bfloat16 copy share
    statistics) and reduced on its own device to three weighted sums modulo a 21-bit prime, with
    fixed pseudo-random weights per position (splitmix64); one transfer to the host at the end.
    A changed bfloat16 value changes each sum unless the weights conspire: for any fixed change
    the chance that all three sums stay equal is about P^-3 = 2^-63 (one changed element is
    always seen: weights are non-zero mod P). It is a fingerprint against accidents (another
    model, a fine-tuned copy, a changed layer), not against an adversary. The sums, the names,
    shapes and the config's sizes go through SHA-256.
    """
    pattern = re.compile(re.escape(hparams.rewrite_module_tmp).replace(r"\{\}", r"\d+") + r"\.")
    named = [(name, p) for name, p in model.named_parameters() if not pattern.match(name)]
    with torch.no_grad():
        sums = [_param_sums(p) for _, p in named]
    h = hashlib.sha256(json.dumps(_config_identity(model.config), sort_keys=True).encode())
    values = torch.stack([s.cpu() for s in sums]).to(torch.int64).numpy() if sums else np.zeros((0, _N_SUMS), np.int64)
    values = np.mod(values, _PRIME)  # the representative in [0, P): fmod's sign depends on grouping
    for (name, p), row in zip(named, values):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(row.tobytes())
    return h.hexdigest()[:20]


def _config_identity(config) -> dict:
    keys = ("model_type", "vocab_size", "hidden_size", "n_embd", "intermediate_size", "num_hidden_layers", "n_layer")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class StatsKey:
    model: str  # fingerprint
    module: str  # rewrite module name, e.g. "model.layers.4.mlp.down_proj"
    corpus: str
    n_samples: int
    max_length: int
    dtype: str

    def as_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}

    def path(self, cache_dir: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self.as_metadata(), sort_keys=True).encode()).hexdigest()[:16]
        return Path(cache_dir) / "stats" / self.model / f"{self.module}.{digest}.safetensors"


@dataclass
class LayerStats:
    """mom2 = E[k k^T] (d_ff, d_ff) over `count` tokens."""

    mom2: torch.Tensor
    count: int


def tensor_checksum(t: torch.Tensor) -> str:
    """"crc32:" and the CRC-32 of each CHECKSUM_BLOCK bytes of a CPU tensor's data, blocks hashed
    in parallel threads (zlib releases the GIL)."""
    data = memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy())
    blocks = [data[i : i + CHECKSUM_BLOCK] for i in range(0, len(data), CHECKSUM_BLOCK)] or [data]
    workers = min(len(blocks), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            crcs = list(pool.map(zlib.crc32, blocks))
    else:
        crcs = [zlib.crc32(b) for b in blocks]
    return "crc32:" + ",".join(f"{c:08x}" for c in crcs)


def save_stats(path: Path, key: StatsKey, stats: LayerStats) -> bool:
    """Write one layer's statistics atomically; False (and a CacheWarning) when the cache cannot
    be written (read-only, full, not a directory): the caller keeps the statistics in memory."""
    from safetensors.torch import save_file

    mom2 = stats.mom2.detach().contiguous().cpu()
    meta = key.as_metadata() | {"count": str(stats.count), "format": FORMAT_VERSION, "memit_fast": __version__, "checksum": tensor_checksum(mom2)}
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"mom2": mom2}, tmp, metadata=meta)
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(f"statistics cache {path.parent} cannot be written ({type(e).__name__}: {e}); the statistics are kept in memory only", CacheWarning, stacklevel=2)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_stats(path: Path, key: StatsKey | None = None) -> LayerStats:
    """Load and check one layer's statistics; `key` given: refuse a file computed under another key.
    The tensor's bytes must match the checksum stored beside them."""
    from safetensors import safe_open

    fix = "delete it to recompute"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mom2 = f.get_tensor("mom2")
    except Exception as e:
        raise StatsError(f"statistics file {path} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    if key is not None:
        diff = {k: (meta.get(k), v) for k, v in key.as_metadata().items() if meta.get(k) != v}
        if diff:
            raise StatsError(f"statistics file {path} does not match this model/settings: " + ", ".join(f"{k}: file {a!r} != wanted {b!r}" for k, (a, b) in diff.items()))
    stored = meta.get("checksum")
    if stored is None:
        raise StatsError(f"statistics file {path} has no checksum (format {meta.get('format', '?')}, this version writes {FORMAT_VERSION}); {fix}")
    if tensor_checksum(mom2) != stored:
        raise StatsError(f"statistics file {path} is corrupted: its tensor data do not match the stored checksum; {fix}")
    try:
        count = int(meta.get("count", "0"))
    except ValueError:
        raise StatsError(f"statistics file {path} has a malformed count {meta.get('count')!r}; {fix}") from None
    check_stats(mom2, count, str(path))
    return LayerStats(mom2, count)


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite; one sync. A sum of the elements (in the
    tensor's dtype, float32 for 16-bit types) is finite when they all are, unless finite values
    overflow it: a non-finite sum sends each tensor to the element-wise check (the rare path)."""
    total = sum(t.sum(dtype=torch.float32 if t.element_size() < 4 else None).double() for t in tensors)
    if bool(torch.isfinite(total)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_stats(mom2: torch.Tensor, count: int, where: str) -> None:
    if mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1]:
        raise StatsError(f"{where}: statistics must be a square matrix, got shape {tuple(mom2.shape)}")
    if count <= 0:
        raise StatsError(f"{where}: statistics were accumulated over {count} tokens")
    if not all_finite(mom2):
        raise StatsError(f"{where}: statistics contain NaN or inf")
