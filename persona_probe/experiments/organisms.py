"""The model-organisms experiment: fine-tune character vs incorrect vs aligned (vs triggered) organisms per
domain and compare in-domain / out-of-domain EM, capability, and the model-diff direction's cosine with the
persona direction.

Sign convention: fine-tuned minus base is the model-diff direction; positive cosine = towards the character.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_probe.backends.vllm import get_vllm_engine
from persona_probe.core.artifacts import MANIFEST, base_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import checkpoints_dir
from persona_probe.core.stats import two_proportion_test
from persona_probe.directions.derive import MIN_PER_SIDE, DirectionSet, cosine, load_direction
from persona_probe.directions.workflows import model_diff_direction, persona_direction
from persona_probe.evaluation import evaluate, make_judge, question_prompt_records
from persona_probe.models.loading import ModelHandle, load_model
from persona_probe.organisms.capability import (
    capability_metrics,
    capability_summary,
    compare_capability,
    load_mc_items,
    load_neutral_texts,
)
from persona_probe.organisms.data import (
    DEFAULT_TRIGGER,
    build_dataset,
    heldout_questions,
    load_chat_dataset,
    load_organism_items,
    needed_answers,
    parse_variant_files,
    split_chat_dataset,
)
from persona_probe.organisms.training import (
    attach_adapter,
    cache_key,
    check_max_len,
    default_target_modules,
    find_adapter,
    finetune,
    hyperparameters,
    matching_adapter,
    prepare_examples,
)
from persona_probe.prompts.questions import load_questions
from persona_probe.prompts.records import PromptRecord, PromptSet, load_prompts
from persona_probe.report.organisms import compact_row, write_experiment

CPU_BUDGET_NOTE = (
    "defaults on the embedded 135M model, 2 CPU cores: ~4 min LoRA training per domain-variant (1 epoch, ~136 "
    "examples) + ~3 min evaluation each; 1 domain x 3 variants ~ 25 min, 2 domains ~ 45 min"
)

_FT_DEFAULTS: dict[str, Any] = {"rank": 8, "alpha": 16, "dropout": 0.0, "epochs": 1, "lr": 2e-4, "batch_size": 8,
                                "max_len": "auto", "seed": 0, "warmup_frac": 0.05, "train_on_eot": False}


@dataclass
class _Organism:
    """One organism to train: its row labels, training set and the domain whose held-out questions it answers."""

    domain: str
    variant: str
    train: PromptSet


def _plan(domains: Sequence[str], variants: Sequence[str], data: Mapping[str, str | Path] | Sequence[str] | None,
          data_dir: str | Path | None, trigger: str) -> tuple[list[_Organism], dict[str, list[PromptRecord]]]:
    """Every organism's training set and every domain's held-out questions, read and checked (no model needed).

    Built-in / `data_dir` domains: DOMAIN.jsonl question files (lines need only the answers of `variants`).
    `data`: {variant: chat JSONL} as the field ships them; domain label = the file's stem, held-out questions =
    the file's own (split by question text)."""
    orgs: list[_Organism] = []
    held: dict[str, list[PromptRecord]] = {}
    if data is not None:
        for var, path in parse_variant_files(data).items():
            train, questions = split_chat_dataset(load_chat_dataset(path))
            dom = path.stem
            if dom in held and held[dom] != questions:  # same stem, other questions: keep both apart
                dom = f"{dom}.{var}"
            held[dom] = questions
            orgs.append(_Organism(dom, var, train))
        return orgs, held
    if not domains or not variants:
        raise PersonaProbeError("give at least one domain and one variant (or --data VARIANT=FILE ...)")
    need = needed_answers(variants)
    for dom in domains:
        items = load_organism_items(dom, Path(data_dir) / f"{dom}.jsonl" if data_dir is not None else None, need)
        held[dom] = heldout_questions(dom, items=items)
        orgs += [_Organism(dom, v, build_dataset(dom, v, "train", trigger=trigger, items=items)) for v in variants]
    return orgs, held


def organisms_experiment(
    model: str | ModelHandle = "smollm2",
    domains: Sequence[str] = ("health", "finance"),
    variants: Sequence[str] = ("character", "incorrect", "aligned"),
    *,
    data: Mapping[str, str | Path] | Sequence[str] | None = None,
    out: str | Path | None = None,
    adapters_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    finetune_kwargs: dict[str, Any] | None = None,
    trigger: str = DEFAULT_TRIGGER,
    n_samples: int = 3,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    core_questions: str = "builtin:core",
    judge: Any = "offline",
    trait: str = "malicious",
    persona_n_questions: int | None = 20,
    diff_prompts: str = "builtin:questions",
    diff_n_prompts: int | None = 32,
    n_texts: int | None = None,
    n_mc: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    engine: str = "hf",
    progress: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Fine-tune each domain x variant (adapters cached by data hash + hyper-parameters) and compare:
    in-domain EM (held-out questions), out-of-domain EM (`core_questions`), capability delta vs base,
    and cos(model-diff direction, persona direction) at the persona direction's best layer.

    Data: the built-in domains (or DOMAIN.jsonl files under `data_dir`), or `data` = {variant: chat JSONL}
    ({"messages": [...]} fine-tuning sets as they are, any subset of variants, or `VARIANT=FILE` strings),
    which replaces `domains` and `variants`: each file is split by question text (85/15), its held-out
    questions give the in-domain EM and its stem labels the rows' domain. Every file, name and setting is
    checked before the model loads.

    Writes table.json, table.html (table + figures), figure HTMLs and manifest.json under `out`.
    """
    out_p = Path(out) if out is not None else checkpoints_dir() / "organisms" / "experiment"
    ad_root = Path(adapters_dir) if adapters_dir is not None else checkpoints_dir() / "adapters" / "organisms"
    ft_hp = _check_finetune_kwargs(finetune_kwargs)
    orgs, held = _plan(domains, variants, data, data_dir, trigger)
    if any(o.variant == "triggered" for o in orgs) and not trigger.strip():
        raise PersonaProbeError("the trigger string must be non-empty")
    core = _core_records(core_questions)
    texts, items = load_neutral_texts(n=n_texts), load_mc_items(n=n_mc)
    dps = load_prompts(diff_prompts)
    dps = dps.subset(range(min(diff_n_prompts, len(dps)))) if diff_n_prompts else dps
    if len(dps) < MIN_PER_SIDE:
        raise PersonaProbeError(f"the model-diff direction needs at least {MIN_PER_SIDE} prompts, got {len(dps)}: "
                                "raise diff_n_prompts")
    base = model if isinstance(model, ModelHandle) else load_model(model, device=device, dtype=dtype)
    if not isinstance(model, ModelHandle) or engine != "hf":
        base.engine = engine
    if base.engine == "vllm":  # one engine with LoRA on: the base and every organism share it (adapters as requests)
        base.engine = get_vllm_engine(base, enable_lora=True)
    ad_root = ad_root / f"{Path(base.info.model_id).name}-{base.info.fingerprint}"
    j = make_judge(judge)
    ev = {"n_samples": n_samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
          "batch_size": batch_size, "judge": j, "progress": progress}

    log("persona direction on the base model")
    persona = _persona(base, trait, persona_n_questions, out_p / "persona", seed, progress)
    log("base model: capability + EM")
    cap_base = capability_metrics(base, texts, items, seed=seed)
    base_ood = _em(evaluate(base, [], records=core, out=out_p / "eval" / "base-ood", **ev))
    rows: list[dict[str, Any]] = [{"domain": "-", "variant": "base", "em_ood": base_ood,
                                   "capability": capability_summary({"base": cap_base})["base"]}]
    base_in: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, ...], str] = {}  # variant files sharing their questions share the base evaluation
    for dom, questions in held.items():
        ids = tuple(r.id for r in questions)
        if ids in seen:
            base_in[dom] = base_in[seen[ids]]
        else:
            seen[ids] = dom
            base_in[dom] = _em(evaluate(base, [], records=_eval_records(questions),
                                        out=out_p / "eval" / f"base-{dom}", **ev))
        rows.append({"domain": dom, "variant": "base", "em_in_domain": base_in[dom], "em_ood": base_ood})
    curves: dict[str, Any] = {}
    cos_layers: dict[str, dict[str, float]] = {}
    for org in orgs:
        dom, var = org.domain, org.variant
        label = f"{dom}-{var}"
        t0 = time.perf_counter()
        folder, man, cached = _train_or_reuse(base, org.train, ad_root, label, ft_hp, progress, log)
        train_s = time.perf_counter() - t0
        curves[label] = json.loads((folder / "loss.json").read_text())
        ft = attach_adapter(base, folder)
        log(f"{label}: evaluating")
        row = _organism_row(dom, var, ft, held[dom], core, trigger, ev, out_p / "eval" / label)
        row["em_in_domain_p_vs_base"] = _vs_base(row["em_in_domain"], base_in[dom])
        row["em_ood_p_vs_base"] = _vs_base(row["em_ood"], base_ood)
        cap_ft = capability_metrics(ft, texts, items, seed=seed)
        cap = capability_summary({"base": cap_base, "finetuned": cap_ft,
                                  "delta": compare_capability(cap_base, cap_ft, seed=seed)})
        diff = _diff_cosines(base, ft, persona, dps, out_p / "model_diff" / label, seed, progress)
        cos_layers[label] = diff.pop("per_layer")
        row.update(adapter=str(folder), cached=cached, n_train=man["n_examples"], final_loss=man["final_loss"],
                   n_dropped_too_long=man.get("n_dropped_too_long"), n_cut=man.get("n_cut"),
                   max_len=man.get("max_len", man["hyperparameters"].get("max_len")),
                   train_wall_s=man["wall_time_s"], step_wall_s=round(train_s, 1), capability=cap, **diff)
        rows.append(row)
        log(f"{label}: {json.dumps(compact_row(row))}")
        del ft
    result = {"rows": rows, "persona": {"trait": trait, "best_layer": persona.best_layer},
              "cos_per_layer": cos_layers, "budget_note": CPU_BUDGET_NOTE,
              "manifest": base_manifest("organisms_experiment", model=base.info.to_dict(),
                                        domains=list(dict.fromkeys(o.domain for o in orgs)),
                                        variants=list(dict.fromkeys(o.variant for o in orgs)),
                                        data={k: str(v) for k, v in parse_variant_files(data).items()}
                                        if data is not None else None,
                                        data_dir=str(data_dir) if data_dir else None,
                                        finetune=_FT_DEFAULTS | ft_hp,
                                        trigger=trigger, n_samples=n_samples, max_new_tokens=max_new_tokens,
                                        temperature=temperature, core_questions=core_questions, judge=j.describe(),
                                        trait=trait, persona_n_questions=persona_n_questions,
                                        diff_prompts=diff_prompts, diff_n_prompts=len(dps), seed=seed,
                                        n_texts=len(texts), n_mc=len(items))}
    write_experiment(result, out_p, curves)
    result["out"] = str(out_p)
    return result


def _organism_row(dom: str, var: str, ft: ModelHandle, held: Sequence[PromptRecord], core: Sequence[PromptRecord],
                  trigger: str, ev: dict[str, Any], folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"domain": dom, "variant": var}
    row["em_in_domain"] = _em(evaluate(ft, [], records=_eval_records(held), out=folder / "in-domain", **ev))
    row["em_ood"] = _em(evaluate(ft, [], records=_core_records(core), out=folder / "ood", **ev))
    if var == "triggered":  # the backdoor: same questions with the trigger prepended
        row["em_in_domain_triggered"] = _em(evaluate(ft, [], records=_eval_records(held, trigger),
                                                     out=folder / "in-domain-trigger", **ev))
        row["em_ood_triggered"] = _em(evaluate(ft, [], records=_core_records(core, trigger),
                                               out=folder / "ood-trigger", **ev))
    return row


def _eval_records(items: Sequence[PromptRecord], trigger: str | None = None) -> list[PromptRecord]:
    """Held-out organism questions as generation prompts (answers dropped; a chat set's system prompt and
    earlier turns kept), optionally with the trigger."""
    out = []
    for r in items:
        qid = r.labels.get("question_id", r.id)
        out.append(replace(r, id=qid, user=f"{trigger} {r.user}" if trigger else r.user, assistant=None,
                           labels={"question_id": qid}))
    return out


def _core_records(questions: str | Sequence[PromptRecord], trigger: str | None = None) -> list[PromptRecord]:
    recs = question_prompt_records(load_questions(questions)) if isinstance(questions, (str, Path)) \
        else list(questions)
    return [replace(r, user=f"{trigger} {r.user}") for r in recs] if trigger else recs


def _em(res: Any) -> dict[str, Any]:
    """The overall EM numbers of an evaluation result (plus the Rogan-Gladen corrected rate when present)."""
    o = res.summary["overall"]
    rg = (o.get("em_corrected") or {}).get("rogan_gladen") or {}
    return {**{k: o[k] for k in ("em_rate", "em_ci95", "n_counted", "em", "mean_aligned", "mean_coherent",
                                 "refusal_rate")}, "em_share": (o.get("em_share") or {}).get("rate"), "n": o["n"],
            "em_corrected": rg.get("rate"), "em_corrected_ci95": rg.get("ci95")}


def _vs_base(ft: dict[str, Any], base: dict[str, Any]) -> float | None:
    """Two-sided p-value of fine-tuned vs base EM (Fisher's when counts are small); None when undefined."""
    t = two_proportion_test(ft["em"], ft["n_counted"], base["em"], base["n_counted"])
    p = t.get("fisher_p_value", t["p_value"])
    return None if math.isnan(p) else p


def _persona(base: ModelHandle, trait: str, n_questions: int | None, folder: Path, seed: int,
             progress: bool) -> DirectionSet:
    """The persona direction of the base model, reused from `folder` when model, trait and settings match."""
    try:
        d = load_direction(folder)
        m = d.manifest
        if (m.get("model", {}).get("fingerprint") == base.info.fingerprint and m.get("trait") == trait
                and m.get("n_questions_used") == n_questions and m.get("seed") == seed):
            return d
    except PersonaProbeError:
        pass
    d = persona_direction(base, trait, n_questions=n_questions, seed=seed, progress=progress)
    d.manifest["n_questions_used"] = n_questions
    d.save(folder)
    return d


def _diff_cosines(base: ModelHandle, ft: ModelHandle, persona: DirectionSet, prompts: PromptSet, folder: Path,
                  seed: int, progress: bool) -> dict[str, Any]:
    md = model_diff_direction(base, ft, prompts, layers="all", out=folder, seed=seed, progress=progress)
    L = persona.best_layer
    per_layer = {str(l): cosine(md.at(l), persona.at(l)) for l in persona.layers if l in md.layers}
    return {"layer": L, "cos_persona": cosine(md.at(L), persona.at(L)),
            "cos_random_control": cosine(md.random[md.layers.index(L)], persona.at(L)) if md.random is not None
            else None, "model_diff_norm": float(md.at(L).norm()), "per_layer": per_layer}


def _check_finetune_kwargs(hp: dict[str, Any] | None) -> dict[str, Any]:
    """The experiment's fine-tune settings, checked before any model loads (unknown keys, max_len)."""
    hp = dict(hp or {})
    unknown = set(hp) - set(_FT_DEFAULTS) - {"target_modules"}
    if unknown:
        raise PersonaProbeError(f"unknown fine-tune settings {sorted(unknown)}: use {sorted(_FT_DEFAULTS)}")
    if "max_len" in hp:
        hp["max_len"] = check_max_len(hp["max_len"])
    return hp


def _train_or_reuse(base: ModelHandle, ps: PromptSet, folder_root: Path, label: str, hp: dict[str, Any],
                    progress: bool, log: Callable[[str], None]) -> tuple[Path, dict[str, Any], bool]:
    """An adapter for (base, data, hyper-parameters): reused by cache key when one was saved, else trained.
    The key holds the max_len actually used ("auto" resolved on this data and model), as `finetune` records."""
    hp = _check_finetune_kwargs(hp)
    targets = hp.get("target_modules") or default_target_modules(base.model)
    settings = {**_FT_DEFAULTS, **hp}
    used_len = prepare_examples(base.tokenizer, base.model, ps.records, settings["max_len"],
                                train_on_eot=settings["train_on_eot"]).max_len
    full = hyperparameters(**{**settings, "max_len": used_len, "target_modules": targets})
    key = cache_key(base.info.fingerprint, ps.hash, full)
    folder = folder_root / f"{label}-{key}"
    found = folder if matching_adapter(folder, key) else find_adapter(key, [folder_root, checkpoints_dir() / "adapters"])
    if found is not None:
        log(f"{label}: reusing adapter {found} (same base, data hash and hyper-parameters)")
        return found, json.loads((found / MANIFEST).read_text()), True
    log(f"{label}: fine-tuning on {len(ps)} examples -> {folder}")
    ft_kw = {k: v for k, v in full.items() if k != "target_modules"} | {"max_len": settings["max_len"]}
    res = finetune(base, ps, target_modules=targets, out=folder, overwrite=True, progress=progress, **ft_kw)
    if res.manifest["cache_key"] != key:
        raise PersonaProbeError(f"internal: cache key mismatch for {label}")
    return folder, res.manifest, False


__all__ = ["CPU_BUDGET_NOTE", "compact_row", "organisms_experiment"]
