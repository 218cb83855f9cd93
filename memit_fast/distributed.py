"""Several processes (one per GPU) through torch.distributed, and models split over the GPUs of
one process (docs/distributed.md). The only module that knows about ranks: with one process
(no process group, or a group of one) every function here passes its work through unchanged.

Data parallel (`apply` and `compute_stats` called on every rank of an initialised group, with
the same model, requests and settings):
- statistics: each rank accumulates the keys of its share of the documents (`shard`, balanced
  by length); the float64 sums and the token counts are all-reduced (`all_reduce_sum_`);
- tokenising: each rank encodes its share of the requests (balanced by characters), the
  encoded requests are gathered in order (`gather_objects`);
- z and keys: each rank computes the rows of its share of the requests (balanced by tokens),
  the rows are gathered in request order (`gather_rows`);
- solves: layer i's solve runs on rank i mod N and its delta is broadcast (`on_owner`);
- every local piece of work runs under `agreed`: when one rank fails, every rank raises the
  same error (and `apply` restores its weights); the group's timeout ends any wait.

Split models (`balanced_device_map`): the blocks go in order over the GPUs of one process,
the embeddings, the final norm and the head on the first (where `apply`'s own tensors live).
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import errors
from .errors import DistributedError

DEFAULT_TIMEOUT = timedelta(minutes=10)  # a rank that waits longer for the others fails
_comm = {"seconds": 0.0}  # wall time inside collectives (waiting for slower ranks included)


# ---- the group ------------------------------------------------------------------------------


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL with one
    GPU per rank (cuda:LOCAL_RANK) when CUDA is there, else gloo. True when this call made the
    group (the caller then ends it with `shutdown`); False when there is nothing to join or a
    group already exists."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(requested: str | torch.device) -> torch.device:
    """The device of this rank: an index-less "cuda" becomes the rank's GPU (LOCAL_RANK)."""
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _comm_device() -> torch.device:
    """Where tensors of a collective must live: the rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def _collective():
    """Time a collective (wall time, synchronised on CUDA so the work before it is not counted)."""
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            torch.cuda.synchronize()
        _comm["seconds"] += time.perf_counter() - t0


def comm_seconds(reset: bool = False) -> float:
    """Seconds spent in collectives by this process so far (waits for slower ranks included)."""
    value = _comm["seconds"]
    if reset:
        _comm["seconds"] = 0.0
    return value


# ---- sharding -------------------------------------------------------------------------------


def shard(costs: list[float], n: int | None = None) -> list[list[int]]:
    """Per rank, the ascending indices of the items it owns, balanced by cost: the largest items
    first, each to the rank with the least cost so far (ties: the lowest rank). Deterministic,
    so every rank computes the same split. n: the number of ranks (default: the group's)."""
    n = n or world()
    load, parts = [0.0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += costs[i]
    return [sorted(p) for p in parts]


def my_share(costs: list[float]) -> tuple[list[int], list[list[int]] | None]:
    """(this rank's indices, every rank's) by `shard`; one process: (all, None)."""
    if not active():
        return list(range(len(costs))), None
    parts = shard(costs)
    return parts[rank()], parts


# ---- failure agreement ----------------------------------------------------------------------


def agreed(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) on this rank, then every rank learns whether any rank failed; if one
    did, every rank raises the same error: "rank r of N failed in `what`: ...", of the failed
    rank's memit_fast error class (DistributedError for any other exception). fn must run no
    collective (the ranks meet only here). One process: fn's result, its exception as it is."""
    if not active():
        return fn(*args, **kwargs)
    result, failure = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every rank must reach the exchange below
        failure = (type(e).__name__, " ".join(str(e).split()) or type(e).__name__)
        error = e
    statuses = [None] * world()
    with _collective():
        dist.all_gather_object(statuses, failure)
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if not failed:
        return result
    r, (name, message) = failed[0]
    cls = getattr(errors, name, None)
    cls = cls if isinstance(cls, type) and issubclass(cls, errors.MemitError) else DistributedError
    text = f"rank {r} of {world()} failed in {what}: {name}: {message}" + (f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else "")
    if failure is not None:
        raise cls(text) from error
    raise cls(text)


# ---- collectives ----------------------------------------------------------------------------


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (each moved to the collective's device and back)."""
    if not active():
        return
    dev = _comm_device()
    with _collective():
        for t in tensors:
            if t.device == dev:
                dist.all_reduce(t)
            else:
                moved = t.to(dev)
                dist.all_reduce(moved)
                t.copy_(moved)


def gather_rows(local: torch.Tensor, parts: list[list[int]] | None) -> torch.Tensor:
    """The rows of every rank in item order: local (len(parts[rank]), ...) -> (n, ...), on
    local's device; parts from `my_share` (None: one process, local is everything)."""
    if parts is None:
        return local
    dev = _comm_device()
    width = max(map(len, parts))
    padded = torch.zeros(width, *local.shape[1:], dtype=local.dtype, device=dev)
    padded[: len(local)] = local
    chunks = [torch.empty_like(padded) for _ in parts]
    with _collective():
        dist.all_gather(chunks, padded)
    out = torch.empty(sum(map(len, parts)), *local.shape[1:], dtype=local.dtype, device=local.device)
    for p, c in zip(parts, chunks):
        if p:
            out[torch.tensor(p, device=local.device)] = c[: len(p)].to(local.device)
    return out


def gather_objects(local: list, parts: list[list[int]] | None) -> list:
    """Every rank's items (picklable) in item order: local (len(parts[rank]) items) -> n items;
    parts from `my_share` (None: one process, local is everything)."""
    if parts is None:
        return local
    lists = [None] * world()
    with _collective():
        dist.all_gather_object(lists, local)
    out = [None] * sum(map(len, parts))
    for p, items in zip(parts, lists):
        for i, item in zip(p, items):
            out[i] = item
    return out


def on_owner(what: str, owner: int, fn, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """fn() -> a tensor (shape, dtype), computed on rank owner % N only (under `agreed`) and
    broadcast to every rank; returned on `device`. One process: fn()."""
    if not active():
        return fn()
    src = owner % world()
    value = agreed(what, fn) if rank() == src else agreed(what, lambda: None)
    dev = _comm_device()
    buf = value.to(dev, dtype) if value is not None else torch.empty(shape, dtype=dtype, device=dev)
    with _collective():
        dist.broadcast(buf, src)
    return buf.to(device)


def broadcast_object(obj, src: int = 0):
    """Rank src's `obj` on every rank (pickled); one process: obj."""
    if not active():
        return obj
    box = [obj]
    with _collective():
        dist.broadcast_object_list(box, src)
    return box[0]


def union(items) -> list:
    """The sorted union over the ranks of each rank's `items`; one process: sorted(items)."""
    if not active():
        return sorted(items)
    lists = [None] * world()
    with _collective():
        dist.all_gather_object(lists, sorted(items))
    return sorted(set().union(*lists))


# ---- the same weights everywhere ------------------------------------------------------------

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHECK_BLOCK = 1 << 24  # elements per block of the checksum (bounds the int64 temporaries)


def checksum(tensors: list[torch.Tensor]) -> int:
    """An exact checksum of the tensors' bits: sum_i bits_i * w_i over int64 with wrap-around,
    w_i a fixed odd multiplier per position (so any order of summation gives the same value,
    on any device). One host transfer."""
    total = None
    for k, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()])
        for start in range(0, bits.numel(), _CHECK_BLOCK):
            b = bits[start : start + _CHECK_BLOCK].to(torch.int64)
            w = torch.arange(start, start + b.numel(), dtype=torch.int64, device=b.device) * 2 + (2 * k + 1) * 0x9E3779B97F4A7C1
            part = (b * w).sum()
            total = part.cpu() if total is None else total + part.cpu()
    return 0 if total is None else int(total)


def check_same(what: str, tensors: list[torch.Tensor]) -> None:
    """Raise DistributedError on every rank unless the tensors are bit-identical on all ranks."""
    if not active():
        return
    sums = [None] * world()
    with _collective():
        dist.all_gather_object(sums, checksum(tensors))
    if len(set(sums)) > 1:
        raise DistributedError(f"{what} differ between ranks (checksums {sums})")


# ---- models split over the GPUs of one process ----------------------------------------------


def balanced_device_map(model_or_config, devices: list[int] | int, *, hparams=None, capacity: list[float] | None = None) -> dict[str, int]:
    """A device_map (module name -> GPU index) for `transformers` / `accelerate`: the blocks in
    order over `devices` (a count or a list of GPU indices), as many parameters on each GPU as
    can be, counting the embeddings, the final norm and the head, which go on the first GPU.
    model_or_config: a model (on the meta device is enough) or its config. capacity: each
    device's relative room for weights (default equal; e.g. its memory less what it must hold
    besides, such as the statistics of the edited layers)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .presets import for_model

    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model_or_config)
    hp = hparams or for_model(model)
    devices = list(range(devices)) if isinstance(devices, int) else list(devices)
    blocks = [hp.layer_module_tmp.format(i) for i in range(_depth(model))]
    sizes = {name: sum(p.numel() for p in model.get_submodule(name).parameters()) for name in blocks}
    in_blocks = {id(p) for name in blocks for p in model.get_submodule(name).parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    capacity = list(capacity) if capacity is not None else [1.0] * len(devices)
    if len(capacity) != len(devices) or min(capacity) <= 0:
        raise ValueError(f"capacity {capacity}: one positive value per device of {devices}")
    total = sum(sizes.values()) + rest
    bounds = [total * sum(capacity[: g + 1]) / sum(capacity) for g in range(len(devices))]  # parameters on devices 0..g
    device_map, gpu, load = {}, 0, rest
    for name in blocks:
        while load + sizes[name] / 2 > bounds[gpu] and gpu < len(devices) - 1:
            gpu += 1
        device_map[name] = devices[gpu]
        load += sizes[name]
    prefix = hp.layer_module_tmp.split(".{}")[0]  # e.g. "transformer.h"
    for name, _ in model.named_children():
        _fill_rest(model, name, prefix, device_map, devices[0])
    return device_map


def _fill_rest(model, name: str, blocks_prefix: str, device_map: dict, first: int) -> None:
    """Every module outside the blocks (embeddings, norms, head, rotary tables) on the first GPU."""
    if name == blocks_prefix:
        return
    if blocks_prefix.startswith(name + "."):
        for child, _ in model.get_submodule(name).named_children():
            _fill_rest(model, f"{name}.{child}", blocks_prefix, device_map, first)
        return
    device_map[name] = first


def _depth(model) -> int:
    from .presets import num_layers

    return num_layers(model.config)


def device_guard(device: torch.device):
    """Make `device` the current CUDA device inside the block (kernels and libraries that launch
    on the current device: a layer of a model split over GPUs); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_split(layout) -> None:
    """A model split over several devices must keep its embeddings, final norm and head on one
    device (where `apply` keeps its own tensors); raises ConfigError otherwise."""
    devices = {str(layout.lm_head.weight.device), str(next(layout.model.parameters()).device)}
    norm = next(layout.final_norm.parameters(), None)
    if norm is not None:
        devices.add(str(norm.device))
    if len(devices) > 1:
        raise errors.ConfigError(
            f"the model is split over several devices with its embeddings, final norm and head on {sorted(devices)}: "
            "they must share one device (memit_fast.distributed.balanced_device_map makes such a device_map)"
        )
