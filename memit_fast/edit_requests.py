"""Edit requests in the original format, checked and normalised (docs/algorithm.md, "Notation and the objects involved")."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RequestError


@dataclass(frozen=True)
class EditRequest:
    """One fact to write. `prompt` holds `{}` once, where `subject` goes; `target` starts with a space."""

    prompt: str
    subject: str
    target: str

    @property
    def before(self) -> str:
        return self.prompt.split("{}", 1)[0]

    @property
    def after(self) -> str:
        return self.prompt.split("{}", 1)[1]


def _target_str(raw: dict, where: str) -> str:
    target = raw.get("target_new")
    if isinstance(target, dict):
        target = target.get("str")
    if not isinstance(target, str) or not target.strip():
        raise RequestError(f"{where}: target_new['str'] must be a non-empty string, got {target!r}")
    return target if target.startswith(" ") else " " + target


def normalize_requests(requests) -> list[EditRequest]:
    """Check the original request dicts (a CounterFact record's `requested_rewrite` too).

    Errors: prompt without `{}` or with more than one; empty subject or target; two requests
    with the same subject and prompt but different targets (the paper's Eq. 5 forbids them).
    """
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise RequestError("no requests given")
    out: list[EditRequest] = []
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, raw in enumerate(requests):
        where = f"request {i}"
        if isinstance(raw, dict) and "requested_rewrite" in raw:
            where = f"request {i} (case_id {raw.get('case_id', '?')})"
            raw = raw["requested_rewrite"]
        if not isinstance(raw, dict):
            raise RequestError(f"{where}: expected a dict with prompt, subject and target_new, got {type(raw).__name__}")
        prompt, subject = raw.get("prompt"), raw.get("subject")
        if not isinstance(prompt, str) or prompt.count("{}") != 1:
            raise RequestError(f"{where}: prompt must contain '{{}}' exactly once, got {prompt!r}")
        if not isinstance(subject, str) or not subject.strip():
            raise RequestError(f"{where}: subject must be a non-empty string, got {subject!r}")
        target = _target_str(raw, where)
        key = (prompt, subject)
        if key in seen and seen[key][1] != target:
            j, other = seen[key]
            raise RequestError(
                f"{where} conflicts with request {j}: same subject {subject!r} and prompt {prompt!r} "
                f"but different targets {other!r} and {target!r}"
            )
        seen.setdefault(key, (i, target))
        out.append(EditRequest(prompt, subject, target))
    return out
