"""What a new user meets in the first hour (issue 34): the logged lr is the step's own, a run inside its
warmup says so and its table says when the weights did not change, the recipe is chosen by name and
printed, and a refused run leaves nothing on disk."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import me_gd
import rkld
from harness import flags, launch

SMOKE = ["--subset", "quick", "--batch_size", 2, "--per_device_batch_size", 2, "--schedule", "epochs"]


def run(monkeypatch, out, *argv, script=me_gd):
    monkeypatch.setattr("sys.argv", ["x.py", "--output_dir", str(out), *map(str, argv)])
    script.main()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_logged_lr_is_the_rate_the_step_ran_at(monkeypatch, tmp_path, tiny_model_dir):
    """forget01's 40 rows at batch 2: 20 steps an epoch, one warmup epoch, so step t (from 1) runs at
    lr x (t - 1) / 20. Catches the rate after the step (lr/20 and 2 lr/20 here; 0 for a one-step run
    without warmup, whose one step ran at the full rate)."""
    m = run(monkeypatch, tmp_path / "a", "--model", tiny_model_dir, *SMOKE, "--max_steps", 2, "--lr", 1e-3,
            "--eval", "false")
    assert [x["lr"] for x in m] == pytest.approx([0.0, 1e-3 / 20], abs=1e-12)
    m = run(monkeypatch, tmp_path / "b", "--model", tiny_model_dir, *SMOKE, "--max_steps", 1, "--lr", 1e-3,
            "--warmup_epochs", 0, "--eval", "false")
    assert [x["lr"] for x in m] == pytest.approx([1e-3], abs=1e-12)


def test_warmup_note_by_hand():
    assert launch.warmup_note(10, 2, 1e-3) is None
    assert "will not change" in launch.warmup_note(1, 50, 1e-3)
    assert "0.0001" in launch.warmup_note(3, 20, 1e-3)  # the last of 3 steps: 1e-3 x 2 / 20
    assert "will not change" in launch.warmup_note(0, 0, 1e-3)


def test_a_run_inside_its_warmup_says_so_and_its_table_says_the_weights_did_not_change(
        monkeypatch, tmp_path, tiny_model_dir, capsys):
    """One step, the first of 20 warmup steps, runs at lr 0: AdamW leaves every weight as it was. The
    run says so before training and under its end-of-run table. Catches a silent no-op (the trial's
    real-world run with --max_steps 1), and a note printed for a run whose weights did move."""
    out = tmp_path / "noop"
    run(monkeypatch, out, "--model", tiny_model_dir, *SMOKE, "--max_steps", 1, "--max_eval_samples", 2,
        "--max_new_tokens", 2, "--nli_model", "none", "--cs_model", "none", "--retain_model", "none")
    captured = capsys.readouterr()
    text = captured.out
    assert "  score" in captured.err and "  generate" in captured.err  # the evaluation's progress bars
    start = weights(tiny_model_dir)
    assert all(torch.equal(start[k], v) for k, v in weights(out / "model").items())  # the no-op itself
    assert "will not change" in text.split("[eval] before")[0]  # said before training
    assert "weights did not change" in text.split("[eval] after")[1]
    out = tmp_path / "moved"
    run(monkeypatch, out, "--model", tiny_model_dir, *SMOKE, "--max_steps", 1, "--warmup_epochs", 0,
        "--max_eval_samples", 2, "--max_new_tokens", 2, "--nli_model", "none", "--cs_model", "none",
        "--retain_model", "none")
    text = capsys.readouterr().out
    assert not all(torch.equal(start[k], v) for k, v in weights(out / "model").items())
    assert "will not change" not in text and "weights did not change" not in text


def test_recipe_is_chosen_by_name_and_printed(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """--recipe quick on a model folder gives the quick recipe's values (a folder used to force the
    paper's), the default stays the paper's for a folder, the start line gives the effective values and
    the run folder names the recipe. Catches a recipe still chosen by --model alone."""
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)

    def parse(*argv):
        monkeypatch.setattr("sys.argv", ["rkld.py", "--model", str(tiny_model_dir), *map(str, argv)])
        return flags.finalize_args(flags.parse(rkld.Args, rkld.QUICK, rkld.PAPER), rkld.METHOD, rkld.QUICK, rkld.PAPER)
    paper, quick = parse(), parse("--recipe", "quick")
    assert (paper.recipe, paper.lr, paper.epochs, paper.batch_size, paper.pad_to, paper.peak_epoch) == \
        ("paper", 1e-5, 10, 32, 500, True)
    assert (quick.recipe, quick.lr, quick.epochs, quick.batch_size, quick.pad_to, quick.peak_epoch) == \
        ("quick", 1e-4, 5, 8, 0, False)
    assert quick.output_dir.endswith("recipe_quick") and "recipe" not in Path(paper.output_dir).name
    assert parse("--recipe", "quick", "--lr", 3e-4).lr == 3e-4  # a flag given still wins
    with pytest.raises(common.TofuError, match="--recipe must be"):
        parse("--recipe", "fast")
    line = flags.recipe_line("rkld", quick, {"effective_batch": 8, "total_steps": 2, "warmup_steps": 5}, "ours")
    assert all(s in line for s in ("recipe quick", "lr 0.0001", "batch 8", "5 epochs", "2 optimizer steps",
                                   "5 warmup steps", "longest in each batch"))
    run(monkeypatch, tmp_path / "r", "--model", tiny_model_dir, "--recipe", "quick", "--subset", "quick",
        "--max_steps", 1, "--eval", "false", script=rkld)
    assert "recipe quick (ours, sized" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r" / "args.json").read_text())
    assert saved["args"]["lr"] == 1e-4 and saved["derived"]["effective_batch"] == 8


def test_help_gives_each_recipes_value_and_source(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["rkld.py", "--help"])
    with pytest.raises(SystemExit):
        flags.parse(rkld.Args, rkld.QUICK, rkld.PAPER)
    text = " ".join(capsys.readouterr().out.split())
    assert "Recipes: paper 10 (RKLD App. A); quick 5 (ours" in text
    assert "Recipes: paper True (RKLD App. A); quick False (ours" in text  # --peak_epoch
    # parsed twice (main() in one process), the values are given once
    monkeypatch.setattr("sys.argv", ["rkld.py", "--help"])
    with pytest.raises(SystemExit):
        flags.parse(rkld.Args, rkld.QUICK, rkld.PAPER)
    assert " ".join(capsys.readouterr().out.split()).count("Recipes: paper 10") == 1


@pytest.mark.parametrize("why,argv", [
    ("needs retain rows", ["--quick_retain_authors", 0]),
    ("lm-eval", ["--benchmarks", "rkld"]),
])
def test_a_refused_run_leaves_nothing_on_disk(monkeypatch, tmp_path, tiny_model_dir, why, argv):
    """Catches args.json and an empty metrics.jsonl written before a refusal (the trial's --benchmarks
    without lm-eval)."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    out = tmp_path / "refused"
    with pytest.raises(common.TofuError, match=why):
        run(monkeypatch, out, "--model", tiny_model_dir, *SMOKE, "--max_steps", 1, *argv)
    assert not out.exists()


def test_every_nc_cell_gets_its_reason_under_the_table():
    """Catches an n/c printed without a reason (the real-world scenario offline: MU and FE)."""
    from evaluation import method_eval
    offline = {"real_world_mu": None, "real_world_mu_reason": "not computed: missing retain_es",
               "nli_model": "not computed: no NLI model offline", "real_world_fe": 0.5, "forget_leak_top1": None}
    rows = [("before", offline), ("after", {**offline, "real_world_fe": None, "real_world_fe_reason": "x"})]
    notes = method_eval.nc_notes(rows, [("MU", "real_world_mu"), ("FE", "real_world_fe"), ("leak", "forget_leak_top1")])
    assert notes[0] == "n/c MU (before, after): missing retain_es (ES: no NLI model offline)"
    assert notes[1] == "n/c FE (after): x" and notes[2].startswith("n/c leak (before, after): ")
    assert method_eval.nc_notes(rows[:1], [("FE", "real_world_fe")]) == []


def test_aggregate_only_reads_a_run_folder_with_its_retain_logs_and_extras(monkeypatch, tmp_path, tiny_model_dir):
    """--aggregate_only --logs RUN (or RUN/eval) without --retain_logs: the retain logs the run recorded give
    forget quality and eval_extra.json gives TE, as the run's own summary has them. Catches a run folder
    refused (logs in several subfolders), and FQ and TE left n/c although the run recorded both."""
    import evaluate_tofu
    out = tmp_path / "run"
    run(monkeypatch, out, "--model", tiny_model_dir, *SMOKE, "--max_steps", 1, "--max_eval_samples", 2,
        "--max_new_tokens", 2, "--nli_model", "none", "--cs_model", "none", "--retain_model", tiny_model_dir)
    want = json.loads((out / "eval" / "after" / "summary.json").read_text())
    assert want["forget_quality"] is not None and want["forget_te"] is not None
    for logs in (out, out / "eval"):
        got = tmp_path / "agg.json"
        evaluate_tofu.aggregate_only(evaluate_tofu.Args(aggregate_only=True, logs=str(logs), output_json=str(got)))
        got = json.loads(got.read_text())
        for k in ("forget_quality", "forget_te", "retain_te", "forget_prob", "forget_leak_top1"):
            assert got[k] == pytest.approx(want[k], rel=1e-12), k


def test_finetune_builds_a_target_and_retain_model_from_your_own_data(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """finetune.py --forget_data/--retain_data: the target trains on forget + retain, the retain model on
    retain alone, and a method run on the same files uses them (forget quality against the retain model).
    The tiny random model barely knows the rows, and the before-evaluation says so in one line. Catches
    finetune.py without the flags (refused as unknown arguments) and a silent before-evaluation."""
    from test_custom_data import qa_rows, write_jsonl
    import finetune
    f = write_jsonl(tmp_path / "forget.jsonl", qa_rows(6))
    r = write_jsonl(tmp_path / "retain.jsonl", qa_rows(4, prefix="r"))
    monkeypatch.setattr("sys.argv", ["finetune.py", *map(str, [
        "--model", tiny_model_dir, "--forget_data", f, "--retain_data", r, "--epochs", 1, "--batch_size", 2,
        "--per_device_batch_size", 2, "--lr", 1e-3, "--output_root", tmp_path / "m", "--report_rows", 0])])
    finetune.main()
    target, retain = sorted((tmp_path / "m").glob("*_custom_target-*")), sorted((tmp_path / "m").glob("*_custom_retain-*"))
    assert len(target) == len(retain) == 1
    t, rr = (json.loads((p[0] / "args.json").read_text())["derived"] for p in (target, retain))
    assert (t["rows"], rr["rows"]) == (10, 4)
    assert f"--model {target[0]} --retain_model {retain[0]}" in capsys.readouterr().out
    out = tmp_path / "unlearn"
    run(monkeypatch, out, "--model", target[0], "--retain_model", retain[0], "--forget_data", f, "--retain_data", r,
        "--batch_size", 2, "--per_device_batch_size", 2, "--max_steps", 1, "--max_new_tokens", 2,
        "--nli_model", "none", "--cs_model", "none")
    after = json.loads((out / "eval" / "after" / "summary.json").read_text())
    assert after["forget_quality"] is not None and after["n_forget"] == 6
    printed = capsys.readouterr().out
    before = json.loads((out / "eval" / "before" / "summary.json").read_text())
    assert before["forget_prob"] < 0.2 and "[eval] before: the starting model barely knows the forget set" in printed


def test_max_steps_caps_strengthening_and_the_start_lines_say_so(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """--max_steps 1 with 3 strengthening epochs: one strengthening step and one unlearning step, each
    stage's start line giving its steps and the cap, and no line that promises epochs. (The cap itself
    held before this change; the lines did not: 'quick path: 5 epochs' under --max_steps 2.)"""
    out = tmp_path / "r"
    m = run(monkeypatch, out, "--model", tiny_model_dir, "--recipe", "quick", "--subset", "quick", "--max_steps", 1,
            "--strengthen_epochs", 3, "--retain_model", tiny_model_dir, "--max_eval_samples", 2, "--max_new_tokens", 2,
            "--nli_model", "none", "--cs_model", "none", "--precompute_teacher", "false", script=rkld)
    assert len(m) == 1 and len((out / "strengthened" / "metrics.jsonl").read_text().splitlines()) == 1
    text = capsys.readouterr().out
    assert "strengthening (before unlearning): 3 epochs at lr 0.0002, 1 optimizer steps (stopped there by --max_steps)" \
        in text
    assert "1 optimizer steps (stopped there by --max_steps)" in text.split("strengthening")[0]
    assert "quick path: 5 epochs" not in text


def test_a_saved_adapter_names_its_base_portably(monkeypatch, tmp_path):
    """A --save_adapter_only folder whose base is the embedded model stores the preset's name; a base
    inside the repo is stored relative to the adapter, so the repo moved as a whole still loads; a base
    elsewhere keeps its absolute path. Catches the absolute path that broke when the folder moved."""
    from harness import models
    repo = tmp_path / "repo"
    monkeypatch.setattr(common, "REPO", repo)
    monkeypatch.setattr(common, "CACHE_DIR", repo / ".cache")

    def adapter(base, where):
        where.mkdir(parents=True)
        (where / models.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": str(base)}))
        models.portable_base(where, where)
        return json.loads((where / models.ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    preset = repo / ".cache" / "models" / "smollm2-135m"
    inside, outside = repo / "runs" / "models" / "target", tmp_path / "elsewhere" / "base"
    for p in (preset, inside, outside):
        p.mkdir(parents=True)
        (p / "config.json").write_text("{}")
    assert adapter(preset, repo / "runs" / "a1") == "smollm2-135m"
    assert adapter(inside, repo / "runs" / "rkld" / "a2") == "../../models/target"
    assert adapter(outside, repo / "runs" / "a3") == str(outside)
    moved = tmp_path / "moved"
    repo.rename(moved)
    assert models.adapter_base(moved / "runs" / "rkld" / "a2") == str((moved / "runs" / "models" / "target").resolve())


def test_lora_model_loads_without_the_deprecation_warning(tiny_model_dir):
    """Catches transformers' is_gradient_checkpointing FutureWarning, printed in every LoRA run."""
    import warnings
    from types import SimpleNamespace
    from harness import models
    args = SimpleNamespace(model=str(tiny_model_dir), lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                           lora_target_modules="all-linear", save_adapter_only=False, gradient_checkpointing=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        models.peft_module()  # installs the filter, as every LoRA path does first
        models.load_trained(args, launch.make_accelerator(1, 1)[0])
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_printed_example_questions_are_the_questions_not_the_chat_template(capsys):
    """Catches 'Q:' showing the log's decoded input (system/user turns of the chat template)."""
    from evaluation.logs import print_summary
    logs = {"forget": {"generated_text": {"7": ["system\n\nuser\nWho is X?\nassistant\n", "out", "gold"]}}}
    print_summary({}, logs, {"7": "Who is X?"})
    assert "Q: 'Who is X?'" in capsys.readouterr().out
