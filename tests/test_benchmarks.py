"""General-capability benchmarks through lm-eval (evaluate_general.py) on a tiny local task that the
test writes (a task YAML and five JSON-lines rows), its accuracy checked against a hand count; a task
that cannot be fetched is reported and the others go on; the method scripts' before/after scores."""
import json

import pytest
import torch

import common
from harness import models
import evaluate_general as G
import me_gd
from common import TofuError

CHOICES = ["red", "dark blue", "a green one"]
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def write_task(folder, name, rows_path):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(YAML.format(name=name, path=rows_path))


@torch.no_grad()
def predicted(model, tok, question):
    """By hand: the choice whose tokens after the question (joined by a space, lm-eval's
    target_delimiter) have the highest summed log-probability."""
    ctx = tok(question, add_special_tokens=False)["input_ids"]
    best = []
    for c in CHOICES:
        ids = tok(question + " " + c, add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(ctx) + ids[len(ctx):]])
        best.append(float(common.answer_logprob_stats(model(torch.tensor([ids])).logits, labels)[0][0]))
    return max(range(len(CHOICES)), key=best.__getitem__)


def hand_accuracy(model, tok, rows):
    return sum(predicted(model, tok, r["question"]) == r["label"] for r in rows) / len(rows)


@pytest.fixture
def tiny_task(tmp_path, tiny_model_dir):
    """Five rows whose labels are the starting model's choice on rows 0-2 and another choice on
    rows 3-4, so its accuracy is 3/5 by construction."""
    model, tok = models.load_model(str(tiny_model_dir), frozen=True)
    rows = []
    for i in range(5):
        q = f"Question {i}: which colour is the author's favourite?"
        p = predicted(model, tok, q)
        rows.append({"question": q, "choices": CHOICES, "label": p if i < 3 else (p + 1) % 3})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_task(tmp_path / "tasks", "tiny_mc", path)
    write_task(tmp_path / "tasks", "tiny_unreachable", tmp_path / "not_downloaded.jsonl")
    # a continuous score, which any change of the weights moves (accuracy on a tiny random model rarely does)
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"The author number {i} was born in a small "
                                                                       "town."}) + "\n" for i in range(3)))
    (tmp_path / "tasks" / "tiny_ppl.yaml").write_text(PPL_YAML.format(path=tmp_path / "text.jsonl"))
    return tmp_path / "tasks", rows, model, tok


def test_presets_and_task_lists():
    assert G.benchmark_tasks("rkld") == ["piqa", "hellaswag", "arc_easy", "arc_challenge", "copa", "winogrande",
                                         "mathqa"]
    assert G.benchmark_tasks("closer_look") == ["mmlu", "arc_challenge", "gsm8k", "triviaqa", "truthfulqa_mc1"]
    assert G.benchmark_tasks("closer_look,piqa,rkld")[:6] == ["mmlu", "arc_challenge", "gsm8k", "triviaqa",
                                                              "truthfulqa_mc1", "piqa"]
    assert G.benchmark_tasks("none") == [] and G.benchmark_tasks(None) == []
    # the metric each paper read: Closer-Look's ARC-C is acc_norm, RKLD's accuracy is acc
    assert G.score_metrics("closer_look")["arc_challenge"] == "acc_norm,none" and G.score_metrics("rkld") == {}
    r = {"acc,none": 0.4, "acc_norm,none": 0.5, "acc_stderr,none": 0.1}
    assert G.task_score(r, "acc_norm,none") == ("acc_norm,none", 0.5) and G.task_score(r) == ("acc,none", 0.4)


def test_local_task_accuracy_is_the_hand_count_and_a_missing_task_is_skipped(tiny_task, capsys):
    pytest.importorskip("lm_eval")
    tasks_dir, rows, model, tok = tiny_task
    res = G.run_benchmarks(model, tok, ["tiny_unreachable", "tiny_mc"], include_path=str(tasks_dir))
    assert res["scores"] == {"tiny_mc": pytest.approx(3 / 5)} and res["score_metric"]["tiny_mc"] == "acc,none"
    assert list(res["skipped"]) == ["tiny_unreachable"] and "could not be fetched" in res["skipped"]["tiny_unreachable"]
    said = [x for x in capsys.readouterr().out.splitlines() if "tiny_unreachable" in x]
    assert said == ["[benchmarks] tiny_unreachable could not be fetched or run (DatasetNotFoundError); the other "
                    "tasks go on without it"] or (len(said) == 1 and "go on without it" in said[0])


def test_method_run_scores_before_and_after(monkeypatch, tmp_path, tiny_task, tiny_model_dir, capsys):
    pytest.importorskip("lm_eval")
    tasks_dir, rows, model, tok = tiny_task
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["me_gd.py", "--output_dir", str(out), "--model", str(tiny_model_dir),
                                     "--subset", "quick", "--max_steps", "2", "--batch_size", "2",
                                     "--per_device_batch_size", "2", "--lr", "1e-2", "--max_eval_samples", "2",
                                     "--max_new_tokens", "2", "--nli_model", "none", "--cs_model", "none",
                                     "--benchmarks", "tiny_mc,tiny_ppl", "--benchmark_include_path", str(tasks_dir)])
    me_gd.main()
    before = json.loads((out / "eval" / "before" / "summary.json").read_text())["benchmarks"]
    after = json.loads((out / "eval" / "after" / "summary.json").read_text())["benchmarks"]
    unlearned = models.load_model(str(out / "model"), frozen=True)[0]
    assert before["scores"]["tiny_mc"] == pytest.approx(3 / 5)
    assert after["scores"]["tiny_mc"] == pytest.approx(hand_accuracy(unlearned, tok, rows))
    # perplexity: "before" is the starting model's, "after" the unlearned model's, and they differ
    ppl = {n: G.run_benchmarks(m, tok, ["tiny_ppl"], include_path=str(tasks_dir))["scores"]["tiny_ppl"]
           for n, m in (("before", model), ("after", unlearned))}
    assert before["scores"]["tiny_ppl"] == pytest.approx(ppl["before"], rel=1e-6)
    assert after["scores"]["tiny_ppl"] == pytest.approx(ppl["after"], rel=1e-6) and ppl["after"] != ppl["before"]
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("tiny_mc "))  # the end-of-run table
    assert line.split()[1:] == [f"{before['scores']['tiny_mc']:.4f}", f"{after['scores']['tiny_mc']:.4f}"]


def test_missing_lm_eval_is_one_sentence(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TofuError, match=r"^--benchmarks needs the optional package lm-eval: pip install lm_eval"):
        G.check_available("rkld")
    G.check_available("none")  # nothing asked, nothing needed
