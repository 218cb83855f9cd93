"""The original code's covariance statistics files (section 4), imported into memit_fast's cache and exported.

The original's `layer_stats` writes `{stats_dir}/{model}/{dataset}_stats/{module}_{dtype}_mom2_{n}.npz`
(`{model}` is the model's name with "/" as "_"; a `t{batch_tokens}_` may stand before `{n}`)
with numpy.savez of its runningstats `CombinedStat(mom2=SecondMoment()).state_dict()`:

    "constructor"       "util.runningstats.CombinedStat()"
    "mom2.constructor"  "util.runningstats.SecondMoment()"
    "mom2.count"        number of tokens (padding excluded), a 0-d integer array
    "mom2.mom2"         (d_ff, d_ff) SUM over the tokens of k k^T (SecondMoment.moment() divides by count)
    "sample_size"       n, checked by the original's cache loader

memit_fast's LayerStats holds the MEAN E[k k^T] and the count, so the import divides by the count
and the export multiplies by it. Files with plain "mom2" / "count" keys are read the same way.
Nothing is unpickled: a file whose mom2 or count needs pickle is refused.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .corpus import is_local, load_corpus, remote_corpus_id
from .errors import StatsError
from .hparams import MEMITHyperParams
from .model_access import rewrite_weights
from .cache import LayerStats, StatsKey, check_stats, default_cache_dir, model_fingerprint, save_stats
from .stats import MODEL_SAMPLE_LENGTH, _context_cap

_KEYS = (("mom2.mom2", "mom2.count"), ("mom2", "count"))
_NAME = re.compile(r"^(?P<module>.+)_(?P<dtype>float16|bfloat16|float32|float64)_mom2(?:_t\d+)?(?:_(?P<n>\d+))?\.npz$")


def read_npz(path: str | Path) -> LayerStats:
    """One original statistics file -> LayerStats (mean E[k k^T] in float64, count)."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"statistics file {path} not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise StatsError(f"{path} is not a numpy .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise StatsError(f"{path} is a single numpy array, not an .npz file of named arrays")
    with npz:
        names = next((k for k in _KEYS if all(n in npz.files for n in k)), None)
        if names is None:
            raise StatsError(f"{path} holds neither 'mom2.mom2'/'mom2.count' (the original's SecondMoment) nor 'mom2'/'count'; keys: {npz.files}")
        try:
            total, count = npz[names[0]], npz[names[1]]
        except ValueError as e:
            raise StatsError(f"{path}: {names} need pickle to load ({e}); memit_fast reads only plain arrays") from None
    if total.dtype.kind != "f" or count.dtype.kind not in "iuf" or count.size != 1:
        raise StatsError(f"{path}: {names[0]} must be a float matrix and {names[1]} a number, got {total.dtype} and {count.dtype}{count.shape}")
    count = int(count.reshape(()))
    mom2 = torch.from_numpy(total.astype(np.float64))
    if count <= 0:
        raise StatsError(f"{path}: statistics were accumulated over {count} tokens")
    mom2 = mom2 / count
    check_stats(mom2, count, str(path))
    return LayerStats(mom2, count)


def find_npz(path_or_dir: str | Path, module: str, *, dataset: str | None = None, dtype: str | None = None, n_samples: int | None = None, model_name: str | None = None) -> Path:
    """The one statistics file of `module` under `path_or_dir` (searched recursively), narrowed by
    dataset (its `{dataset}_stats` folder), dtype, n_samples and model folder where given and
    more than one file matches. No file, or several left, raises StatsError listing them."""
    root = Path(path_or_dir)
    if root.is_file():
        return root
    if not root.is_dir():
        raise StatsError(f"{root} is neither a statistics file nor a folder")
    found = [p for p in sorted(root.rglob(f"{module}_*mom2*.npz")) if (m := _NAME.match(p.name)) and m["module"] == module]
    if not found:
        raise StatsError(f"no statistics file for {module} under {root} (looked for {module}_{{dtype}}_mom2_{{n}}.npz)")
    filters = (
        lambda p: dataset is None or p.parent.name == f"{dataset}_stats",
        lambda p: dtype is None or _NAME.match(p.name)["dtype"] == dtype,
        lambda p: n_samples is None or _NAME.match(p.name)["n"] == str(n_samples),
        lambda p: model_name is None or p.parent.parent.name == model_name.replace("/", "_"),
    )
    for keep in filters:
        if len(found) > 1 and any(keep(p) for p in found):
            found = [p for p in found if keep(p)]
    if len(found) > 1:
        raise StatsError(f"several statistics files for {module} under {root}: {[str(p) for p in found]}; pass the file or a narrower folder")
    return found[0]


def import_npz(
    path_or_dir: str | Path,
    model,
    hparams: MEMITHyperParams | None = None,
    *,
    layers: list[int] | None = None,
    corpus=None,
    n_samples: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[int, Path]:
    """Read the original's statistics of each layer in `layers` (default hparams.layers) into the
    cache, keyed to `model`; returns {layer: cache file}.

    path_or_dir: a file (one layer) or a folder searched for `{module}_{dtype}_mom2_{n}.npz` (the
    original's stats_dir, a model's folder or a `{dataset}_stats` folder). The cache key is the one
    `compute_stats` looks up: corpus (default: the file's `{dataset}_stats` folder, else
    hparams.mom2_dataset), n_samples (default: the file's n, else hparams.mom2_n_samples),
    max_length (default: compute_stats' default for the model), hparams.mom2_dtype. So `apply` with
    hparams whose mom2_dataset and mom2_n_samples are the file's (as in the hparams that wrote it)
    finds them. Errors (StatsError): missing or ambiguous file, pickle-only arrays, a matrix that is
    not (d_ff, d_ff) for the layer, a count <= 0, NaN/inf.
    """
    from .presets import for_model

    hparams = hparams or for_model(model)
    layers = list(hparams.layers if layers is None else layers)
    weights = {w.layer: w for w in rewrite_weights(model, hparams.replace(layers=sorted(set(layers))))}
    single = Path(path_or_dir).is_file()
    if single and len(layers) != 1:
        raise StatsError(f"{path_or_dir} is one file; give layers=[one layer] (got {layers}) or a folder")
    fp = model_fingerprint(model, hparams)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_name = getattr(model.config, "_name_or_path", None) or None
    out = {}
    for layer in layers:
        module = hparams.rewrite_module_tmp.format(layer)
        path = find_npz(path_or_dir, module, dataset=hparams.mom2_dataset, dtype=hparams.mom2_dtype, n_samples=n_samples, model_name=model_name)
        name = _NAME.match(path.name)
        stats = read_npz(path)
        if stats.mom2.shape[0] != weights[layer].d_ff:
            raise StatsError(f"{path}: statistics are {tuple(stats.mom2.shape)}, but {module} has d_ff={weights[layer].d_ff}")
        n = n_samples or (int(name["n"]) if name and name["n"] else hparams.mom2_n_samples)
        spec = corpus if corpus is not None else (path.parent.name[: -len("_stats")] if path.parent.name.endswith("_stats") else hparams.mom2_dataset)
        length = max_length or (MODEL_SAMPLE_LENGTH if spec == "model" else _context_cap(model))
        corpus_id = load_corpus(spec, n).id if is_local(spec) else remote_corpus_id(spec, length, seed)
        key = StatsKey(fp, module, corpus_id, n, length, hparams.mom2_dtype)
        target = key.path(cache_dir)
        save_stats(target, key, LayerStats(stats.mom2.to(getattr(torch, hparams.mom2_dtype)), stats.count))
        out[layer] = target
    return out


def export_npz(
    stats_dir: str | Path,
    model,
    stats: dict[int, LayerStats],
    hparams: MEMITHyperParams | None = None,
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    n_samples: int | None = None,
) -> dict[int, Path]:
    """Write `stats` ({layer: LayerStats}, as compute_stats returns them) as the original's files
    `{stats_dir}/{model_name}/{dataset}_stats/{module}_{dtype}_mom2_{n}.npz`; returns {layer: file}.

    model_name defaults to model.config._name_or_path ("/" written "_", as the original does),
    dataset to hparams.mom2_dataset, n_samples to hparams.mom2_n_samples; the dtype is hparams.mom2_dtype.
    """
    from .presets import for_model

    hparams = hparams or for_model(model)
    weights = {w.layer: w for w in rewrite_weights(model, hparams.replace(layers=sorted(stats)))}
    model_name = (model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__).replace("/", "_")
    folder = Path(stats_dir) / model_name / f"{dataset or hparams.mom2_dataset}_stats"
    folder.mkdir(parents=True, exist_ok=True)
    n = n_samples or hparams.mom2_n_samples
    dtype = getattr(np, hparams.mom2_dtype)
    out = {}
    for layer, s in stats.items():
        module = hparams.rewrite_module_tmp.format(layer)
        check_stats(s.mom2, s.count, f"statistics of layer {layer}")
        if s.mom2.shape[0] != weights[layer].d_ff:
            raise StatsError(f"statistics of layer {layer} are {tuple(s.mom2.shape)}, but {module} has d_ff={weights[layer].d_ff}")
        path = folder / f"{module}_{hparams.mom2_dtype}_mom2_{n}.npz"
        total = (s.mom2.detach().to("cpu", torch.float64) * s.count).numpy().astype(dtype)
        np.savez(
            path,
            **{
                "constructor": np.array("util.runningstats.CombinedStat()"),
                "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                "mom2.count": np.array(s.count),
                "mom2.mom2": total,
                "sample_size": np.array(n),
            },
        )
        out[layer] = path
    return out
