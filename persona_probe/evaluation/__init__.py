"""Evaluation layer: sample answers, judge them, and report EM rates with intervals.

`criteria` (EM criterion, summaries, judge-error correction), `judging` (judge specs, checkpointed judging),
`evaluate` (sample + judge, or judge a file), `serve` (a local OpenAI-compatible server), `judges/`.
Note: `persona_probe.evaluation.evaluate` here is the function; import the module by its full dotted path.
"""

from persona_probe.evaluation.criteria import (
    Criterion,
    Thresholds,
    add_corrected,
    em_flags,
    is_truncated,
    judge_error_rates,
    summarize,
    unparsed_warning,
    warn_if_unparsed,
)
from persona_probe.evaluation.evaluate import EvalResult, evaluate, judge_file, question_prompt_records, write_eval
from persona_probe.evaluation.judging import PARTIAL, check_judge_spec, judge_rows, make_judge, read_answers
from persona_probe.evaluation.serve import serve, start_server

__all__ = [
    "PARTIAL",
    "Criterion",
    "EvalResult",
    "Thresholds",
    "add_corrected",
    "check_judge_spec",
    "em_flags",
    "evaluate",
    "is_truncated",
    "judge_error_rates",
    "judge_file",
    "judge_rows",
    "make_judge",
    "question_prompt_records",
    "read_answers",
    "serve",
    "start_server",
    "summarize",
    "unparsed_warning",
    "warn_if_unparsed",
    "write_eval",
]
