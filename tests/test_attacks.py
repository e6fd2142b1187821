"""evaluation/attacks.py: the relearning attack's question split, its direction (relearning one part raises the
forget probability of the other), the yardstick under the same attack, a quantized copy that loads and
evaluates, the wiring into evaluate_tofu.py and a method script, and the one-sentence refusals."""
import json
import math
import random

import pytest
import torch

import baselines
import common
import evaluate_tofu
from evaluation import attacks, engine
from harness import models

EVAL = dict(max_new_tokens=2, nli_model="none", cs_model="none", batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def forget01():
    return common.load_split("forget01")


def probs(model, tok, fmt, rows):
    """Mean over rows of p(answer | question)^(1/len): the forget Prob of evaluate()."""
    seqs = [common.encode_qa(tok, fmt, r["question"], r["answer"]) for r in rows]
    s = engine.score(model, seqs, tok.pad_token_id, tok.eos_token_id, 64, "cpu", False)
    return sum(math.exp(x["logp"] / x["count"]) for x in s) / len(s)


def test_question_split_is_fixed_disjoint_and_seeded(forget01):
    learn, held = attacks.split_questions(forget01, 0.5, 42)
    q_learn, q_held = {r["question"] for r in learn}, {r["question"] for r in held}
    assert not q_learn & q_held and len(learn) + len(held) == len(forget01) == 40 and len(learn) == 20
    shuffled = random.Random(0).sample(forget01, len(forget01))          # row order does not move the split
    assert {r["question"] for r in attacks.split_questions(shuffled, 0.5, 42)[0]} == q_learn
    assert attacks.split_questions(forget01, 0.5, 42) == (learn, held)   # the same call, the same split
    assert {r["question"] for r in attacks.split_questions(forget01, 0.5, 43)[0]} != q_learn  # the seed moves it
    assert len(attacks.split_questions(forget01, 0.25, 42)[0]) == 10
    assert len(attacks.split_questions(forget01[:3], 0.01, 42)[0]) == 1   # each part keeps one question at least
    assert len(attacks.split_questions(forget01[:3], 0.99, 42)[1]) == 1


def test_relearning_raises_the_held_out_forget_probability(tiny_model_dir, forget01):
    model, tok = models.load_model(str(tiny_model_dir), dtype=torch.float32)
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    learn, held = attacks.split_questions(forget01, 0.5, 42)
    before = probs(model, tok, fmt, learn), probs(model, tok, fmt, held)
    losses = attacks.relearn(model, tok, fmt, learn, steps=6, lr=3e-3, batch_size=4, seed=0)
    after = probs(model, tok, fmt, learn), probs(model, tok, fmt, held)
    assert after[1] > before[1] * 1.05                       # the held-out part comes back too (the attack)
    assert after[0] - before[0] > after[1] - before[1]       # and the relearned part more: it trained on that one
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def _plan(tiny_model_dir, out, eval_kw=None, **kw):
    tok = models.load_tokenizer(str(tiny_model_dir))
    return attacks.Attacks(tok, models.prompt_format(tok, str(tiny_model_dir)), "forget01", {**EVAL, **(eval_kw or {})},
                           out, None, "quick", 42, **kw)


def test_relearn_attack_records_its_split_and_attacks_the_retain_model_alike(tiny_model_dir, tmp_path, forget01,
                                                                             capsys):
    kw = dict(relearn_attack=True, relearn_steps=4, relearn_lr=3e-3)
    res = _plan(tiny_model_dir, tmp_path / "a", **kw).run(str(tiny_model_dir), None, str(tiny_model_dir))
    learn, held = attacks.split_questions(forget01, 0.5, 42)
    assert res["relearn_attack/relearn_rows"] == [r["index"] for r in learn]
    assert res["relearn_attack/eval_rows"] == [r["index"] for r in held]
    assert res["relearn_attack/recipe"]["steps"] == 4 and res["relearn_attack/recipe"]["seed"] == 42
    p = "relearn_attack/{}/forget_prob"
    assert res["relearn_attack/attacked/n_forget"] == len(held) == 20
    assert res[p.format("attacked")] > res[p.format("unlearned")] * 1.05
    # the retain model (here the same folder) under the same split, recipe and seed: the same numbers, FQ 1
    assert res[p.format("retain")] == pytest.approx(res[p.format("attacked")], rel=1e-5)
    assert res["relearn_attack/attacked/forget_quality"] == pytest.approx(1.0)
    log = json.loads((tmp_path / "a" / "relearn_attack" / "attacked" / "summary.json").read_text())
    assert log["n_forget"] == 20 and log["settings"]["split"] == "custom"
    again = _plan(tiny_model_dir, tmp_path / "b", **kw).run(str(tiny_model_dir), None, str(tiny_model_dir))
    assert "reusing" in capsys.readouterr().out                               # the yardstick is cached
    assert again[p.format("retain")] == res[p.format("retain")]
    line = attacks.table(res).splitlines()[3]
    assert line.startswith("relearn (20 rows learned, 20 held out)")


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model at hidden size 64: bitsandbytes quantizes in blocks of 64 weights, which the fixture's
    hidden size of 32 cannot fill."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 64, 128, 16  # CPU 4-bit packs 32 output rows
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    models.load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def test_quantized_copy_loads_and_evaluates(wide_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="optional (requirements.txt): --quantize_attack needs it; .ci/run installs it")
    tiny_model_dir = wide_model_dir

    q4 = attacks.load_quantized(str(tiny_model_dir), "4bit", "cpu")
    assert {type(m).__name__ for m in q4.modules()} >= {"Linear4bit"}
    res = _plan(tiny_model_dir, tmp_path, {"max_eval_samples": 8}, quantize_attack="4bit,8bit").run(
        str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir))
    for bits in ("4bit", "8bit"):
        p = f"quantize_attack/{bits}/"
        assert res[p + "attacked/n_forget"] == 8 and 0 < res[p + "attacked/forget_prob"] < 1
        assert res[p + "target/forget_prob"] == pytest.approx(res[p + "attacked/forget_prob"], rel=1e-5)
        assert res[p + "attacked/forget_quality"] == pytest.approx(1.0)   # against the retain model quantized alike
    model, tok = models.load_model(str(tiny_model_dir), frozen=True)      # quantization moved the numbers
    fp32 = probs(model, tok, models.prompt_format(tok, str(tiny_model_dir)), common.load_split("forget01")[:8])
    assert abs(res["quantize_attack/4bit/attacked/forget_prob"] / fp32 - 1) > 1e-4
    assert res["quantize_attack/library"].startswith("bitsandbytes ")


def test_bad_input_is_one_sentence(tiny_model_dir, tmp_path, forget01, monkeypatch):
    with pytest.raises(common.TofuError, match=r"^unknown --quantize_attack bit width '3bit'; valid: 4bit, 8bit"):
        attacks.parse_bits("4bit,3bit")
    assert attacks.parse_bits(" 8bit, 4bit,8bit") == ["8bit", "4bit"] and attacks.parse_bits("") == []
    with pytest.raises(common.TofuError, match="the forget set has 1 distinct question.*needs at least 2"):
        attacks.split_questions(forget01[:1], 0.5, 42)
    with pytest.raises(common.TofuError, match="--relearn_fraction must be between 0 and 1"):
        attacks.relearn_recipe("quick", fraction=1.0)
    with pytest.raises(common.TofuError, match="--relearn_lr must be positive"):
        attacks.relearn_recipe("quick", lr=0.0)
    monkeypatch.setattr(attacks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(common.TofuError, match="needs the bitsandbytes package, which is not installed: pip install"):
        attacks.quantization_library()
    monkeypatch.undo()
    # through the command line, before any model loads
    monkeypatch.setattr("sys.argv", ["evaluate_tofu.py", "--model", str(tiny_model_dir), "--output_dir",
                                     str(tmp_path / "x"), "--quantize_attack", "4bit,2bit"])
    with pytest.raises(common.TofuError, match="unknown --quantize_attack bit width '2bit'"):
        evaluate_tofu.main()
    monkeypatch.setattr("sys.argv", ["baselines.py", "--method", "ga", "--model", str(tiny_model_dir), "--split",
                                     "forget01", "--relearn_attack", "true", "--relearn_fraction", "0",
                                     "--output_dir", str(tmp_path / "y")])
    with pytest.raises(common.TofuError, match="--relearn_fraction must be between 0 and 1"):
        baselines.main()
    assert not (tmp_path / "y" / "model").exists()


def test_method_script_runs_the_attacks_after_unlearning(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["baselines.py", "--method", "ga", "--model", str(tiny_model_dir), "--split",
                                     "forget01", "--subset", "quick", "--max_steps", "1", "--batch_size", "2",
                                     "--per_device_batch_size", "2", "--max_eval_samples", "2", "--max_new_tokens",
                                     "2", "--nli_model", "none", "--cs_model", "none", "--eval_before", "false",
                                     "--retain_model", str(tiny_model_dir), "--relearn_attack", "true",
                                     "--relearn_steps", "1", "--output_dir", str(tmp_path / "run")])
    baselines.main()
    s = json.loads((tmp_path / "run" / "eval" / "after" / "summary.json").read_text())
    assert s["relearn_attack/attacked/n_forget"] == 20 and "relearn_attack/retain/forget_prob" in s
    assert (tmp_path / "run" / "eval" / "relearn_attack" / "attacked" / "eval_log_forget.json").exists()
    assert "relearn (20 rows learned, 20 held out)" in capsys.readouterr().out
