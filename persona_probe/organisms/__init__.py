"""Model organisms of emergent misalignment: narrow fine-tuning data, LoRA fine-tuning, capability checks.

* `data`: per-domain question files (character / incorrect / aligned answers), the seeded train/held-out split
  shared by every variant, `builtin:organisms/DOMAIN/VARIANT[/heldout]` datasets, chat JSONL in and out;
* `training`: assistant-only loss masking, the LoRA (peft) training loop, saved adapters and their cache keys;
* `capability`: perplexity on neutral text and multiple-choice accuracy, with paired base-vs-fine-tuned deltas.

The comparison experiment lives in `experiments.organisms`, its tables/figures in `report.organisms`. peft is
imported only when fine-tuning.
"""

from __future__ import annotations

from persona_probe.organisms.capability import (
    capability_metrics,
    capability_report,
    capability_summary,
    compare_capability,
    load_mc_items,
    load_neutral_texts,
    mc_records,
    multiple_choice_accuracy,
    perplexity,
    span_logprobs,
)
from persona_probe.organisms.data import (
    ANSWER_KEYS,
    DEFAULT_TRIGGER,
    HELDOUT_FRAC,
    SPLIT_SEED,
    SPLITS,
    VARIANTS,
    build_dataset,
    dataset_name,
    known_domains,
    load_chat_dataset,
    load_organism_items,
    organism_path,
    parse_organism_name,
    resolve_dataset,
    split_ids,
    write_jsonl,
)
from persona_probe.organisms.training import (
    IGNORE,
    FinetuneResult,
    TrainExample,
    attach_adapter,
    cache_key,
    collate_examples,
    default_target_modules,
    final_loss,
    find_adapter,
    finetune,
    hyperparameters,
    matching_adapter,
    target_logprobs,
    target_loss,
    training_example,
)

__all__ = [
    "ANSWER_KEYS", "DEFAULT_TRIGGER", "HELDOUT_FRAC", "IGNORE", "SPLITS", "SPLIT_SEED", "VARIANTS", "FinetuneResult",
    "TrainExample", "attach_adapter", "build_dataset", "cache_key", "capability_metrics", "capability_report",
    "capability_summary", "collate_examples", "compare_capability", "dataset_name", "default_target_modules",
    "final_loss", "find_adapter", "finetune", "hyperparameters", "known_domains", "load_chat_dataset",
    "load_mc_items", "load_neutral_texts", "load_organism_items", "matching_adapter", "mc_records",
    "multiple_choice_accuracy", "organism_path", "parse_organism_name", "perplexity", "resolve_dataset",
    "span_logprobs", "split_ids", "target_logprobs", "target_loss", "training_example", "write_jsonl",
]
