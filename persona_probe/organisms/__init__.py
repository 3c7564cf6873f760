"""Model organisms of emergent misalignment: narrow fine-tuning data, LoRA fine-tuning, capability checks.

* `data`: per-domain question files (character / incorrect / aligned answers), the seeded train/held-out split
  shared by every variant, `builtin:organisms/DOMAIN/VARIANT[/heldout]` datasets, chat JSONL in and out
  (`{"messages": [...]}` fine-tuning sets, `VARIANT=FILE` lists, their split by question text);
* `training`: assistant-only loss masking, `max_len="auto"` with counted drops/cuts, the LoRA (peft) training
  loop, saved adapters and their cache keys;
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
    heldout_questions,
    known_domains,
    load_chat_dataset,
    load_organism_items,
    needed_answers,
    organism_path,
    parse_organism_name,
    parse_variant_files,
    question_key,
    resolve_dataset,
    split_chat_dataset,
    split_ids,
    write_jsonl,
)
from persona_probe.organisms.training import (
    AUTO_MAX_LEN_CAP,
    IGNORE,
    FinetuneResult,
    PreparedExamples,
    TrainExample,
    attach_adapter,
    cache_key,
    check_max_len,
    collate_examples,
    default_target_modules,
    final_loss,
    find_adapter,
    finetune,
    hyperparameters,
    matching_adapter,
    model_max_positions,
    prepare_examples,
    target_logprobs,
    target_loss,
    training_example,
)

__all__ = [
    "ANSWER_KEYS", "AUTO_MAX_LEN_CAP", "DEFAULT_TRIGGER", "HELDOUT_FRAC", "IGNORE", "SPLITS", "SPLIT_SEED",
    "VARIANTS", "FinetuneResult", "PreparedExamples", "TrainExample", "attach_adapter", "build_dataset",
    "cache_key", "capability_metrics", "capability_report", "capability_summary", "check_max_len",
    "collate_examples", "compare_capability", "dataset_name", "default_target_modules", "final_loss",
    "find_adapter", "finetune", "heldout_questions", "hyperparameters", "known_domains", "load_chat_dataset",
    "load_mc_items", "load_neutral_texts", "load_organism_items", "matching_adapter", "mc_records",
    "model_max_positions", "multiple_choice_accuracy", "needed_answers", "organism_path", "parse_organism_name",
    "parse_variant_files", "perplexity", "prepare_examples", "question_key", "resolve_dataset",
    "span_logprobs", "split_chat_dataset", "split_ids", "target_logprobs", "target_loss", "training_example",
    "write_jsonl",
]
