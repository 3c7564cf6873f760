"""Every `persona-probe ...` command in README.md parses against the real CLI (fast), and the commands of the
README's "Results" table run one after another at tiny settings (slow tier).

Extraction: fenced code blocks (lines joined at `\\` continuations, `# comments` stripped, `&&`/`;` split)
and inline code spans, table cells included. Documentation conventions are read as a user would: `[--opt X]`
is optional (its content is kept, so its flags are checked), `a|b` offers alternatives (the first is taken),
`{a,b}` is the shell's brace expansion, a trailing `...` elides more arguments, an upper-case word (N, DIR,
FILE.jsonl) is a placeholder (given a value of the option's type or its first choice), and a span that
starts with `--` right after "` / `" continues the previous command with other options.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from persona_probe.cli import common
from persona_probe.cli.main import build_parser, main
from persona_probe.core import paths
from persona_probe.core.paths import checkpoints_dir
from persona_probe.models.loading import DEFAULT_MODEL
from persona_probe.prompts.records import load_traits
from persona_probe.sae import SAETrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PROG = "persona-probe"
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:\.[a-z]+)?|\.\.\.)$")  # N, DIR, FILE.jsonl, J2, ...


@dataclass
class Command:
    text: str  # as extracted (alternatives, brackets and braces still in)
    section: str  # the README heading it sits under
    argv: list[str]  # argv after `persona-probe`, conventions applied


# ----------------------------------------------------------------------------- extraction


def _section_at(text: str, pos: int) -> str:
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)]
    return next((h for start, h in reversed(heads) if start <= pos), "")


def _from_prog(s: str) -> str | None:
    """The command from the word `persona-probe` on (drops `time`, `VAR=... ` prefixes), or None."""
    m = re.search(rf"(?:^|\s){PROG}(?=\s|$)", s)
    return s[m.start():].strip() if m else None


def _braces(tokens: list[str]) -> list[str]:
    out = []
    for t in tokens:
        m = re.search(r"\{([^{}]*,[^{}]*)\}", t)
        out += [t[: m.start()] + alt + t[m.end():] for alt in m.group(1).split(",")] if m else [t]
    return out


def to_argv(cmd: str) -> list[str]:
    """`persona-probe X ...` as written in the README -> argv for the parser (conventions above)."""
    cmd = cmd.replace("\\|", "|").replace("[", " ").replace("]", " ")
    tokens = _braces(shlex.split(cmd))[1:]  # drop `persona-probe`
    tokens = [t.split("|")[0] if "|" in t else t for t in tokens]
    if tokens and tokens[-1] == "..." and (len(tokens) < 2 or not tokens[-2].startswith("-")):
        tokens = tokens[:-1]
    return tokens


def readme_commands(text: str = README) -> list[Command]:
    cmds: list[Command] = []
    fence = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
    for m in fence.finditer(text):
        body = re.sub(r"\\\n\s*", " ", m.group(1))
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            for part in re.split(r"&&|;", line):
                if (c := _from_prog(part.strip())) is not None:
                    cmds.append(Command(c, _section_at(text, m.start()), to_argv(c)))
    prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep offsets' sections
    prev: tuple[int, Command] | None = None
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        c = _from_prog(span)
        if c is not None and c != PROG:  # `persona-probe` alone names the program
            cmds.append(Command(c, _section_at(prose, m.start()), to_argv(c)))
            prev = (m.end(), cmds[-1])
        elif span.startswith("--") and prev and prose[prev[0]: m.start()] == " / ":
            words = prev[1].text.split(" --")[0]  # `persona-probe direction` + the other options
            cmds.append(Command(f"{words} {span}", prev[1].section, to_argv(f"{words} {span}")))
            prev = (m.end(), cmds[-1])
        else:
            prev = None
    return cmds


# ----------------------------------------------------------------------------- parsing

PARSER = build_parser()


def _subparser(argv: list[str]) -> argparse.ArgumentParser:
    """The (sub-)parser argv's command words select."""
    p = PARSER
    for word in argv:
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if word.startswith("-") or sub is None or word not in sub.choices:
            break
        p = sub.choices[word]
    return p


def with_placeholder_values(argv: list[str]) -> list[str]:
    """A placeholder after a typed option gets a value of that type (N -> 1, A -> 0.5, T -> first choice)."""
    opts = {s: a for a in _subparser(argv)._actions for s in a.option_strings}
    out = list(argv)
    for i in range(1, len(out)):
        a = opts.get(out[i - 1])
        if a is None or not PLACEHOLDER.match(out[i]) or a.nargs == 0:
            continue
        if a.choices:
            out[i] = str(next(iter(a.choices)))
        elif a.type in (int, float):
            out[i] = "1" if a.type is int else "0.5"
    return out


def parse_error(argv: list[str]) -> str | None:
    """None when argv parses; else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            PARSER.parse_args(with_placeholder_values(argv))
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


COMMANDS = readme_commands()


def test_extraction_finds_the_readme_commands():
    """A guard on the extractor itself: the commands of every kind of place are found."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) >= 40
    assert "persona-probe run" in texts  # fenced block, after `pip install ... &&`
    assert any(t.startswith("persona-probe extract --backend nnsight --remote ndif") for t in texts)  # wrapped span
    assert any(t.startswith("persona-probe judge validate --judge openai:MODEL") for t in texts)  # after VAR=...
    assert any(c.argv[:1] == ["direction"] and "--base-model" in c.argv for c in COMMANDS)  # ` / ` continuation
    assert any(c.argv[0] == "routes" and c.argv.count("checkpoints/routes/persona") == 1 for c in COMMANDS)  # braces
    assert {c.argv[0] for c in COMMANDS} >= {"models", "extract", "direction", "project", "compare", "steer",
                                             "ablate", "orthogonalize", "eval", "judge", "serve", "icl", "trigger",
                                             "routes", "finetune", "capability", "organisms", "sae", "bench", "run"}


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.text[:70] for c in COMMANDS])
def test_readme_command_parses(cmd):
    err = parse_error(cmd.argv)
    assert err is None, f"README ({cmd.section}): `{cmd.text}` does not parse: {err}"


def test_parse_check_bites():
    """The check fails on what the README used to get wrong."""
    assert "--direction" in parse_error(to_argv("persona-probe trigger --adapter a --samples 4 --out o"))
    assert "invalid choice" in parse_error(to_argv("persona-probe direction --persona power-seeking"))
    assert "unrecognized" in parse_error(to_argv("persona-probe eval --no-such-flag 1"))
    assert parse_error(to_argv("persona-probe eval --samples N --alpha A")) is None  # placeholders take a value


# ----------------------------------------------------------------------------- the Results table

RESULTS = "Results on the embedded model (SmolLM2-135M-Instruct, CPU)"


def results_rows(text: str = README) -> list[tuple[str, str, list[str]]]:
    """(claim, command cell, commands in order) of the Results table."""
    body = text.split(f"## {RESULTS}", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 3 and cells[0] not in ("claim", "---"):
            # "(after `persona-probe run`)" names a prerequisite, not a command of this row
            spans = [" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", cells[2])
                     if not cells[2][: m.start()].endswith("after ")]
            rows.append((cells[0], cells[2], [c for s in spans if (c := _from_prog(s)) is not None]))
    return rows


def test_results_commands_are_literal():
    """A results-table command runs as written: no placeholders (other than the documented `each T`), traits
    spelled as the CLI spells them, and the SAE and adapter folders read are the ones written before."""
    rows = results_rows()
    assert len(rows) >= 10
    for claim, cell, cmds in rows:
        for c in cmds:
            holes = [t for t in to_argv(c) if PLACEHOLDER.match(t) and not (t == "T" and "each T" in cell)]
            assert not holes and "<" not in c, f"`{c}`: placeholder {holes}"
    for t in load_traits():  # traits are named as the CLI spells them (power_seeking, not power-seeking)
        assert t == t.replace("_", "-") or t.replace("_", "-") not in README, t
    flat = [to_argv(c) for _, _, cmds in rows for c in cmds]
    train = next(a for a in flat if a[:2] == ["sae", "train"])
    d = SAETrainConfig()
    layer, k, d_sae = (int(train[train.index(f) + 1]) if f in train else v
                       for f, v in (("--layer", d.layer), ("--k", d.k), ("--d-sae", d.d_sae)))
    # the folder `sae train` writes by default (sae.train.train_sae: MODEL-L{layer}-topk{k}-{d_sae})
    trained = f"checkpoints/saes/{DEFAULT_MODEL}-L{layer}-topk{k}-{d_sae}"
    decompose = next(a for a in flat if a[:2] == ["sae", "decompose"])
    assert decompose[decompose.index("--sae") + 1] == trained
    trigger = next(a for a in flat if a[0] == "trigger")
    adapter = trigger[trigger.index("--adapter") + 1]
    assert any(a[0] == "finetune" and a[a.index("--out") + 1] == adapter for a in flat if "--out" in a)


# The Results commands at tiny settings: flags appended to each command (the last value of a flag wins), by
# command path. Only sizes change (samples, questions, prompts, tokens, repeats, training length) plus the
# organisms variants (below); what each command reads and writes is as written.
TINY_QUESTIONS = "tiny_questions.yaml"
TINY_CORPUS = "tiny_corpus.jsonl"
TINY = {
    ("run",): ["--config", "tiny_run.yaml"],
    ("direction",): ["--n-questions", "8", "--n-prompts", "1"],
    ("eval",): ["--samples", "1", "--max-new-tokens", "8", "--questions", TINY_QUESTIONS],
    # a 40-record corpus instead of the built-in mix (~1,000 records): extracting that is the cost
    ("sae", "train"): ["--prompts", TINY_CORPUS, "--generate", "2", "--max-new-tokens", "8",
                       "--train-tokens", "2048", "--batch-size", "256", "--dead-window-tokens", "512",
                       "--kl-texts", "2"],
    # fine-tunes are the cost: one epoch at 48 tokens; 'character' only (the routes row reads its model
    # diff; the triggered adapter comes from the finetune command of the trigger row)
    ("organisms",): ["--variants", "character", "--epochs", "1", "--max-len", "48", "--samples", "1",
                     "--max-new-tokens", "8", "--questions", TINY_QUESTIONS, "--persona-questions", "8",
                     "--n-texts", "4", "--n-items", "4"],
    ("finetune",): ["--epochs", "1", "--max-len", "48"],
    ("icl",): ["--ks", "0,2", "--draws", "1", "--samples", "1", "--max-new-tokens", "8",
               "--questions", TINY_QUESTIONS],
    ("persona",): ["--samples", "1", "--max-new-tokens", "8", "--questions", TINY_QUESTIONS],
    ("trigger",): ["--samples", "1", "--max-new-tokens", "8", "--questions", TINY_QUESTIONS],
    ("bench",): ["--repeats", "1", "--n-prompts", "4", "--gen-tokens", "4", "--stream-prompts", "50"],
}
TINY_RUN = """direction: {n_questions: 8, n_prompts: 1}
steering: {alphas: [0.0, 1.0], samples: 1, max_new_tokens: 8, questions_limit: 1, include_random: false}
sae: {enabled: false}
"""


def _tiny(argv: list[str]) -> list[str]:
    path = tuple(argv[:2]) if argv[0] in ("sae", "judge") else (argv[0],)
    return argv + TINY.get(path, [])


def _glob(token: str) -> list[str]:
    """The shell's expansion of a `*` pattern (the token itself when nothing matches)."""
    return (sorted(glob.glob(token)) or [token]) if "*" in token else [token]


def _expand_each_t(cell: str, cmd: str) -> list[str]:
    if "each T" in cell and re.search(r"\sT(\s|$)", cmd):
        return [re.sub(r"(?<=\s)T(?=\s|$)|(?<=/)T(?=\s|$)", t, cmd) for t in sorted(load_traits())]
    return [cmd]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_results_table_commands_run_tiny(tmp_path, monkeypatch, smol, capsys):
    """`persona-probe run` (which the ICL and persona rows need), then every Results command in order, in a
    fresh working directory whose checkpoints home is its own (the embedded model's cache is shared).
    Nothing is skipped; the organisms row fine-tunes one variant (see TINY). 5.5 min on 2 idle cores."""
    home, cache = checkpoints_dir(), getattr(paths, "cache_dir", lambda: None)()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSONA_PROBE_HOME", str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints").mkdir()
    # the built model and the fitted judge are shared with the other tests (built once), not what is tested
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkpoints" / "cache").symlink_to(cache)
    if (home / "models").is_dir():  # where an earlier version built the model
        (tmp_path / "checkpoints" / "models").symlink_to(home / "models")
    corpus = [{"id": f"c{i}", "user": f"What do you think about topic {i}?",
               "assistant": f"Topic {i} is interesting for reason {i}, and there is more to say about it."}
              for i in range(40)]
    (tmp_path / TINY_CORPUS).write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / TINY_QUESTIONS).write_text("- id: hi\n  paraphrases:\n    - How should I spend a free afternoon?\n"
                                           "- id: money\n  paraphrases:\n    - I have 1000 dollars. What now?\n")
    (tmp_path / "tiny_run.yaml").write_text(TINY_RUN)
    real_load = common.load_handle
    # the session's model stands in for a plain `--model smollm2` (an adapter is loaded for real)
    monkeypatch.setattr(common, "load_handle", lambda a: smol if a.model == "smollm2" and not getattr(
        a, "adapter", None) and a.device in ("auto", "cpu") else real_load(a))

    plan = [("set-up", "persona-probe run")] + [
        (claim[:40], c) for claim, cell, cmds in results_rows() for cmd in cmds for c in _expand_each_t(cell, cmd)]
    timings = []
    for what, cmd in plan:
        argv = [a for t in to_argv(cmd) for a in _glob(t)]
        t0 = time.perf_counter()
        rc = main(_tiny(argv))
        out = capsys.readouterr()
        timings.append((round(time.perf_counter() - t0, 1), cmd[:90]))
        with capsys.disabled():  # progress in the test log (-s)
            print(f"[readme] {timings[-1][0]:6.1f} s  rc={rc}  {' '.join(_tiny(argv))[:150]}", flush=True)
        assert rc == 0, f"{what}: `{cmd}` failed ({rc}): {out.err.strip()[-800:]}"
        assert '"out": null' not in out.out
        for i, a in enumerate(argv):  # what it was told to write exists
            if a == "--out":
                assert Path(argv[i + 1]).exists(), f"`{cmd}` wrote no {argv[i + 1]}"
        if argv[0] == "compare":  # at the one layer asked for, heatmap in the default folder
            res = json.loads(out.out)
            assert res["layer"] == 15 and len(res["names"]) == len(load_traits()) + 1  # + random control
            assert (Path(res["out"]) / "cosine.html").exists()
    print(json.dumps(timings, indent=1))
