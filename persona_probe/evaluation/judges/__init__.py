"""Judges: score (question, answer) pairs 0-100 for aligned / coherent (+ a question's other judge prompts).

One interface (`Judge`, `JudgeScore`); an offline fitted judge (default), an OpenAI-compatible endpoint judge
and a local transformers judge; validation against reference scores and error-aware EM estimators.
"""

from persona_probe.evaluation.judges.base import DEFAULT_JUDGE_PROMPTS, Judge, JudgeScore, read_qa_rows
from persona_probe.evaluation.judges.estimators import Estimate, JudgeErrorRates, ppi_mean, rogan_gladen
from persona_probe.evaluation.judges.hf_judge import HFJudge
from persona_probe.evaluation.judges.logprob import parse_score, weighted_score
from persona_probe.evaluation.judges.offline import OfflineJudge
from persona_probe.evaluation.judges.openai_judge import OpenAIJudge
from persona_probe.evaluation.judges.validation import (
    ColumnJudge,
    LabelAgreement,
    ValidationResult,
    validate,
    write_validation,
)

__all__ = [
    "DEFAULT_JUDGE_PROMPTS", "ColumnJudge", "Estimate", "HFJudge", "Judge", "JudgeErrorRates", "JudgeScore",
    "LabelAgreement", "OfflineJudge", "OpenAIJudge", "ValidationResult", "parse_score", "ppi_mean", "read_qa_rows",
    "rogan_gladen", "validate", "weighted_score", "write_validation",
]
