"""`apply` and `restore`: the drop-in for the original `apply_memit_to_model`."""

from __future__ import annotations

import contextlib
import copy as copy_module
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import distributed
from .config import EditConfig
from .corpus import check_corpus_spec
from .edit_requests import normalize_requests
from .errors import ConfigError, RequestError, RestoreError, StatsError
from .hparams import MEMITHyperParams
from .layouts import layout_for
from .model_access import float_dtype, hidden_size, model_device, rewrite_weights
from .presets import for_model
from .profiling import NO_TIMER
from .reference import reference_edit
from .cache import LayerStats, check_stats
from .stats import compute_stats
from .targets import compute_targets
from .templates import flatten, generate_context_templates, normalize_templates
from .tokens import check_context, encode_requests
from .update import apply_update

log = logging.getLogger(__name__)


def apply(
    model,
    tok,
    requests,
    hparams: MEMITHyperParams | None = None,
    copy: bool = False,
    return_orig_weights: bool = True,
    cache_template: str | os.PathLike | None = None,
    *,
    config: EditConfig | None = None,
    **settings,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Write `requests` into `model` with MEMIT; returns (model, orig_weights). The positional
    order is the original `apply_memit_to_model`'s.

    requests: the original dicts {"prompt": "{} plays the sport of", "subject": ..., "target_new":
        {"str": ...}} (a CounterFact record works as is). hparams: a MEMITHyperParams, None for the
        preset of the model's architecture. copy: edit a deep copy. return_orig_weights (default
        True): return {parameter name: CPU copy of the original tensor} of the edited MLP output
        matrices only, for `restore`; False returns {} and saves that host memory and copy (the
        original code's default), and `restore({})` is then refused.
    cache_template: as in the original, a path template of one file per request holding its z
        (safetensors), formatted with (layer L, clamp_norm_factor, case_id) or the names {layer},
        {clamp_norm_factor}, {case_id}; requests need a case_id. Files present are used, the
        missing z are computed and written. Fast mode only.
    config: an EditConfig (memit_fast.config: mode, solve method, chunking, corpus, cache,
        statistics, context templates, seed, progress, timer); `settings`: any of its fields by
        name, over `config`. An unknown name is a ConfigError.
    On any error the weights are left as they were.
    """
    cfg = EditConfig.make(config, **settings)
    if cfg.progress and distributed.rank() > 0:  # several ranks: rank 0's progress bars only
        cfg = cfg.replace(progress=False)
    if cache_template is not None and cfg.mode != "fast":
        raise ConfigError("cache_template is used by the fast mode only")
    reqs = normalize_requests(requests)
    hparams = hparams or for_model(model)
    z_files = _z_files(cache_template, requests, hparams) if cache_template is not None else None
    if cfg.stats is None and hparams.mom2_adjustment:
        check_corpus_spec(hparams.mom2_dataset if cfg.corpus is None else cfg.corpus)
    if copy:
        model = copy_module.deepcopy(model)
    weights = rewrite_weights(model, hparams)
    layout = layout_for(model, hparams)
    distributed.check_split(layout)
    timer = cfg.timer or NO_TIMER
    ranks = f", {distributed.world()} ranks" if distributed.active() else ""
    log.info("editing %d requests into layers %s (%s mode%s)", len(reqs), hparams.layers, cfg.mode, ranks)
    if cfg.memory_cap_gib is not None and model_device(model).type != "cuda":
        log.warning("memory_cap_gib=%s caps GPU memory; the model is on %s, so it changes nothing", cfg.memory_cap_gib, model_device(model))
    with _eval_no_param_grads(model):
        with timer("templates"):
            templates = normalize_templates(cfg.context_templates or generate_context_templates(model, tok, seed=cfg.seed))
            templates = distributed.broadcast_object(templates)  # several ranks: rank 0's samples
        with timer("tokenise"):  # errors (subject not in the prompt's tokens) before any work
            encoded = _encode(tok, reqs, flatten(templates), hparams.fact_token)
            check_context(reqs, encoded, model.config)
        with timer("statistics"):
            covs = _covariances(model, tok, hparams, weights, cfg, layout)
        backup = {w.name: w.param.detach().clone() for w in weights}  # on the weights' device: a fast rollback
        try:
            if cfg.mode == "reference":
                reference_edit(model, tok, reqs, hparams, templates, covs, weights, progress=cfg.progress, timer=timer)
            else:
                with timer("z"):
                    z = _targets(model, tok, encoded, hparams, cfg, z_files, layout)
                log.info("update: solve method %s", cfg.solve_method)
                apply_update(
                    model, tok, encoded, hparams, z, templates, covs, weights, layout, solve_method=cfg.solve_method,
                    batch_tokens=cfg.keys_batch_tokens, offload=cfg.memory_cap_gib is not None, progress=cfg.progress, timer=timer,
                )  # fmt: skip
        except BaseException:
            restore(model, backup)
            raise
    return model, ({name: w.to("cpu") for name, w in backup.items()} if return_orig_weights else {})


def restore(model, orig_weights: dict[str, torch.Tensor]) -> None:
    """Put the original weights back, bit for bit: orig_weights as returned by `apply`.

    All or nothing: every name must be a parameter of `model`, every value a tensor of the
    parameter's shape and dtype, on the CPU or on the parameter's device; all are checked and
    moved to their devices before the first is written. Raises RestoreError.
    """
    if not isinstance(orig_weights, dict):
        raise RestoreError(f"restore needs the dict of original weights that apply returns, got {type(orig_weights).__name__}")
    if not orig_weights:
        raise RestoreError(
            "restore got no original weights (an empty dict): apply was called with return_orig_weights=False, "
            "so there is nothing to put back; call apply with return_orig_weights=True (the default)"
        )
    params = dict(model.named_parameters())
    problems = []
    for name, value in orig_weights.items():
        p = params.get(name)
        if p is None:
            problems.append(f"{name!r} is not a parameter of the model")
        elif not isinstance(value, torch.Tensor):
            problems.append(f"{name}: expected a tensor, got {type(value).__name__}")
        elif value.shape != p.shape:
            problems.append(f"{name}: shape {tuple(value.shape)} != the parameter's {tuple(p.shape)}")
        elif value.dtype != p.dtype:
            problems.append(f"{name}: dtype {value.dtype} != the parameter's {p.dtype}")
        elif value.device != p.device and value.device.type != "cpu":
            problems.append(f"{name}: on {value.device}, the parameter is on {p.device} (originals must be on the CPU or the parameter's device)")
    if problems:
        raise RestoreError(f"restore wrote nothing: {len(problems)} of {len(orig_weights)} original weights do not fit the model: " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
    staged = {name: value.to(params[name].device) for name, value in orig_weights.items()}  # may fail (memory) before any write
    with torch.no_grad():
        for name, value in staged.items():
            params[name].copy_(value)


def _z_files(cache_template, requests, hparams: MEMITHyperParams) -> list[Path]:
    """One z file per request: the template formatted as the original does, with (layer L,
    clamp_norm_factor, case_id), or by the names layer, clamp_norm_factor, case_id."""
    raw = [requests] if isinstance(requests, dict) else list(requests)
    template = os.fspath(cache_template)

    def name(case_id) -> str:
        L, clamp = hparams.layers[-1], hparams.clamp_norm_factor
        try:
            return template.format(L, clamp, case_id, layer=L, clamp_norm_factor=clamp, case_id=case_id)
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(f"cache_template {template!r} does not format ({type(e).__name__}: {e})") from None

    if name(0) == name(1):
        raise ConfigError(f"cache_template {template!r} names one file for every request: it needs the case_id")
    files = []
    for i, r in enumerate(raw):
        case_id = r.get("case_id") if isinstance(r, dict) else None
        if case_id is None:
            raise RequestError(f"request {i}: cache_template needs a case_id in every request")
        files.append(Path(name(case_id)))
    if len(set(files)) != len(files):
        raise RequestError("cache_template: two requests have the same case_id")
    return files


def _targets(model, tok, encoded, hparams, cfg: EditConfig, z_files: list[Path] | None, layout) -> torch.Tensor:
    """z (n, d_model): the rows in z_files that hold this request's z are read, the others are
    computed (`_compute_z`) and written there (by rank 0 only)."""
    if z_files is None:
        return _compute_z(model, tok, encoded, hparams, cfg, layout)
    d, dtype, device = hidden_size(model), float_dtype(model), model_device(model)
    z = torch.empty(len(encoded), d, dtype=dtype, device=device)
    missing = []
    for i, (r, f) in enumerate(zip(encoded, z_files)):
        row = _read_z(f, _z_identity(r, hparams), d) if f.exists() else None
        if row is None:
            missing.append(i)
        else:
            z[i] = row.to(device, dtype)
    missing = distributed.union(missing)  # several ranks: what any rank could not read
    log.info("z: %d of %d read from the cache_template files, %d to compute", len(z_files) - len(missing), len(z_files), len(missing))
    if missing:
        z[missing] = _compute_z(model, tok, [encoded[i] for i in missing], hparams, cfg, layout)
        if distributed.rank() == 0:
            for i in missing:
                _write_z(z_files[i], z[i], _z_identity(encoded[i], hparams))
    return z


def _encode(tok, reqs, templates: list[str], fact_token: str) -> list:
    """tokens.encode_requests over `reqs`; several ranks: each encodes its share of the requests
    (balanced by their characters) and the encoded requests are gathered in order."""
    mine, parts = distributed.my_share([len(r.prompt) + len(r.subject) + len(r.target) for r in reqs])
    if parts is None:
        return encode_requests(tok, reqs, templates, fact_token)
    local = distributed.agreed("tokenise", lambda: encode_requests(tok, [reqs[i] for i in mine], templates, fact_token) if mine else [])
    return distributed.gather_objects(local, parts)


def _compute_z(model, tok, encoded, hparams, cfg: EditConfig, layout) -> torch.Tensor:
    """targets.compute_targets over `encoded`; several ranks: each computes the z of its share of
    the requests (balanced by their prompt tokens) and the rows are gathered in order."""
    mine, parts = distributed.my_share([z_tokens(r) for r in encoded])
    if parts is None:
        return compute_targets(model, tok, encoded, hparams, chunk_tokens=cfg.chunk_tokens, memory_cap_gib=cfg.memory_cap_gib, progress=cfg.progress, layout=layout)

    def local() -> torch.Tensor:
        if not mine:
            return torch.empty(0, hidden_size(model), dtype=float_dtype(model), device=model_device(model))
        return compute_targets(model, tok, [encoded[i] for i in mine], hparams, chunk_tokens=cfg.chunk_tokens, memory_cap_gib=cfg.memory_cap_gib,
                               progress=cfg.progress, layout=layout)

    return distributed.gather_rows(distributed.agreed("z", local), parts)


def z_tokens(r) -> int:
    """The tokens z optimises for one encoded request: its rewriting rows (prompt and target)
    and its KL row; the cost by which requests are shared between ranks."""
    return sum(len(p.ids) + len(r.target) - 1 for p in r.prompts) + r.kl.lookup + 1


def _z_identity(encoded_request, hparams) -> dict[str, str]:
    """What a z file must have been computed for: the request's prompts (with the context
    templates) and target as token ids, layer L and the clamp."""
    r = encoded_request
    tokens = repr(([(p.ids, p.lookup) for p in r.prompts], r.kl.ids, r.target))
    return {
        "tokens_sha256": hashlib.sha256(tokens.encode()).hexdigest(),
        "layer": str(hparams.layers[-1]),
        "clamp_norm_factor": str(hparams.clamp_norm_factor),
    }


def _read_z(path: Path, identity: dict[str, str], d: int) -> torch.Tensor | None:
    """The z in `path`, or None (logged) when it cannot be read or was computed for something else."""
    try:
        with safe_open(path, "pt") as f:
            meta, z = f.metadata() or {}, f.get_tensor("v_star")
    except (OSError, SafetensorError) as e:
        log.warning("z file %s cannot be read (%s): computing it again", path, e)
        return None
    if any(meta.get(k) != v for k, v in identity.items()) or tuple(z.shape) != (d,):
        log.warning("z file %s was computed for another request or model: computing it again", path)
        return None
    return z


def _write_z(path: Path, z: torch.Tensor, identity: dict[str, str]) -> None:
    """Write one z atomically; a failure is logged and the edit goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"v_star": z.detach().cpu().contiguous()}, tmp, metadata=identity)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("z file %s not written (%s)", path, e)


def _covariances(model, tok, hparams, weights, cfg: EditConfig, layout) -> dict[int, torch.Tensor]:
    """{layer: C^l} from cfg.stats as given, else from compute_stats (one pass per layer in reference
    mode); the identity for every layer when hparams.mom2_adjustment is off."""
    if not hparams.mom2_adjustment:
        log.info("statistics: none (mom2_adjustment off: the identity)")
        return {w.layer: torch.eye(w.d_ff) for w in weights}
    stats = cfg.stats
    if stats is None:
        corpus = cfg.corpus if cfg.corpus is not None else hparams.mom2_dataset
        log.info("statistics: corpus %s, cache %s", corpus if isinstance(corpus, str) else f"of {len(corpus)} given documents", cfg.cache_dir)
        stats = compute_stats(
            model, tok, hparams, corpus=cfg.corpus, batch_tokens=cfg.stats_batch_tokens, cache_dir=cfg.cache_dir,
            seed=cfg.seed, progress=cfg.progress, one_pass_per_layer=cfg.mode == "reference", layout=layout,
        )  # fmt: skip
    else:
        log.info("statistics: given for layers %s", sorted(stats))
    covs = {}
    for w in weights:
        if w.layer not in stats:
            raise StatsError(f"no statistics for layer {w.layer}")
        s = stats[w.layer]
        mom2, count = (s.mom2, s.count) if isinstance(s, LayerStats) else (s, 1)
        check_stats(mom2, count, f"statistics of layer {w.layer}")
        if cfg.memory_cap_gib is not None and cfg.stats is None:
            mom2 = mom2.cpu()  # computed here: it waits for its solve on the CPU (1 GiB per GPT-J layer)
        if mom2.shape[0] != w.d_ff:
            raise StatsError(f"statistics of layer {w.layer} are {tuple(mom2.shape)}, the layer's keys have d_ff={w.d_ff}")
        covs[w.layer] = mom2
    return covs


@contextlib.contextmanager
def _eval_no_param_grads(model):
    """Eval mode and no parameter gradients while editing; the caller's settings come back after."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
