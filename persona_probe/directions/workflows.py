"""Extract-and-derive in one go: the persona, model-diff and response-contrast routes to a direction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_probe.activations.extraction import ActivationSet, extract
from persona_probe.backends.sampling import generate, with_responses
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import checkpoints_dir
from persona_probe.directions.derive import DirectionSet, derive
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptRecord, PromptSet, contrast_questions, load_prompts, persona_records


def _maybe_generate(handle: ModelHandle, recs: list[PromptRecord], position: str, gen: dict[str, Any],
                    backend: str, desc: str) -> list[PromptRecord]:
    if position != "response_mean":
        return recs
    samples = generate(handle, recs, backend=backend, desc=desc, **gen)
    return with_responses(recs, samples)


def persona_direction(
    handle: ModelHandle,
    trait: str,
    *,
    position: str = "prompt_last",
    layers: str | list[Any] = "all",
    n_questions: int | None = None,
    n_prompts: int | None = None,
    backend: str = "hf",
    batch_size: int = 16,
    out: str | Path | None = None,
    seed: int = 0,
    test_frac: float = 0.25,
    gen: dict[str, Any] | None = None,
    progress: bool = True,
) -> DirectionSet:
    """Persona-vectors style: same questions under the trait's character vs negative system prompts.

    For position="response_mean" the model first answers each prompt (greedy by default) and the
    residuals are averaged over its own response tokens.
    """
    qs = contrast_questions()[:n_questions]
    gen = {"temperature": 0.0, "max_new_tokens": 48, "batch_size": batch_size, "seed": seed, "progress": progress,
           **(gen or {})}
    sides: dict[str, ActivationSet] = {}
    folder = Path(out) if out else None
    for side in ("positive", "negative"):
        recs = persona_records(trait, side, qs, n_prompts)
        recs = _maybe_generate(handle, recs, position, gen, backend, f"responses [{trait}/{side}]")
        sides[side] = extract(handle, PromptSet(f"builtin:persona/{trait}/{side}", tuple(recs)), layers=layers,
                              positions=position, backend=backend, batch_size=batch_size,
                              out=folder / f"acts-{side}" if folder else None, seed=seed, progress=progress, overwrite=True)
    d = derive(sides["positive"], sides["negative"], position=position, method="persona", name=f"persona:{trait}",
               test_frac=test_frac, seed=seed, extra_manifest={"trait": trait})
    if folder:
        d.save(folder)
    return d


def model_diff_direction(
    base: ModelHandle,
    finetuned: ModelHandle,
    prompts: str | PromptSet = "builtin:questions",
    *,
    position: str = "prompt_last",
    layers: str | list[Any] = "all",
    backend: str = "hf",
    batch_size: int = 16,
    out: str | Path | None = None,
    seed: int = 0,
    test_frac: float = 0.25,
    gen: dict[str, Any] | None = None,
    progress: bool = True,
) -> DirectionSet:
    """Fine-tuned minus base on the same prompts; for response_mean, on the *same* responses (the
    fine-tuned model's own answers, teacher-forced through both models)."""
    ps = load_prompts(prompts)
    recs = list(ps.records)
    if position == "response_mean" and not ps.has_responses:
        gen = {"temperature": 0.0, "max_new_tokens": 48, "batch_size": batch_size, "seed": seed,
               "progress": progress, **(gen or {})}
        recs = with_responses(recs, generate(finetuned, recs, backend=backend, desc="responses [fine-tuned]", **gen))
    same = PromptSet(ps.name, tuple(recs))
    folder = Path(out) if out else None
    a_ft = extract(finetuned, same, layers=layers, positions=position, backend=backend, batch_size=batch_size,
                   out=folder / "acts-finetuned" if folder else None, seed=seed, progress=progress, overwrite=True)
    a_base = extract(base, same, layers=layers, positions=position, backend=backend, batch_size=batch_size,
                     out=folder / "acts-base" if folder else None, seed=seed, progress=progress, overwrite=True)
    d = derive(a_ft, a_base, position=position, method="model_diff", name="model_diff", test_frac=test_frac,
               seed=seed)
    if folder:
        d.save(folder)
    return d


def response_contrast_direction(
    handle: ModelHandle,
    records: str | PromptSet,
    *,
    label_key: str = "label",
    positive: str = "misaligned",
    negative: str = "aligned",
    position: str = "response_mean",
    layers: str | list[Any] = "all",
    backend: str = "hf",
    batch_size: int = 16,
    out: str | Path | None = None,
    seed: int = 0,
    test_frac: float = 0.25,
    progress: bool = True,
) -> DirectionSet:
    """Misaligned minus aligned responses to the same questions, labelled by the data or a judge
    (`labels[label_key]`)."""
    ps = load_prompts(records)
    pos = [r for r in ps.records if r.labels.get(label_key) == positive]
    neg = [r for r in ps.records if r.labels.get(label_key) == negative]
    if not pos or not neg:
        raise PersonaProbeError(f"response contrast needs records labelled {label_key}={positive!r} and "
                                f"{label_key}={negative!r}; found {len(pos)} and {len(neg)}")
    folder = Path(out) if out else None
    a = extract(handle, PromptSet(f"{ps.name}:{positive}", tuple(pos)), layers=layers, positions=position,
                backend=backend, batch_size=batch_size, out=folder / "acts-pos" if folder else None, seed=seed,
                progress=progress, overwrite=True)
    b = extract(handle, PromptSet(f"{ps.name}:{negative}", tuple(neg)), layers=layers, positions=position,
                backend=backend, batch_size=batch_size, out=folder / "acts-neg" if folder else None, seed=seed,
                progress=progress, overwrite=True)
    d = derive(a, b, position=position, method="response", name=f"response:{label_key}", test_frac=test_frac,
               seed=seed)
    if folder:
        d.save(folder)
    return d


def default_direction_dir(name: str) -> Path:
    return checkpoints_dir() / "directions" / name
