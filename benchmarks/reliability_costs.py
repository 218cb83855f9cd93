"""CPU costs of the reliability checks (docs/reliability.md): the statistics checksum against the
load, the full-weight fingerprint of a 135M model, and the finite check of a written weight.

    python -m benchmarks.reliability_costs [--d-ff 16384]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _best(fn, repeat: int = 3) -> str:
    """Best of `repeat`: wall seconds / CPU seconds of this process (the CPU time is less
    disturbed by other processes on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return f"{min(wall):.3f} s wall / {min(cpu):.3f} s CPU"


def checksum_vs_load(d_ff: int) -> dict:
    from safetensors import safe_open

    from memit_fast.cache import LayerStats, StatsKey, all_finite, load_stats, save_stats, tensor_checksum

    mom2 = torch.randn(d_ff, d_ff)
    key = StatsKey("fp", "layer", "corpus", 1, 8, "float32")
    with tempfile.TemporaryDirectory() as d:
        path = key.path(Path(d))
        save_stats(path, key, LayerStats(mom2, 10))
        del mom2

        def raw_load():  # get_tensor maps the file; the clone reads every byte, as any use of C does
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("mom2").clone()

        t_raw = _best(raw_load)
        t = raw_load()
        t_crc = _best(lambda: tensor_checksum(t))
        t_finite = _best(lambda: all_finite(t))
        del t
        t_full = _best(lambda: load_stats(path, key))
    return {"d_ff": d_ff, "MiB": d_ff * d_ff * 4 / 2**20, "read (get_tensor + clone)": t_raw, "crc32 checksum": t_crc, "all_finite": t_finite, "load_stats (all checks)": t_full}


def fingerprint_135m() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from memit_fast import presets
    from memit_fast.cache import model_fingerprint

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, tie_word_embeddings=True)  # SmolLM2-135M's shape
    model = LlamaForCausalLM(cfg).eval()
    hp = presets.for_model(model)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "fingerprint": _best(lambda: model_fingerprint(model, hp))}


def write_check(d_model: int = 4096, d_ff: int = 16384, dtype=torch.float32) -> dict:
    """write_layer's finite checks against the add-and-cast it guards (GPT-J's W_out shape)."""
    from memit_fast.cache import all_finite

    w = torch.randn(d_model, d_ff, dtype=dtype)
    delta = torch.randn(d_model, d_ff, dtype=torch.float64) * 1e-3
    new = (w.float() + delta.float()).to(dtype)
    t_add = _best(lambda: (w.float() + delta.float()).to(dtype))
    t_check = _best(lambda: all_finite(delta, new))
    t_plain = _best(lambda: bool(torch.isfinite(delta).all() & torch.isfinite(new).all()))
    return {"shape": (d_model, d_ff), "dtype": str(dtype), "add and cast": t_add, "all_finite(delta, W)": t_check, "isfinite().all() twice": t_plain}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-ff", type=int, default=16384)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for result in (checksum_vs_load(args.d_ff), fingerprint_135m(), write_check()):
        print(result)


if __name__ == "__main__":
    main()
