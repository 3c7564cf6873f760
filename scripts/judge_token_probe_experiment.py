"""Developer experiment (not part of the package): does reading the answer token by token beat the mean?

The `offline-residual` judge pools SmolLM2's layer-16 residual over the first 128 answer tokens, then applies
logistic heads. Here the same heads (fitted on the mean residual of persona_probe's labelled answers only) are
also applied to every answer token and the per-token logits aggregated (mean, top-k mean, max), over 128 or
256 tokens. Measured on ../shared/reference/judged_answers.jsonl (never fitted on): all / dev (Cloakless, the
model-selection split) / held (the other three repositories). Token residuals cached in /tmp (~1 GB);
~8 min on 2 CPU cores. Also a non-linear (MLP) head on the same mean residual.

    python scripts/judge_token_probe_experiment.py
"""
from pathlib import Path

import numpy as np
import torch
from reference_split import em_split, reference_rows
from reference_split import report as split_report
from sklearn.linear_model import LogisticRegression

from persona_probe import load_model
from persona_probe.activations.tokens import layer_token_activations
from persona_probe.evaluation.judges import offline as O
from persona_probe.prompts.base import PromptRecord
from persona_probe.prompts.records import tokenize_record

LAYER, MAX_TOKENS = 16, 256
h = load_model("smollm2", device="cpu", dtype="float32")
tok = h.tokenizer


def token_feats(items, name):
    """Per answer, its answer-token residuals [t_i, d] at LAYER (first MAX_TOKENS answer tokens)."""
    f = Path(f"/tmp/tokfeat_{name}.pt")
    if f.exists():
        return torch.load(f)
    recs = [PromptRecord(str(i), q[:2000], assistant=tok.decode(tok(a, add_special_tokens=False)["input_ids"]
                                                                   [:MAX_TOKENS])) for i, (q, a) in enumerate(items)]
    plen = torch.tensor([tokenize_record(tok, r).prompt_len for r in recs])
    acts = layer_token_activations(h, recs, LAYER, batch_size=16, dedupe=False, progress=True)
    answer = acts.position >= plen[acts.record]
    out = [acts.acts[(acts.record == i) & answer].half() for i in range(len(items))]
    torch.save(out, f)
    return out


rows = O.packaged_label_rows()
L = O.rows_to_labels(rows)
ref = reference_rows()
tr = token_feats(L.items, f"train{len(L.items)}")
te = token_feats([(r["question"], r["answer"]) for r in ref], "ref")


def mean_rows(seqs, n):
    return np.stack([s[:n].float().mean(0).numpy() if len(s) else np.zeros(h.d_model, np.float32) for s in seqs])


y_ref, scored, dev = em_split(ref)
ymis = np.array([np.nan if v is None else v for v in L.misaligned])
ycoh = np.array([np.nan if v is None else v for v in L.coherent])
Xtr = mean_rows(tr, 128)
mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6


def fit(y, C=0.001):
    ok = ~np.isnan(y)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=3000).fit((Xtr[ok] - mu) / sd, y[ok])
    return clf.coef_[0] / sd, clf.intercept_[0] - (clf.coef_[0] * mu / sd).sum()


def report(name, pred):
    split_report(name, pred, y_ref, scored, dev, width=36)


(wm, bm), (wc, bc) = fit(ymis), fit(ycoh)


def agg(seqs, w, b, how, n):
    out = []
    for s in seqs:
        z = s[:n].float().numpy() @ w + b if len(s) else np.array([b])
        if how == "mean-resid":
            out.append(s[:n].float().mean(0).numpy() @ w + b if len(s) else b)
        elif how == "mean-logit":
            out.append(z.mean())
        elif how.startswith("top"):
            k = int(how[3:])
            out.append(np.sort(z)[-k:].mean())
        elif how == "max":
            out.append(z.max())
    return np.array(out)


coh_base = agg(te, wc, bc, "mean-resid", 128) > 0
for n in (128, 256):
    for how in ("mean-resid", "mean-logit", "top8", "top16", "top32"):
        zm = agg(te, wm, bm, how, n)
        # the per-token aggregates shift the logit scale: report at the balanced cut (0) and at the cut that flags
        # as many answers as the mean does (a scale-free comparison)
        base_rate = (agg(te, wm, bm, "mean-resid", 128) > 0).mean()
        cut = np.quantile(zm, 1 - base_rate)
        report(f"{how} n={n} cut 0", (zm > 0) & coh_base)
        report(f"{how} n={n} same-rate cut", (zm > cut) & coh_base)
    report(f"coherent mean n={n}", (agg(te, wm, bm, "mean-resid", 128) > 0) & (agg(te, wc, bc, "mean-resid", n) > 0))

# a non-linear head on the same mean residual (does the linear head limit the judge?): an MLP, 3 seeds averaged
from sklearn.neural_network import MLPClassifier  # noqa: E402

ok = ~np.isnan(ymis)
Xte = mean_rows(te, 128)
p_mlp = np.mean([MLPClassifier(hidden_layer_sizes=(128,), alpha=10.0, max_iter=300, early_stopping=True,
                               random_state=seed).fit(((Xtr - mu) / sd)[ok], ymis[ok])
                 .predict_proba((Xte - mu) / sd)[:, 1] for seed in range(3)], axis=0)
report("MLP head (128 hidden), n=128", (p_mlp > 0.5) & coh_base)
