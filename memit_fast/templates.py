"""Context templates (MEMIT.md section 1): ["{}"] plus 5 short prefixes sampled from the model.

The original samples them unseeded; here a seed (or templates passed in) makes runs reproducible.
Templates come in groups, as in the original: [["{}"], [five prefixed templates]]; keys are
averaged within each group, then across groups (section 3).
"""

from __future__ import annotations

import torch

from .model_access import model_device

STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(model, tok, *, seed: int = 0, length: int = 10, top_k: int = 5) -> list[list[str]]:
    """[["{}"], [t_1..t_5]]: one sample per start word, `length` tokens in all, top-k sampling."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    prefixed = []
    for start in STARTS:
        ids = list(tok(start)["input_ids"])
        while len(ids) < length:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
            top_p, top_i = logits.softmax(-1).topk(top_k)
            ids.append(int(top_i[torch.multinomial(top_p.cpu(), 1, generator=gen)]))
        text = tok.decode(ids, skip_special_tokens=True)
        prefixed.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return [["{}"], prefixed]


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
