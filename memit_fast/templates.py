"""Context templates (docs/algorithm.md section 1): ["{}"] plus 5 short prefixes sampled from the model.

The original samples them unseeded; here a seed (or templates passed in) makes runs reproducible.
Templates come in groups, as in the original: [["{}"], [five prefixed templates]]; keys are
averaged within each group, then across groups (section 3).
"""

from __future__ import annotations

from .corpus import sample_texts

STARTS = ("The", "Therefore", "Because", "I", "You")


def generate_context_templates(model, tok, *, seed: int = 0, length: int = 10, top_k: int = 5) -> list[list[str]]:
    """[["{}"], [t_1..t_5]]: one sample per start word, `length` tokens in all, top-k sampling,
    the five sampled together."""
    texts = sample_texts(model, tok, len(STARTS), length, seed=seed, starts=STARTS, top_k=top_k, progress=False)
    return [["{}"], [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]]


def normalize_templates(templates) -> list[list[str]]:
    """Groups of templates, each holding `{}` once; a flat list becomes [["{}"], the others]."""
    from .errors import RequestError

    if templates and all(isinstance(t, str) for t in templates):
        rest = [t for t in templates if t != "{}"]
        templates = [["{}"], rest] if rest else [["{}"]]
    groups = [list(g) for g in templates]
    if not groups or groups[0] != ["{}"]:
        raise RequestError('context templates must start with the bare group ["{}"]')
    for group in groups:
        for t in group:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise RequestError(f"context template {t!r} must contain '{{}}' exactly once")
        if not group:
            raise RequestError("empty group of context templates")
    return groups


def flatten(templates: list[list[str]]) -> list[str]:
    return [t for group in templates for t in group]


def group_index(templates: list[list[str]]) -> list[int]:
    """The group of each template of `flatten(templates)`."""
    return [g for g, group in enumerate(templates) for _ in group]
