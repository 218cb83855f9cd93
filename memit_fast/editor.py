"""`Editor`: a persistent editing session, batch after batch, with MEMIT or AlphaEdit (docs/sequential.md).

    ed = memit_fast.Editor(model, tok, hparams, method="alphaedit")
    ed.edit(batch_1); ed.edit(batch_2)
    ed.undo()                       # the weights before batch_2, bit for bit
    ed.save("session/")             # history + accumulated key statistics
    ed = memit_fast.Editor.load(model_unedited, tok, "session/")

Each batch's delta of each layer is kept as the factors it was computed from, R (d_model, n)
and A (d_ff, n) with Delta = R A^T (or the dense Delta when n > d_model), together with the
original weights W0 of the edited layers (on the CPU). Every write of a delta, when editing and
when replaying, is the same product and the same `write_layer`, so undo (W0 and the remaining
batches replayed) and load (the same replay from the unedited model) give the weights bit for
bit on the device that made them. AlphaEdit's accumulated keys K_p K_p^T are sums over the
batches in order, rebuilt the same way. The history is kept on the CPU and read only by undo,
save and load: the work of a batch does not depend on the batches before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .api import _covariances, _eval_no_param_grads, restore
from .artifacts import file_sha256
from .cache import default_cache_dir, model_fingerprint
from .config import EditConfig
from .corpus import check_corpus_spec
from .edit_requests import normalize_requests
from .errors import ArtifactError, ConfigError, RestoreError
from .hparams import MEMITHyperParams
from .layouts import layout_for
from .model_access import model_device, rewrite_weights
from .presets import for_model
from .profiling import NO_TIMER
from .sequential import DEFAULT_L2, DEFAULT_NULLSPACE_THRESHOLD, KeyAccumulator, cached_null_space, check_method, factors_delta, projected_factors
from .solve import solve_update_keys
from .targets import compute_targets
from .templates import flatten, generate_context_templates, normalize_templates
from .tokens import check_context, encode_requests
from .update import apply_update, layer_delta, write_layer

log = logging.getLogger(__name__)

SESSION_FILE = "session.json"
SESSION_FORMAT = "memit_fast-session"
SESSION_VERSION = 1
KEY_STATS_FILE = "key_stats.safetensors"


class ReplayWarning(UserWarning):
    """A loaded session's replayed weights differ in rounding from the saved ones (another device or BLAS)."""


@dataclass
class Batch:
    """One edit batch: its requests, each layer's delta as ("factors", R, A) or ("dense", Delta) on
    the CPU (float64), AlphaEdit's keys per layer (n, d_ff) on the CPU, and the time it took."""

    requests: list[dict]
    deltas: dict[str, tuple]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


class Editor:
    """Edits `model` in place batch by batch. method: "memit" (each batch solved as `apply` does,
    against the statistics C^l) or "alphaedit" (the update projected onto the null space of C^l and
    solved against the keys of the earlier batches; nullspace_threshold and l2 as in
    memit_fast.sequential). config / settings: an EditConfig and its fields, as for `apply`
    (fast mode only). Context templates are sampled once, at the first batch."""

    def __init__(self, model, tok, hparams: MEMITHyperParams | None = None, method: str = "memit", *,
                 nullspace_threshold: float = DEFAULT_NULLSPACE_THRESHOLD, l2: float = DEFAULT_L2,
                 config: EditConfig | None = None, **settings):
        check_method(method, nullspace_threshold, l2)
        self.cfg = EditConfig.make(config, **settings)
        if self.cfg.mode != "fast":
            raise ConfigError("Editor runs the fast mode only (mode='reference' is apply's oracle)")
        self.model, self.tok, self.method = model, tok, method
        self.nullspace_threshold, self.l2 = float(nullspace_threshold), float(l2)
        self.hparams = hparams or for_model(model)
        if method == "alphaedit" and not self.hparams.mom2_adjustment:
            raise ConfigError("method 'alphaedit' projects with the statistics C^l: hparams.mom2_adjustment must be true")
        if self.cfg.stats is None and self.hparams.mom2_adjustment:
            check_corpus_spec(self.hparams.mom2_dataset if self.cfg.corpus is None else self.cfg.corpus)
        self.weights = rewrite_weights(model, self.hparams)
        self.layout = layout_for(model, self.hparams)
        self.base = {w.name: w.param.detach().cpu().clone() for w in self.weights}
        self.templates = normalize_templates(self.cfg.context_templates) if self.cfg.context_templates else None
        self.history: list[Batch] = []
        self._covs = None  # {layer: C^l} (memit)
        self._accs: dict[int, KeyAccumulator] | None = None  # alphaedit

    @property
    def n_edits(self) -> int:
        return sum(len(b.requests) for b in self.history)

    def edit(self, requests) -> Batch:
        """Edit one batch of requests (as `apply` takes them) into the model; returns its Batch.
        On any error the weights and the session are left as they were."""
        t0 = time.perf_counter()
        cfg, model, hp = self.cfg, self.model, self.hparams
        timer = cfg.timer or NO_TIMER
        reqs = normalize_requests(requests)
        with _eval_no_param_grads(model):
            if self.templates is None:
                with timer("templates"):
                    self.templates = normalize_templates(generate_context_templates(model, self.tok, seed=cfg.seed))
            with timer("tokenise"):
                encoded = encode_requests(self.tok, reqs, flatten(self.templates), hp.fact_token)
                check_context(reqs, encoded, model.config)
            with timer("statistics"):
                self._prepare()
            backup = {w.name: w.param.detach().clone() for w in self.weights}
            batch = Batch([{"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target}} for r in reqs], {})
            try:
                with timer("z"):
                    z = compute_targets(model, self.tok, encoded, hp, chunk_tokens=cfg.chunk_tokens, memory_cap_gib=cfg.memory_cap_gib,
                                        progress=cfg.progress, layout=self.layout)
                apply_update(
                    model, self.tok, encoded, hp, z, self.templates, self._covs or {}, self.weights, self.layout,
                    solve_method=cfg.solve_method, batch_tokens=cfg.keys_batch_tokens, offload=cfg.memory_cap_gib is not None, progress=cfg.progress,
                    timer=timer, layer_solve=lambda w, keys, resid: self._solve(w, keys, resid, batch),
                )  # fmt: skip
                keys = batch.keys  # on the device, for the accumulators
                batch.deltas = {name: tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in d) for name, d in batch.deltas.items()}
                batch.keys = {layer: k.cpu() for layer, k in keys.items()}
            except BaseException:
                restore(model, backup)
                raise
        for layer, k in keys.items():
            self._accs[layer].add(k)
        if model_device(model).type == "cuda":
            torch.cuda.synchronize(model_device(model))
        batch.seconds = time.perf_counter() - t0
        self.history.append(batch)
        log.info("batch %d (%d requests, %s) in %.2f s; %d edits in all", len(self.history), len(reqs), self.method, batch.seconds, self.n_edits)
        return batch

    def undo(self) -> Batch:
        """Take the last batch back: the weights (and AlphaEdit's accumulated keys) become what they
        were before it, bit for bit. Returns the batch removed. Raises RestoreError when there is none."""
        if not self.history:
            raise RestoreError("undo: no edit batch to take back")
        last = self.history.pop()
        try:
            self._replay()
        except BaseException:
            self.history.append(last)
            raise
        return last

    def _prepare(self) -> None:
        """The statistics (memit) or the null-space bases and empty key accumulators (alphaedit), once."""
        if self._covs is not None or self._accs is not None:
            return
        covs = _covariances(self.model, self.tok, self.hparams, self.weights, self.cfg, self.layout)
        if self.method == "memit":
            self._covs = covs
            return
        fp = model_fingerprint(self.model, self.hparams)
        device = model_device(self.model)
        accs = {}
        for w in self.weights:
            basis = cached_null_space(covs[w.layer].to(device), self.nullspace_threshold, model_fp=fp, module=w.name.rsplit(".", 1)[0], cache_dir=self.cfg.cache_dir or default_cache_dir())
            accs[w.layer] = KeyAccumulator(basis)
        self._accs = accs

    def _solve(self, w, keys: torch.Tensor, resid: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One layer's delta (d_model, d_ff); records its factors (and AlphaEdit's keys) in `batch`."""
        if self.method == "alphaedit":
            acc = self._accs[w.layer]
            r, a = projected_factors(acc.basis, acc.proj, keys, resid, self.l2, self.cfg.solve_method)
            batch.keys[w.layer] = keys
        elif resid.shape[1] >= keys.shape[0]:  # d_model >= n: the product R A^T, as solve_delta_weights forms it
            a = solve_update_keys(self._covs[w.layer].to(keys.device), keys.T, self.hparams.mom2_update_weight, method=self.cfg.solve_method)
            r = resid.T.contiguous().to(a.dtype)
        else:
            delta = layer_delta(self._covs[w.layer], keys, resid, self.hparams.mom2_update_weight, self.cfg.solve_method)
            batch.deltas[w.name] = ("dense", delta)
            return delta
        batch.deltas[w.name] = ("factors", r, a)
        return factors_delta(r, a)

    def _replay(self) -> None:
        """Weights = W0 plus every batch of the history written in order; AlphaEdit's accumulators
        summed again. All or nothing: on an error the weights come back as they were."""
        backup = {w.name: w.param.detach().clone() for w in self.weights}
        try:
            with torch.no_grad():
                for w in self.weights:
                    w.param.copy_(self.base[w.name].to(w.param.device))
                for batch in self.history:
                    for w in self.weights:
                        d = batch.deltas[w.name]
                        dev = w.param.device
                        write_layer(w, factors_delta(d[1].to(dev), d[2].to(dev)) if d[0] == "factors" else d[1].to(dev))
        except BaseException:
            restore(self.model, backup)
            raise
        if self._accs is not None:
            self._accs = {layer: KeyAccumulator(acc.basis) for layer, acc in self._accs.items()}
            for batch in self.history:
                for layer, k in batch.keys.items():
                    self._accs[layer].add(k)

    # ---------------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, directory: str | Path) -> Path:
        """Write the session to `directory`: session.json (method, hyper-parameters, templates, base
        model fingerprint, checksums of the original and current weights, the requests), one
        batch_NNNN.safetensors per batch ("<param>.R" (d_model, n) and "<param>.A" (d_ff, n) float64,
        or "<param>.delta"; AlphaEdit's "keys.<layer>" (n, d_ff)) and, for AlphaEdit,
        key_stats.safetensors: the accumulated K_p K_p^T ("<layer>.kk", (d_ff, d_ff)) and its projection
        ("<layer>.proj", (r, r)), float64.

        Atomic: the files are written into a temporary folder beside `directory`, which then takes
        its place; on any error `directory` is left as it was. An existing `directory` is replaced
        when it is empty or holds only session files (ArtifactError otherwise, before any write)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists():
            foreign = [p.name for p in directory.iterdir() if not _is_session_file(p.name)] if directory.is_dir() else [directory.name]
            if foreign:
                raise ArtifactError(f"save: {directory} exists and holds files that are not an editing session's ({foreign[0]}); not replaced")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        try:
            batches = []
            for i, b in enumerate(self.history, 1):
                tensors = {}
                for name, d in b.deltas.items():
                    if d[0] == "factors":
                        tensors[f"{name}.R"], tensors[f"{name}.A"] = d[1], d[2]
                    else:
                        tensors[f"{name}.delta"] = d[1]
                tensors |= {f"keys.{layer}": k for layer, k in b.keys.items()}
                fname = f"batch_{i:04d}.safetensors"
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / fname))
                batches.append({"file": fname, "sha256": file_sha256(tmp / fname), "requests": b.requests, "seconds": b.seconds,
                                "forms": {name: d[0] for name, d in b.deltas.items()}})
            if self._accs is not None:
                save_file({f"{layer}.{part}": getattr(acc, part).cpu().contiguous() for layer, acc in self._accs.items() for part in ("kk", "proj")},
                          str(tmp / KEY_STATS_FILE))
            meta = {
                "format": SESSION_FORMAT,
                "version": SESSION_VERSION,
                "method": self.method,
                "nullspace_threshold": self.nullspace_threshold,
                "l2": self.l2,
                "solve_method": self.cfg.solve_method,
                "hparams": self.hparams.to_dict(),
                "templates": self.templates,
                "base_fingerprint": model_fingerprint(self.model, self.hparams),
                "base_weights_sha256": {name: _tensor_sha256(t) for name, t in self.base.items()},
                "weights_sha256": {w.name: _tensor_sha256(w.param) for w in self.weights},
                "key_stats": KEY_STATS_FILE if self._accs is not None else None,
                "batches": batches,
            }
            (tmp / SESSION_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            _replace_dir(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return directory

    @classmethod
    def load(cls, model, tok, directory: str | Path, *, config: EditConfig | None = None, **settings) -> "Editor":
        """Resume a saved session on `model`, which must be the unedited base model (its fingerprint
        and the original weights of the edited layers are checked; ArtifactError otherwise): the
        batches are replayed into it, AlphaEdit's accumulated key statistics are read back.
        config / settings as for Editor (the statistics are needed again for AlphaEdit's bases,
        from the cache when they are there). Warns (ReplayWarning) when the replayed weights differ
        from the saved ones in rounding (another device)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / SESSION_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{directory} is not a saved editing session: {SESSION_FILE} cannot be read ({e})") from None
        if meta.get("format") != SESSION_FORMAT or meta.get("version", 0) > SESSION_VERSION:
            raise ArtifactError(f"{directory / SESSION_FILE} is not a memit_fast session of version <= {SESSION_VERSION}")
        hparams = MEMITHyperParams.from_dict(meta["hparams"])
        settings.setdefault("solve_method", meta["solve_method"])
        ed = cls(model, tok, hparams, meta["method"], nullspace_threshold=meta["nullspace_threshold"], l2=meta["l2"],
                 config=config, **({"context_templates": meta["templates"]} if meta["templates"] else {}) | settings)
        fp = model_fingerprint(model, hparams)
        if fp != meta["base_fingerprint"]:
            raise ArtifactError(f"the session was made on another base model: fingerprint {meta['base_fingerprint']}, this model's is {fp}")
        changed = [name for name, t in ed.base.items() if _tensor_sha256(t) != meta["base_weights_sha256"].get(name)]
        if changed:
            raise ArtifactError(f"load needs the unedited model: {changed[0]} differs from the session's original weights")
        history = []
        for b in meta["batches"]:
            path = directory / b["file"]
            if not path.is_file() or file_sha256(path) != b["sha256"]:
                raise ArtifactError(f"{path} is missing or does not match its checksum in {SESSION_FILE}")
            t = load_file(str(path))
            deltas = {name: ("factors", t[f"{name}.R"], t[f"{name}.A"]) if form == "factors" else ("dense", t[f"{name}.delta"])
                      for name, form in b["forms"].items()}
            keys = {int(k.split(".", 1)[1]): v for k, v in t.items() if k.startswith("keys.")}
            history.append(Batch(b["requests"], deltas, keys, b["seconds"]))
        ed.history = history
        if ed.method == "alphaedit":
            with _eval_no_param_grads(model):
                ed._prepare()
        ed._replay()
        if meta["key_stats"]:
            stats = load_file(str(directory / meta["key_stats"]))
            for layer, acc in ed._accs.items():
                acc.kk, acc.proj = (stats[f"{layer}.{part}"].to(acc.basis.device) for part in ("kk", "proj"))
        now = {w.name: _tensor_sha256(w.param) for w in ed.weights}
        if now != meta["weights_sha256"]:
            warnings.warn("the replayed weights differ in rounding from the saved session's (replayed on another device or BLAS)", ReplayWarning, stacklevel=2)
        return ed


def _is_session_file(name: str) -> bool:
    return name in (SESSION_FILE, KEY_STATS_FILE) or (name.startswith("batch_") and name.endswith(".safetensors"))


def _replace_dir(new: Path, directory: Path) -> None:
    """Put the folder `new` at `directory` (same parent): one rename when there is none; else the
    old one is renamed aside first and removed after (a crash in between leaves it beside, whole)."""
    if not directory.exists():
        os.rename(new, directory)
        return
    old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
    os.rename(directory, old / "session")
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(old / "session", directory)
        os.rmdir(old)
        raise
    shutil.rmtree(old)


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
