"""scripts/continual.py: the per-task launch lines, the MU/FE table, and a two-task run of
me_gd.py on the tiny model (each task starting from the previous task's model)."""
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import continual  # noqa: E402
import common  # noqa: E402
from harness import flags, models  # noqa: E402
import pytest  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
import me_gd  # noqa: E402


def test_task_commands_chain_models_and_keep_the_quick_recipe(tmp_path, tiny_model_dir, monkeypatch):
    first = continual.task_command("me_gd", "forget05", 1, "quick", tmp_path, "python", ["--seed", "1"])
    assert first[1].endswith("me_gd.py") and first[-4:] == ["--model", "quick", "--seed", "1"]
    assert first[first.index("--forget_task") + 1] == "1"
    assert first[first.index("--output_dir") + 1] == str(tmp_path / "task1")
    third = continual.task_command("me_gd", "forget05", 3, "quick", tmp_path, "accelerate launch", ["--lr", "3e-4"])
    assert third[:2] == ["accelerate", "launch"]
    assert third[third.index("--model") + 1] == str(tmp_path / "task2" / "model")
    assert third[third.index("--subset") + 1] == "quick" and third[-2:] == ["--lr", "3e-4"]   # extra flags win
    assert third[third.index("--recipe") + 1] == "quick"
    # task 3 runs task 1's recipe whole, not the paper's schedule and clipping under the quick lr and batch
    # (catches a command that passed the QUICK dict's flags alone: me_gd's paper recipe filled the rest)
    argv = third[third.index("--split"):-2]
    argv[argv.index("--model") + 1] = str(tiny_model_dir)  # task 2's model, which this test did not build
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    args = HfArgumentParser(me_gd.Args).parse_args_into_dataclasses(argv)[0]
    args = flags.finalize_args(args, me_gd.METHOD, me_gd.QUICK, me_gd.PAPER)
    assert (args.schedule, args.max_grad_norm, args.lr, args.batch_size) == ("epochs", 1.0, 1e-4, 8)
    assert third[third.index("--eval_before") + 1] == "false" and "--eval_before" not in first
    real = continual.task_command("idk_ap", "forget01", 2, "org/model", tmp_path, "python", [])
    assert "--subset" not in real and "--lr" not in real


def test_table_reads_summaries_and_marks_missing_ones(tmp_path):
    why = "not computed: missing forget_es"
    for k, where, s in ((1, "before", {"model_utility": 0.5, "fe": 0.1, "forget_rouge": 0.9, "forget_quality": None,
                                       "forget_quality_reason": "not computed: no retain logs"}),
                        (1, "after", {"model_utility": 0.4, "fe": 0.7, "mu18": 0.3, "forget_quality": None,
                                      "forget_rouge": 0.2, "forget_prob": None, "forget_prob_reason": why}),
                        (2, "after", {"model_utility": 0.35, "fe": 0.8, "forget_rouge": 0.1,
                                      "forget_quality_reason": "not computed: no forget-split log"})):
        d = tmp_path / f"task{k}" / "eval" / where
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
    text = continual.write_table(tmp_path, 3)
    lines = text.splitlines()
    assert lines[0] == "| task | MU | MU-18 | FE | FQ | forget ROUGE-L | forget Prob |" and len(lines) == 9
    assert lines[2] == "| 0 | 0.5000 | n/a | 0.1000 | n/a | 0.9000 | n/a |"
    assert lines[3] == "| 1 | 0.4000 | 0.3000 | 0.7000 | n/a | 0.2000 | n/a |"
    assert lines[5] == "| 3 | n/a | n/a | n/a | n/a | n/a | n/a |" and lines[6] == ""
    # a column no task has gets one line with the latest evaluated task's reason; MU-18 (one task has it) none
    assert lines[7:] == ["FQ is n/a in every row: no forget-split log", "forget Prob is n/a in every row: missing forget_es"]
    assert (tmp_path / "continual.md").read_text() == text


def test_two_task_run(monkeypatch, tmp_path, tiny_model_dir):
    def in_process(cmd):  # each launch runs in this process: a subprocess costs ~10 s of imports
        monkeypatch.setattr("sys.argv", cmd[1:])
        importlib.import_module(Path(cmd[1]).stem).main()
        return 0

    monkeypatch.setattr(continual, "launch", in_process)
    # --subset quick with --forget_task: authors 0-3 plus every task's authors (the continual quick subset)
    continual.main(["--method", "me_gd", "--split", "forget01", "--tasks", "2", "--model", str(tiny_model_dir),
                    "--out", str(tmp_path), "--launcher", "python", "--", "--subset", "quick", "--max_steps", "1",
                    "--batch_size", "2", "--per_device_batch_size", "2", "--max_eval_samples", "2",
                    "--max_new_tokens", "2", "--nli_model", "none", "--cs_model", "none"])
    first, second = (json.loads((tmp_path / f"task{k}" / "args.json").read_text()) for k in (1, 2))
    assert [r["derived"]["retain_rows"] for r in (first, second)] == [440, 400]  # the retain set shrinks
    second = second["args"]
    assert second["model"] == str(tmp_path / "task1" / "model") and second["forget_task"] == 2
    assert second["alpha"] == 1.0
    table, notes = (tmp_path / "continual.md").read_text().split("\n\n")
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 1", "| 2"]
    # task 2 starts from task 1's evaluated model: no "before" evaluation of it again (a quarter of the cost)
    assert (tmp_path / "task1" / "eval" / "before" / "summary.json").exists()
    assert not (tmp_path / "task2" / "eval" / "before").exists()
    # MU and forget ROUGE-L are computed; FQ is not (continual runs have no retain model), nor, with
    # --nli_model none, MU-18 and FE: each n/a column gets one line saying why
    assert all(r.split(" | ")[1] != "n/a" and r.split(" | ")[4] == "n/a" and r.split(" | ")[5] != "n/a" for r in rows)
    assert [n.split(" is n/a")[0] for n in notes.splitlines()] == ["MU-18", "FE", "FQ"], notes


def test_continual_quick_subset_learns_every_task_and_shrinks_the_retain_set():
    """The continual quick target learns authors 0-3 and every task's authors, and task k retains
    authors 0-3 plus the tasks after k (closer-look §5.2: the retain set loses a task per round)."""
    authors = common.quick_authors("forget01", 4, continual=True)
    assert authors == set(range(4)) | set(range(180, 200))
    seen = set()
    for k in range(1, 11):
        forget, retain = common.forget_retain_rows("forget01", authors, k)
        task = {r["author"] for r in forget}
        later = {r["author"] for j in range(k + 1, 11) for r in common.load_split("forget01", forget_task=j)}
        assert task <= authors and not task & seen and {r["author"] for r in retain} == set(range(4)) | later
        assert len(retain) == 20 * (4 + len(later))
        seen |= task
    assert len(seen) == 20


def parse(argv):
    args = HfArgumentParser(me_gd.Args).parse_args_into_dataclasses(argv)[0]
    return flags.finalize_args(args, me_gd.METHOD, me_gd.QUICK, me_gd.PAPER)


def test_quick_model_of_a_continual_task_is_the_continual_target(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    with pytest.raises(common.TofuError, match="--continual true"):
        parse(["--split", "forget01", "--forget_task", "1"])
    path = models.finetuned_dir("smollm2-135m", "forget01", "quick", "full", continual=True)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    assert parse(["--split", "forget01", "--forget_task", "1"]).model == str(path)
    assert path.name == "smollm2-135m_quick4-forget01-continual_full"


def test_a_refused_first_task_leaves_no_folder(tmp_path):
    """Catches the empty <out> folder a sequence refused at task 1 left behind (issue 34)."""
    out = tmp_path / "seq"
    with pytest.raises(SystemExit, match="task 1 failed"):
        continual.main(["--method", "me_gd", "--tasks", "1", "--model", str(tmp_path / "no_such_model"),
                        "--out", str(out)])
    assert not out.exists()
