"""Prompts layer: the chat record, prompt sets (JSONL, built-in, persona contrasts), evaluation question sets,
and chat-template tokenization into right-padded batches.

`base` (PromptRecord, data_path) sits below `questions` (question sets) and `records` (prompt sets, tokenization).
"""

from persona_probe.prompts.base import PromptRecord, data_path, parse_record, read_records
from persona_probe.prompts.questions import (
    BUILTIN_QUESTIONS,
    Question,
    as_questions,
    load_questions,
    parse_questions,
    question_records,
)
from persona_probe.prompts.records import (
    POSITIONS,
    Batch,
    PromptSet,
    TokenizedPrompt,
    collate,
    contrast_questions,
    length_sorted_batches,
    load_prompts,
    load_traits,
    padding_waste,
    persona_records,
    records_from_jsonl,
    tokenize_record,
)
from persona_probe.prompts.traits import TraitFile, load_trait_file, user_traits_dir

__all__ = [
    "BUILTIN_QUESTIONS", "POSITIONS", "Batch", "PromptRecord", "PromptSet", "Question", "TokenizedPrompt",
    "as_questions", "collate", "contrast_questions", "data_path", "length_sorted_batches", "load_prompts",
    "load_questions", "load_traits", "padding_waste", "parse_questions", "persona_records", "question_records",
    "records_from_jsonl", "tokenize_record",
    "parse_record", "read_records",
    "TraitFile", "load_trait_file", "user_traits_dir",
]
