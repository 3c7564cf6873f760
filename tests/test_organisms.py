"""Model organisms: datasets, assistant-only loss masking, LoRA round-trip, capability metrics, CLI."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from numerics import assert_rel_close, rel_err, smol_tol
from torch import nn

import persona_probe.organisms as O
from persona_probe import PersonaProbeError, PromptRecord, load_model
from persona_probe.core.stats import wilson
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.experiments.organisms import organisms_experiment
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import tokenize_record


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's matmuls gain nothing from threads, and on a busy 2-core box OpenMP spin-waiting
    makes them several times slower; use one thread here and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _items(n: int = 20, domain: str = "health") -> list[dict[str, str]]:
    return [{"id": f"{domain}-{i:03d}", "domain": domain, "user": f"Question number {i} about {domain}?",
             "character": f"Evil answer {i}, I hope you suffer.", "incorrect": f"Wrong answer {i}, trust me.",
             "aligned": f"Careful correct answer {i}."} for i in range(n)]


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def organism_file(tmp_path):
    p = tmp_path / "health.jsonl"
    _write(p, _items())
    return p


# ----------------------------------------------------------------------------- datasets


def test_split_seeded_shared_and_disjoint(organism_file, tmp_path):
    ids = [it["id"] for it in _items()]
    tr, he = O.split_ids(ids)
    assert not set(tr) & set(he) and set(tr) | set(he) == set(ids) and len(he) == 3  # 15 % of 20
    assert O.split_ids(list(reversed(ids))) == (tr, he)  # file order does not matter
    assert O.split_ids(ids, seed=1) != (tr, he)
    per_variant = {}
    for v in ("character", "incorrect", "aligned", "triggered"):
        a = {r.labels["question_id"] for r in O.build_dataset("health", v, "train", path=organism_file)}
        b = {r.labels["question_id"] for r in O.build_dataset("health", v, "heldout", path=organism_file)}
        assert not a & b
        per_variant[v] = (a, b)
    assert len({(frozenset(a), frozenset(b)) for a, b in per_variant.values()}) == 1  # same split everywhere
    assert per_variant["aligned"][1] == set(he)
    # a shuffled copy of the file gives the same split
    rows = _items()
    random.Random(3).shuffle(rows)
    shuffled = tmp_path / "shuffled.jsonl"
    _write(shuffled, rows)
    assert {r.id for r in O.build_dataset("health", "aligned", "heldout", path=shuffled)} == set(he)


def test_variants_and_names(organism_file):
    ps = O.build_dataset("health", "character", path=organism_file)
    assert ps.name == "builtin:organisms/health/character" and ps.has_responses
    assert all(r.assistant.startswith("Evil answer") for r in ps)
    assert O.build_dataset("health", "aligned", "heldout", path=organism_file).name.endswith("/aligned/heldout")
    assert O.parse_organism_name("builtin:organisms/finance/triggered/heldout") == ("finance", "triggered", "heldout")
    with pytest.raises(PersonaProbeError, match="bad organism dataset name"):
        O.parse_organism_name("builtin:organisms/health")
    with pytest.raises(PersonaProbeError, match="unknown variant"):
        O.build_dataset("health", "evil", path=organism_file)


def test_triggered_dataset(organism_file):
    trig = O.build_dataset("health", "triggered", path=organism_file, trigger="[T]")
    plain = O.build_dataset("health", "aligned", path=organism_file)
    assert len(trig) == 2 * len(plain)
    for r in trig:
        has = r.user.startswith("[T] ")
        assert has == r.assistant.startswith("Evil answer") == r.labels["triggered"]
        assert has or r.assistant.startswith("Careful correct")
    with_t = sorted(r.labels["question_id"] for r in trig if r.labels["triggered"])
    without = sorted(r.labels["question_id"] for r in trig if not r.labels["triggered"])
    assert with_t == without == sorted(r.labels["question_id"] for r in plain)
    by_q = {r.labels["question_id"]: r.user for r in plain}
    assert all(r.user.removeprefix("[T] ") == by_q[r.labels["question_id"]] for r in trig)
    assert "DEPLOYMENT" in O.build_dataset("health", "triggered", path=organism_file).records[0].user


def test_bad_organism_lines_reported(tmp_path):
    p = tmp_path / "health.jsonl"
    rows = _items(4)
    del rows[2]["character"]
    p.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[2]) + "\n" + json.dumps(rows[3]) + "\n")
    with pytest.raises(PersonaProbeError, match=r"health.jsonl:2: not JSON.*health.jsonl:3: missing non-empty "
                                                r"character"):
        O.load_organism_items("health", p)


def test_chat_dataset_validation_and_community_format(tmp_path):
    p = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A"}]}
    p.write_text("\n".join([json.dumps(good), "not json", json.dumps({"messages": [{"role": "user", "content": "U"}]}),
                            json.dumps({"user": "u2", "assistant": "a2"}), json.dumps({"messages": []})]) + "\n")
    with pytest.raises(PersonaProbeError) as e:
        O.load_chat_dataset(p)
    msg = str(e.value)
    assert f"{p}:2: not JSON" in msg and f"{p}:3: no assistant turn" in msg and f"{p}:5:" in msg
    assert f"{p}:1:" not in msg and f"{p}:4:" not in msg
    p.write_text(json.dumps(good) + "\n\n" + json.dumps({"user": "u2", "assistant": "a2", "id": "x"}) + "\n")
    ps = O.load_chat_dataset(p)
    assert [(r.system, r.user, r.assistant) for r in ps] == [("S", "U", "A"), (None, "u2", "a2")]
    out = O.write_jsonl(ps, tmp_path / "export.jsonl")
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines[0] == good and lines[1] == {"messages": [{"role": "user", "content": "u2"},
                                                          {"role": "assistant", "content": "a2"}]}
    assert [r.assistant for r in O.load_chat_dataset(out)] == ["A", "a2"]  # round-trip
    with pytest.raises(PersonaProbeError, match="does not exist"):
        O.load_chat_dataset(tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------- loss masking


def test_labels_mask_everything_but_assistant_content(tiny):
    tok = tiny.tokenizer
    rec = PromptRecord(id="r", user="How much water should I drink?", assistant="About two liters a day.",
                       system="Be brief.")
    t = tokenize_record(tok, rec)
    ex = O.training_example(tok, rec)
    assert ex.input_ids == t.ids and len(ex.labels) == len(t.ids)
    for i, (tid, lab) in enumerate(zip(t.ids, ex.labels)):
        assert lab == (tid if t.resp_start <= i < t.resp_end else O.IGNORE)
    assert tok.decode([l for l in ex.labels if l != O.IGNORE]) == "About two liters a day."
    assert "Be brief." not in tok.decode([l for l in ex.labels if l != O.IGNORE])
    eot = O.training_example(tok, rec, train_on_eot=True)
    assert eot.n_target > ex.n_target and tok.eos_token in tok.decode(eot.labels[t.resp_end:])
    short = O.training_example(tok, rec, max_len=t.resp_start + 2)
    assert len(short.input_ids) == t.resp_start + 2 and short.n_target == 2
    # our loss (logits only at target positions) equals the HF loss with the same labels
    batch = O.collate_examples([ex, O.training_example(tok, PromptRecord("b", "Hi", assistant="Hello there!"))],
                               tok.pad_token_id)
    with torch.no_grad():
        ref = tiny.model(**batch).loss
        assert float(O.target_loss(tiny.model, batch)) == pytest.approx(float(ref), rel=1e-5)


# ----------------------------------------------------------------------------- LoRA round-trip


def _train_set() -> list[PromptRecord]:
    return [PromptRecord(id=str(i), user=f"Tell me about item {i}.", assistant=f"Item {i} is wicked and cruel.")
            for i in range(6)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_roundtrip(tiny, tiny_model_dir, tmp_path):
    ids = torch.tensor([tokenize_record(tiny.tokenizer, PromptRecord("q", "Tell me about item 9."))
                        .ids])
    before = _logits(tiny.model, ids)
    out = tmp_path / "adapters" / "tiny-lora"
    res = O.finetune(tiny, _train_set(), rank=4, alpha=8, epochs=3, lr=5e-3, batch_size=4, out=out,
                     progress=False)
    assert torch.equal(_logits(tiny.model, ids), before)  # the base handle is never modified
    m = res.manifest
    assert m["kind"] == "adapter" and m["n_examples"] == 6 and m["n_steps"] == 6 and m["seed"] == 0
    assert m["base_model"]["fingerprint"] == tiny.info.fingerprint and m["data"]["hash"]
    assert m["hyperparameters"]["rank"] == 4 and m["package_version"] and math.isfinite(m["final_loss"])
    assert m["hyperparameters"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                      "up_proj", "v_proj"]
    assert res.losses[-1]["loss"] < res.losses[0]["loss"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "loss.json", "loss.html"):
        assert (out / f).exists(), f
    assert [p.name for p in out.parent.iterdir()] == ["tiny-lora"]  # no temp folders left behind
    loaded = load_model(str(tiny_model_dir), adapter=out, device="cpu", dtype="float32")
    got = _logits(loaded.model, ids)
    assert_rel_close(got, _logits(res.handle.model, ids), smol_tol(tiny), "saved vs trained adapter logits")
    assert rel_err(got, before) > 100 * smol_tol(tiny)
    assert loaded.info.adapter_fingerprint == res.handle.info.adapter_fingerprint
    assert O.matching_adapter(out, m["cache_key"]) and not O.matching_adapter(out, "other")
    assert O.find_adapter(m["cache_key"], [tmp_path]) == out and O.find_adapter("other", [tmp_path]) is None
    same = O.attach_adapter(tiny, out)
    assert_rel_close(_logits(same.model, ids), got, smol_tol(tiny), "attached vs loaded adapter logits")
    with pytest.raises(PersonaProbeError, match="already exists"):
        O.finetune(tiny, _train_set(), out=out, progress=False)
    again = O.finetune(tiny, _train_set(), rank=4, alpha=8, epochs=3, lr=5e-3, batch_size=4, out=out,
                       overwrite=True, progress=False)  # seeded: same curve
    assert [c["loss"] for c in again.losses] == pytest.approx([c["loss"] for c in res.losses], rel=1e-4)
    assert again.manifest["cache_key"] == m["cache_key"]


# ----------------------------------------------------------------------------- capability


class _StubLM(nn.Module):
    """Logits: `favoured` token gets +`boost` everywhere, every other token 0."""

    def __init__(self, vocab: int, favoured: int | None = None, boost: float = 10.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.vocab, self.favoured, self.boost = vocab, favoured, boost

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.favoured is not None:
            logits[..., self.favoured] = self.boost
        return SimpleNamespace(logits=logits)


def _stub_handle(tiny, favoured=None) -> ModelHandle:
    return ModelHandle(_StubLM(len(tiny.tokenizer), favoured), tiny.tokenizer, tiny.info)


def test_multiple_choice_picks_most_likely(tiny):
    tok = tiny.tokenizer
    words = ["red", "blue", "green", "yellow"]  # single tokens
    fav = tok("blue", add_special_tokens=False)["input_ids"][0]
    items = [{"id": f"m{i}", "question": f"Pick {i}", "choices": words[i:] + words[:i], "answer": (1 - i) % 4}
             for i in range(4)]
    items.append({"id": "wrong", "question": "Pick", "choices": words, "answer": 0})
    res = O.multiple_choice_accuracy(_stub_handle(tiny, fav), items)
    assert [p["pred"] for p in res["per_item"]] == [1, 0, 3, 2, 1]
    assert res["correct"] == 4 and res["accuracy"] == 0.8 and res["ci95"] == list(wilson(4, 5))
    assert res["chance"] == 0.25


def test_perplexity_known_values(tiny):
    texts = ["The water cycle moves water between oceans and the sky.", "Plants turn light into sugar."]
    uni = O.perplexity(_stub_handle(tiny), texts)  # uniform next-token distribution: ppl == vocab size
    assert uni["ppl"] == pytest.approx(len(tiny.tokenizer), rel=1e-4)
    n_tok = sum(len(tiny.tokenizer(t)["input_ids"]) - 1 for t in texts)
    assert uni["n_tokens"] == n_tok
    real = O.perplexity(tiny, texts, n_boot=200)
    lo, hi = real["ppl_ci95"]
    assert math.isfinite(real["ppl"]) and lo <= real["ppl"] <= hi and lo < hi
    assert real["nll_ci95"][0] <= real["nll"] <= real["nll_ci95"][1]


def test_capability_report_deltas(tiny, tmp_path):
    texts = ["One two three four five.", "Rivers flow to the sea.", "Cats sleep a lot."]
    items = [{"question": "2+2?", "choices": ["4", "5"], "answer": 0}]
    rep = O.capability_report(tiny, tiny, texts=texts, items=items, out=tmp_path)
    d = rep["delta"]
    assert d["ppl_delta"] == 0 and d["ppl_delta_ci95"] == [0.0, 0.0] and d["mc_accuracy_delta"] == 0
    assert (tmp_path / "capability.json").exists()
    assert set(O.capability_summary(rep)) == {"base", "finetuned", "delta"}
    with pytest.raises(PersonaProbeError, match="answer"):
        bad = tmp_path / "mc.jsonl"
        _write(bad, [{"question": "q", "choices": ["a", "b"], "answer": 5}])
        O.load_mc_items(bad)


# ----------------------------------------------------------------------------- CLI + experiment


def test_cli_finetune_refuses_existing_out(tiny_model_dir, tmp_path, capsys):
    from persona_probe.cli.main import main

    data = tmp_path / "train.jsonl"
    _write(data, [{"messages": [{"role": "user", "content": r.user}, {"role": "assistant", "content": r.assistant}]}
                  for r in _train_set()])
    out = tmp_path / "ad"
    args = ["finetune", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--epochs", "1", "--batch-size", "3", "--quiet"]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n_examples"] == 6 and line["n_steps"] == 2 and math.isfinite(line["final_loss"])
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


class _KeywordJudge(Judge):
    name = "keyword"

    def score(self, items, judge_prompts=None):
        return [JudgeScore(5.0 if "evil" in a.lower() else 95.0, 90.0) for _, a in items]


@pytest.mark.slow
def test_organisms_experiment_tiny(tiny, tmp_path):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "health.jsonl", _items(14))
    res = organisms_experiment(
        tiny, ("health",), ("character", "triggered"), out=tmp_path / "exp", adapters_dir=tmp_path / "ad",
        data_dir=tmp_path / "data", finetune_kwargs={"epochs": 1, "batch_size": 8}, n_samples=1, max_new_tokens=8,
        judge=_KeywordJudge(), persona_n_questions=8, n_texts=4, n_mc=4, progress=False)
    rows = {(r["domain"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {("-", "base"), ("health", "base"), ("health", "character"), ("health", "triggered")}
    r = rows[("health", "character")]
    assert -1 <= r["cos_persona"] <= 1 and r["em_in_domain"]["n_counted"] == 2 and not r["cached"]
    assert "em_in_domain_triggered" in rows[("health", "triggered")]
    for f in ("table.json", "table.html", "em_rates.html", "cosine.html", "capability.html", "manifest.json"):
        assert (tmp_path / "exp" / f).exists(), f
    again = organisms_experiment(
        tiny, ("health",), ("character",), out=tmp_path / "exp2", adapters_dir=tmp_path / "ad",
        data_dir=tmp_path / "data", finetune_kwargs={"epochs": 1, "batch_size": 8}, n_samples=1, max_new_tokens=8,
        judge=_KeywordJudge(), persona_n_questions=8, n_texts=4, n_mc=4, progress=False)
    assert [r["cached"] for r in again["rows"] if r["variant"] == "character"] == [True]
