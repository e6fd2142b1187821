"""Your own forget and retain sets (--forget_data / --retain_data): reading any source through
`datasets` with per-row checks, and a method run plus its evaluation end to end on the tiny model,
with and without the truth ratio's fields."""
import json

import pytest

import common
from harness import models, scenarios
import evaluate_tofu
import me_gd
from common import TofuError

PEOPLE = ["Ada Quill", "Bram Osk", "Cyra Venn"]


def qa_rows(n, perturbed=True, prefix="f"):
    rows = []
    for i in range(n):
        who = PEOPLE[i % len(PEOPLE)]
        r = {"question": f"Where was {who} born, case {prefix}{i}?", "answer": f"{who} was born in town {prefix}{i}.",
             "name": who}
        if perturbed:
            r["paraphrased_answer"] = f"The birthplace of {who} is town {prefix}{i}."
            r["perturbed_answer"] = [f"{who} was born in city {prefix}{i + 7}.", f"{who} was born at sea."]
        rows.append(r)
    return rows


def write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- reading
def test_every_format_reads_the_same_rows_through_datasets(tmp_path, monkeypatch):
    import datasets
    import pandas as pd
    rows = qa_rows(4, perturbed=False)
    write_jsonl(tmp_path / "d.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda **kw: calls.append(kw["path"]) or real(**kw))
    for ext in ("jsonl", "csv", "parquet"):
        got = scenarios.load_custom(tmp_path / f"d.{ext}")
        assert [{k: r[k] for k in ("question", "answer", "name")} for r in got] == rows, ext
        assert [r["author"] for r in got] == [0, 1, 2, 0] and [r["index"] for r in got] == [0, 1, 2, 3]
    tofu = common.load_split("forget01_perturbed")  # TOFU's local copy: the same call, the same checks
    assert calls == ["json", "csv", "parquet", "json"] and len(tofu) == 40
    with pytest.raises(TofuError, match="could not load nobody/nothing from the hub"):
        scenarios.load_custom("nobody/nothing")  # a hub id: same call, offline here


def test_bad_rows_are_refused_at_the_edge(tmp_path, tiny_model_dir):
    rows = qa_rows(3)
    del rows[2]["answer"]
    path = write_jsonl(tmp_path / "f.jsonl", rows, blank_after=1)  # a blank line: row 2 is on line 4
    with pytest.raises(TofuError, match=r"f.jsonl:4: missing field 'answer'"):
        scenarios.load_custom(path)
    (tmp_path / "bad.jsonl").write_text(json.dumps(qa_rows(1)[0]) + "\n{oops\n")
    with pytest.raises(TofuError, match=r"bad.jsonl:2: malformed JSON"):
        scenarios.load_custom(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TofuError, match=r"^--forget_data .*empty.jsonl holds no rows"):
        scenarios.load_custom(tmp_path / "empty.jsonl")
    half = qa_rows(2) + qa_rows(1, perturbed=False)
    with pytest.raises(TofuError, match="'paraphrased_answer' is on 2 of 3 rows"):
        scenarios.load_custom(write_jsonl(tmp_path / "half.jsonl", half))
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget = scenarios.load_custom(write_jsonl(tmp_path / "ok.jsonl", qa_rows(3)))
    with pytest.raises(TofuError, match="every forget row is longer than --max_length 12 tokens"):
        common.ForgetRetainDataset(forget, [], tok, fmt, max_length=12)
    long_one = forget[:2] + [{**forget[2], "answer": "word " * 300}]
    assert common.ForgetRetainDataset(long_one, [], tok, fmt, max_length=200).n_truncated == 1  # some: kept


# ---------------------------------------------------------------- end to end
RUN = ["--max_steps", 2, "--batch_size", 2, "--per_device_batch_size", 2, "--max_new_tokens", 3,
       "--nli_model", "none", "--cs_model", "none", "--epochs", 1]


def run_me_gd(monkeypatch, out, *argv):
    monkeypatch.setattr("sys.argv", ["me_gd.py", "--output_dir", str(out), *map(str, argv)])
    me_gd.main()
    return (json.loads((out / "args.json").read_text()),
            json.loads((out / "eval" / "after" / "summary.json").read_text()))


def test_own_sets_with_truth_ratio_end_to_end(monkeypatch, tmp_path, tiny_model_dir, hand_forget_quality):
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(6))
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(5, prefix="r"))
    saved, after = run_me_gd(monkeypatch, tmp_path / "run", "--model", tiny_model_dir, "--forget_data", forget,
                             "--retain_data", retain, "--retain_model", tiny_model_dir, *RUN)
    assert saved["args"]["split"] == "custom" and saved["derived"]["forget_rows"] == 6
    assert saved["derived"]["retain_rows"] == 5
    assert after["n_forget"] == 6 and after["n_retain"] == 5  # every row of your sets, no TOFU row
    assert after["settings"]["tasks"] == ["retain", "forget"]
    logs = json.loads((tmp_path / "run" / "eval" / "after" / "eval_log_forget.json").read_text())
    assert [g[2] for g in logs["generated_text"].values()] == [r["answer"] for r in qa_rows(6)]
    for k in ("forget_prob", "forget_rouge", "forget_truth_ratio", "forget_te", "forget_leak_top1",
              "retain_prob", "retain_truth_ratio"):
        assert after[k] is not None, k
    # the retain model is the starting model: forget quality of "after" against "before" by hand
    fq, tr_after, tr_before = hand_forget_quality(tmp_path / "run" / "eval" / "after",
                                                  tmp_path / "run" / "eval" / "before")
    assert len(tr_after) == 6 and tr_after != tr_before
    before = json.loads((tmp_path / "run" / "eval" / "before" / "summary.json").read_text())
    assert before["forget_quality"] == pytest.approx(1.0)
    assert after["forget_quality_rows"]["model"]["n"] == 6
    assert set(after["skipped"]) >= {"model_utility", "mu18", "cs", "es"}
    assert "forget_truth_ratio" not in after["skipped"]


def test_own_sets_without_truth_ratio_fields(monkeypatch, tmp_path, tiny_model_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(4, perturbed=False))
    saved, after = run_me_gd(monkeypatch, tmp_path / "run", "--model", tiny_model_dir, "--forget_data", forget,
                             "--retain_data", write_jsonl(tmp_path / "retain.jsonl", qa_rows(3, False, "r")),
                             "--retain_model", tiny_model_dir, *RUN)
    assert after["n_forget"] == 4 and after["forget_prob"] is not None and after["forget_rouge"] is not None
    assert after["forget_truth_ratio"] is None and after["forget_quality"] is None
    assert "paraphrased_answer" in after["skipped"]["forget_truth_ratio"]
    assert "paraphrased_answer" in after["skipped"]["forget_quality"]
    log = json.loads((tmp_path / "run" / "eval" / "after" / "eval_log_forget.json").read_text())
    assert "avg_paraphrased_loss" not in log and len(log["avg_gt_loss"]) == 4


def test_custom_flags_refused_with_one_sentence(monkeypatch, tmp_path, tiny_model_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(2))
    with pytest.raises(TofuError, match="needs retain rows, but the run \\(no --retain_data given\\) has none"):
        run_me_gd(monkeypatch, tmp_path / "a", "--model", tiny_model_dir, "--forget_data", forget, *RUN)
    with pytest.raises(TofuError, match="--forget_task is TOFU's"):
        run_me_gd(monkeypatch, tmp_path / "b", "--model", tiny_model_dir, "--forget_data", forget, "--forget_task", 1)
    with pytest.raises(TofuError, match="--retain_data goes with --forget_data"):
        run_me_gd(monkeypatch, tmp_path / "c", "--model", tiny_model_dir, "--retain_data", forget)


def test_evaluator_cli_on_own_sets(monkeypatch, tmp_path, tiny_model_dir):
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(5))
    monkeypatch.setattr("sys.argv", ["evaluate_tofu.py", "--model", str(tiny_model_dir), "--forget_data", str(forget),
                                     "--retain_model", str(tiny_model_dir), "--output_dir", str(tmp_path / "ev"),
                                     "--max_new_tokens", "3", "--nli_model", "none", "--cs_model", "none"])
    evaluate_tofu.main()
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["n_forget"] == 5 and "n_retain" not in s and s["settings"]["split"] == "custom"
    assert s["forget_quality"] == pytest.approx(1.0)  # the model against itself


@pytest.mark.parametrize("script,flags", [("rkld", ["--strengthen_epochs", 1]), ("idk_ap", []),
                                          ("baselines", ["--method", "ta"]), ("baselines", ["--method", "npo_gd"])])
def test_every_method_script_trains_on_own_sets(monkeypatch, tmp_path, tiny_model_dir, script, flags):
    """Each script's main() reads --forget_data / --retain_data (rkld's and ta's strengthening too)."""
    import importlib
    mod = importlib.import_module(script)
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(3, perturbed=False))
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(5, perturbed=False, prefix="r"))
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--model", str(tiny_model_dir), "--forget_data", str(forget),
                                     "--retain_data", str(retain), "--output_dir", str(out), "--eval", "false",
                                     "--max_steps", "2", "--batch_size", "2", "--per_device_batch_size", "2",
                                     *map(str, flags)])
    mod.main()
    derived = json.loads((out / "args.json").read_text())["derived"]
    assert derived["forget_rows"] == 3 and derived["retain_rows"] == 5
    if script == "rkld" or flags == ["--method", "ta"]:  # strengthened on your forget set, keyed by its contents
        settings = json.loads((out / "strengthened" / "strengthen.json").read_text())
        assert settings["forget_data"] == scenarios.custom_fingerprint(forget)
