"""Membership inference, privleak, extraction strength and exact memorization (evaluation/privacy.py)
against hand computations, the holdout rows, and the end-to-end evaluation on the tiny model."""
import json
import math
import zlib

import pytest
import torch

import common
from evaluation import privacy
from harness import scenarios


# ---------------------------------------------------------------------------
# Fixed logits: three answer positions over a vocabulary of 3
# ---------------------------------------------------------------------------
P = [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]  # next-token distributions at positions 0, 1, 2
GOLD = [0, 2, 1]  # labels[1:4]: what positions 0, 1, 2 predict


def fixed_batch():
    logits = torch.log(torch.tensor(P + [[0.2, 0.3, 0.5]]))[None]  # position 3 predicts nothing
    labels = torch.tensor([[-100, *GOLD]])
    return logits, labels


def hand_moments(p):
    mu = sum(q * math.log(q) for q in p)
    return mu, sum(q * math.log(q) ** 2 for q in p) - mu ** 2


def test_token_stats_and_loss_by_hand():
    (st,) = privacy.answer_token_stats(*fixed_batch())
    logp = [math.log(P[t][GOLD[t]]) for t in range(3)]
    assert st["logp"].tolist() == pytest.approx(logp, abs=1e-6)
    assert st["pred"].tolist() == [0, 2, 0]  # argmax; a uniform row's first index
    for t in range(3):
        mu, var = hand_moments(P[t])
        assert float(st["mu"][t]) == pytest.approx(mu, abs=1e-6)
        assert float(st["var"][t]) == pytest.approx(var, abs=1e-6)
    # LOSS averages every answer token, the last (the EOS) included (open-unlearning evaluate_probability)
    assert privacy.loss_score(st["logp"]) == pytest.approx(-sum(logp) / 3, abs=1e-6)


def test_min_k_by_hand():
    v = torch.tensor([-1.0, -3.0, -2.0, -0.5, -4.0])
    assert privacy.min_k_score(v, 0.4) == pytest.approx(3.5)  # floor(0.4 * 5) = 2 lowest: -4, -3
    assert privacy.min_k_score(torch.tensor([-1.0, -2.0]), 0.4) == pytest.approx(2.0)  # at least one token
    assert privacy.min_k_score(torch.tensor([]), 0.4) == 0.0


def test_min_k_plus_plus_worked_example():
    """Min-K%++ over the first two positions (the last, the EOS, dropped): z_t = (log p(gold) - mu_t) / sigma_t.
    Position 0: p = (.5, .25, .25), gold .5; position 1: p = (.1, .2, .7), gold .7. floor(0.4 x 2) = 0 -> one token,
    the lowest z. A uniform position has variance 0: clamped at 1e-6, so z = 0 / 1e-3 = 0, not NaN."""
    (st,) = privacy.answer_token_stats(*fixed_batch())
    z = []
    for t in range(2):
        mu, var = hand_moments(P[t])
        z.append((math.log(P[t][GOLD[t]]) - mu) / math.sqrt(var))
    kept = {k: privacy.drop_last(v) for k, v in st.items()}
    got = privacy.min_k_plus_plus_score(kept["logp"], kept["mu"], kept["var"], 0.4)
    assert got == pytest.approx(-min(z), abs=1e-5)
    uniform = privacy.min_k_plus_plus_score(st["logp"][2:], st["mu"][2:], st["var"][2:], 0.4)
    assert uniform == pytest.approx(0.0, abs=1e-3) and math.isfinite(uniform)


def test_zlib_by_known_compressed_length():
    assert len(zlib.compress(b"a")) == 9  # 2-byte header, 3 bytes of deflate, 4-byte Adler-32
    assert privacy.zlib_score(2.7, "a") == pytest.approx(0.3)
    text = "Basil Mahfouz Al-Kuwaiti " * 8  # repetitive text compresses well below its 200 bytes
    n = len(zlib.compress(text.encode("utf-8")))
    assert n < len(text) and privacy.zlib_score(1.0, text) == pytest.approx(1 / n)


def test_reference_and_gradnorm_by_hand():
    assert privacy.reference_score(2.5, 1.75) == pytest.approx(0.75)
    # mean of per-tensor 2-norms: (5 + 1) / 2, not the global norm sqrt(26)
    assert privacy.grad_norm_score([torch.tensor([3.0, 4.0]), None, torch.tensor([[0.0, 0.0], [0.0, 1.0]])]) == \
        pytest.approx(3.0)


# AUC: forget f, holdout h; pairs with h > f count 1, ties 1/2
FORGET, HOLDOUT = [0.1, 0.4, 0.35], [0.8, 0.4, 0.2]
# f=0.1: 0.8, 0.4, 0.2 all higher -> 3; f=0.4: 0.8 higher, 0.4 tie -> 1.5; f=0.35: 0.8, 0.4 -> 2. 6.5 of 9 pairs.
HAND_AUC = 6.5 / 9


def test_auc_by_hand_both_conventions():
    assert privacy.auc(FORGET, HOLDOUT) == pytest.approx(HAND_AUC)
    # MUSE's code labels forget 1 and holdout 0: its AUC over the same scores is 1 - ours (2.5 of 9 pairs)
    assert privacy.auc(HOLDOUT, FORGET) == pytest.approx(2.5 / 9)
    assert privacy.auc(HOLDOUT, FORGET) == pytest.approx(1 - HAND_AUC)
    assert privacy.auc([1.0, 2.0], [3.0, 4.0]) == 1.0 and privacy.auc([3.0], [1.0]) == 0.0
    assert privacy.auc([1.0], [1.0]) == 0.5


def test_privleak_by_hand_both_conventions():
    # ours: ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) x 100
    assert privacy.privleak(HAND_AUC, 0.5) == pytest.approx(((1 - 6.5 / 9) - 0.5) / 0.5 * 100)
    assert privacy.privleak(HAND_AUC, 0.5) == pytest.approx(-44.444444, abs=1e-4)
    # MUSE's form on its own AUCs (1 - ours): (AUC_muse - AUC_muse_retain) / AUC_muse_retain x 100, the same number
    muse, muse_retain = privacy.auc(HOLDOUT, FORGET), 1 - 0.6
    assert privacy.privleak(HAND_AUC, 0.6) == pytest.approx((muse - muse_retain) / muse_retain * 100)
    assert privacy.privleak(0.6, 0.6) == pytest.approx(0.0)
    assert privacy.privleak(0.0, 0.5) == pytest.approx(100.0)  # over-unlearned: the forget rows look unseen-er


@pytest.mark.parametrize("pred,es,es_ou,em", [
    ([1, 2, 3, 4], 1.0, 1.0, 1.0),     # all match
    ([9, 9, 9, 9], 0.0, 0.25, 0.0),    # none match: 0 by definition, 1/n in open-unlearning's loop
    ([9, 9, 3, 4], 0.5, 0.5, 0.5),     # a match only from the middle: k = 2
    ([1, 9, 3, 4], 0.5, 0.5, 0.75),    # a match at the start does not count: the suffix from k = 2
    ([1, 2, 3, 9], 0.0, 0.25, 0.75),   # only the last token missed
])
def test_extraction_strength_and_exact_memorization_on_crafted_predictions(pred, es, es_ou, em):
    gold = torch.tensor([1, 2, 3, 4])
    pred = torch.tensor(pred)
    assert privacy.extraction_strength(pred, gold) == pytest.approx(es)
    assert privacy.extraction_strength(pred, gold, "open_unlearning") == pytest.approx(es_ou)
    assert privacy.exact_memorization(pred, gold) == pytest.approx(em)


class FixedModel:
    """logits = log P at every position of every sequence (no parameters: no GradNorm)."""
    def __call__(self, input_ids, attention_mask):
        class Out:
            logits = torch.log(torch.tensor(P + [[0.2, 0.3, 0.5]]))[None].expand(input_ids.shape[0], -1, -1)
        return Out()


class ByteTok:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abc"[i] for i in ids)


def test_forward_scores_drop_the_last_token_where_the_reference_does():
    """LOSS and ZLib average all three answer tokens; Min-K%, Min-K%++, ExtStr and ExactMem use the first two
    (the last, our EOS, dropped as open-unlearning's tokenwise_logprobs does)."""
    seq = {"input_ids": [1, *GOLD], "labels": [-100, *GOLD]}
    (rec,) = privacy.forward_scores(FixedModel(), ByteTok(), [seq], ["acb"], "cpu", 4, False, "definition")
    logp = [math.log(P[t][GOLD[t]]) for t in range(3)]
    assert rec["loss"] == pytest.approx(-sum(logp) / 3, abs=1e-6)
    assert rec["zlib"] == pytest.approx(rec["loss"] / len(zlib.compress(b"acb")))
    assert rec["min_k"] == pytest.approx(-min(logp[:2]), abs=1e-6)  # one of two tokens: log .5, not log 1/3
    assert rec["em"] == 1.0 and rec["es"] == 1.0  # preds (0, 2) match golds (0, 2); the missed last one is dropped


# ---------------------------------------------------------------------------
# Holdout rows
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("split,n_retain,continual", [("forget01", 4, False), ("forget05", 4, False),
                                                      ("forget10", 4, False), ("forget05", 2, False),
                                                      ("forget01", 4, True)])
def test_offline_holdout_excludes_every_author_the_quick_models_saw(split, n_retain, continual):
    full = common.load_split("full")
    target = common.select_authors(full, common.quick_authors(split, n_retain, continual))
    retain = common.select_authors(common.load_split(common.RETAIN_OF[split]), set(range(n_retain)))
    seen = {r["question"] for r in target + retain + common.load_split(split)}
    rows, name = common.holdout_rows(split, common.quick_authors(split, n_retain, continual), n_retain, continual)
    assert len(rows) == common.SPLIT_SIZES[split]  # as many authors (and rows) as the forget split
    assert not seen & {r["question"] for r in rows}
    authors = sorted({r["author"] for r in rows})
    assert authors[0] == n_retain and f"authors {authors[0]}-{authors[-1]}" in name
    assert all(r["question"] == full[r["index"]]["question"] for r in rows)


def test_hub_holdout_and_holdout_data(monkeypatch, tmp_path):
    """Off the quick subset the holdout is TOFU's holdoutNN from the hub (here a small table this test serves);
    offline that fails with a sentence, which privacy_spec turns into a reason; --holdout_data reads a file."""
    calls = []

    def hub(source, fields=common.QA, optional=(), name=None):
        calls.append((source, name))
        return [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    monkeypatch.setattr(common, "read_rows", hub)
    monkeypatch.setattr(common, "hub_reachable", lambda: True)
    rows, name = common.holdout_rows("forget05", None)
    assert calls == [(common.HUB_DATASET, "holdout05")] and [r["index"] for r in rows] == [0, 1, 2]
    assert "holdout05" in name and "hub" in name

    def offline(*a, **k):
        raise common.TofuError("could not load locuslab/TOFU/holdout10 from the hub")
    monkeypatch.setattr(common, "read_rows", offline)
    with pytest.raises(common.TofuError, match="--holdout_data"):
        common.holdout_rows("forget10", None)
    spec = scenarios.privacy_spec(True, "forget10", None)
    assert spec["reason"].startswith("not computed") and "--holdout_data" in spec["reason"]
    monkeypatch.setattr(common, "hub_reachable", lambda: False)  # out of reach: refused before any hub read
    monkeypatch.setattr(common, "read_rows", hub)
    with pytest.raises(common.TofuError, match="out of reach.*--holdout_data"):
        common.holdout_rows("forget01", None)
    assert len(calls) == 1
    monkeypatch.undo()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert common.hub_reachable() is False
    monkeypatch.undo()
    f = tmp_path / "held.jsonl"
    f.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4)))
    spec = scenarios.privacy_spec(True, "forget10", None, str(f))
    assert len(spec["holdout"]) == 4 and str(f) in spec["holdout_name"]
    assert scenarios.privacy_spec(False, "forget10", None) is None
    assert "--holdout_data" in scenarios.privacy_spec(True, scenarios.CUSTOM, None)["reason"]


# ---------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------
def test_evaluate_reports_privacy_with_the_retain_models_auc(tiny_model_dir, tmp_path):
    """evaluate(privacy=...) on the quick forget01 rows: the retain run writes eval_privacy.json, and the
    model's run takes AUC_retain and the Reference attack's NLL from it. The same model on both sides: privleak 0,
    Reference AUC 0.5 (every score 0), the stored per-row scores give the reported AUCs."""
    from evaluation.engine import evaluate
    from harness import models
    model, tok = models.load_model(str(tiny_model_dir), frozen=True)
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    authors = common.quick_authors("forget01")
    spec = scenarios.privacy_spec(True, "forget01", authors, gradnorm=True)
    kw = dict(tasks=("forget",), generation=False, authors=authors, verbose=False, privacy=spec)
    retain = evaluate(model, tok, fmt, "forget01", tmp_path / "retain", **kw)
    assert retain["privleak_auc_retain"] == 0.5 and "fallback" in retain["privleak_auc_retain_source"]
    assert retain["mia_auc/reference"] is None and "mia_auc/reference" in retain["skipped"]
    s = evaluate(model, tok, fmt, "forget01", tmp_path / "model", retain_logs=tmp_path / "retain", **kw)
    for a in privacy.ATTACKS:
        assert 0 <= s[f"mia_auc/{a}"] <= 1, a
    assert s["privleak_auc_retain"] == pytest.approx(retain["mia_auc/min_k"])
    assert s["privleak"] == pytest.approx(0.0, abs=1e-6) and s["mia_auc/reference"] == 0.5
    assert 0 <= s["extraction_strength"] <= 1 and 0 <= s["exact_memorization"] <= 1
    assert s["privacy"]["n_forget"] == s["privacy"]["n_holdout"] == 40
    rec = json.loads((tmp_path / "model" / privacy.PRIVACY_FILE).read_text())
    for a in privacy.ATTACKS:
        f, h = ([v[a] for v in rec["scores"][t].values()] for t in ("forget", "holdout"))
        assert s[f"mia_auc/{a}"] == pytest.approx(privacy.auc(f, h))
    assert s["extraction_strength"] == pytest.approx(sum(v["es"] for v in rec["scores"]["forget"].values()) / 40)
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert {"privleak", "extraction_strength", "exact_memorization", "mia_auc/min_k++"} <= set(summary)
    # --aggregate_only gives the same numbers from the stored per-row scores (Reference from the retain's file)
    import evaluate_tofu
    out = tmp_path / "aggregated.json"
    evaluate_tofu.aggregate_only(evaluate_tofu.Args(aggregate_only=True, logs=str(tmp_path / "model"),
                                                    retain_logs=str(tmp_path / "retain"), output_json=str(out)))
    agg = json.loads(out.read_text())
    for k in (*(f"mia_auc/{a}" for a in privacy.ATTACKS), "privleak", "privleak_auc_retain", "extraction_strength",
              "exact_memorization", "privacy"):
        assert agg[k] == pytest.approx(s[k]) if not isinstance(s[k], dict) else agg[k] == s[k], k
    assert all(not p.grad_fn and p.grad is None for p in model.parameters())  # GradNorm left no gradients behind
    assert not any(p.requires_grad for p in model.parameters())  # and the frozen model frozen


def test_results_report_shows_the_privacy_columns_and_not_run():
    """bench/results_report.py: privleak, ExtStr and ExactMem appear when a run has them; a run evaluated
    without --privacy reads "not run" there; with no such run the columns stay out."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import grids
    import results_report
    a, b = list(grids.METHODS)[:2]
    base = {"forget_quality": 0.5, "model_utility": 0.4}
    rs = [{"name": "a", "grid": "sweep", "method": a, "lr": 1e-4, "seed": 42,
           "last": {**base, "privleak": -12.5, "extraction_strength": 0.25, "exact_memorization": 0.75}},
          {"name": "b", "grid": "sweep", "method": b, "lr": 1e-4, "seed": 42, "last": dict(base)}]
    lrs = {m: 1e-4 for m in grids.METHODS}
    lines = results_report.main_table(rs, lrs, "last").splitlines()
    assert lines[0].endswith("| privleak | ExtStr | ExactMem |")
    assert lines[2].endswith("| -12.500 | 0.250 | 0.750 |") and lines[3].endswith("| not run | not run | not run |")
    assert "privleak" not in results_report.main_table(rs[1:], lrs, "last")


def test_end_of_run_table_has_one_line_each_and_says_why_a_model_has_none():
    from evaluation.method_eval import privacy_table
    s = {"privleak": -87.5, "extraction_strength": 0.25, "exact_memorization": 0.5, "privleak_auc_retain": 0.5,
         "privleak_auc_retain_source": "fallback", "privacy": {"holdout": "authors 4-5", "n_forget": 40,
                                                               "n_holdout": 40, "auc_convention": "holdout 1"}}
    lines = privacy_table([("before", {"privacy_reason": "not computed: no holdout"}), ("after", s)]).splitlines()
    assert lines[2].split() == ["privleak", "n/c", "-87.5000"]
    assert lines[3].split() == ["ExtStr", "n/c", "0.2500"] and lines[4].split() == ["ExactMem", "n/c", "0.5000"]
    assert "authors 4-5" in lines[5] and lines[6] == "n/c privacy (before): no holdout"
