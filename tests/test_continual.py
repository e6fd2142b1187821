"""scripts/continual.py: the per-task launch lines, the MU/FE table, and a two-task run of
me_gd.py on the tiny model (each task starting from the previous task's model)."""
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import continual  # noqa: E402
import me_gd  # noqa: E402


def test_task_commands_chain_models_and_keep_the_quick_recipe(tmp_path):
    first = continual.task_command("me_gd", "forget05", 1, "quick", tmp_path, "python", ["--seed", "1"])
    assert first[1].endswith("me_gd.py") and first[-4:] == ["--model", "quick", "--seed", "1"]
    assert first[first.index("--forget_task") + 1] == "1"
    assert first[first.index("--output_dir") + 1] == str(tmp_path / "task1")
    third = continual.task_command("me_gd", "forget05", 3, "quick", tmp_path, "accelerate launch", ["--lr", "3e-4"])
    assert third[:2] == ["accelerate", "launch"]
    assert third[third.index("--model") + 1] == str(tmp_path / "task2" / "model")
    assert third[third.index("--subset") + 1] == "quick" and third[-2:] == ["--lr", "3e-4"]   # extra flags win
    assert third[third.index("--batch_size") + 1] == str(me_gd.QUICK["batch_size"])
    real = continual.task_command("idk_ap", "forget01", 2, "org/model", tmp_path, "python", [])
    assert "--subset" not in real and "--lr" not in real


def test_table_reads_summaries_and_marks_missing_ones(tmp_path):
    for k, where, s in ((1, "before", {"model_utility": 0.5, "fe": 0.1}), (1, "after", {"model_utility": 0.4, "fe": 0.7,
                        "mu18": 0.3, "forget_quality": None}), (2, "after", {"model_utility": 0.35, "fe": 0.8})):
        d = tmp_path / f"task{k}" / "eval" / where
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
    text = continual.write_table(tmp_path, 3)
    lines = text.splitlines()
    assert lines[0] == "| task | MU | MU-18 | FE | FQ |" and len(lines) == 6
    assert lines[2] == "| 0 | 0.5000 | n/a | 0.1000 | n/a |" and lines[3] == "| 1 | 0.4000 | 0.3000 | 0.7000 | n/a |"
    assert lines[5] == "| 3 | n/a | n/a | n/a | n/a |" and (tmp_path / "continual.md").read_text() == text


def test_two_task_run(monkeypatch, tmp_path, tiny_model_dir):
    def in_process(cmd):  # each launch runs in this process: a subprocess costs ~10 s of imports
        monkeypatch.setattr("sys.argv", cmd[1:])
        importlib.import_module(Path(cmd[1]).stem).main()
        return 0

    monkeypatch.setattr(continual, "launch", in_process)
    # --subset all: the quick subset keeps only the forget authors of task 1, so evaluating task 2 would find no rows
    continual.main(["--method", "me_gd", "--split", "forget01", "--tasks", "2", "--model", str(tiny_model_dir),
                    "--out", str(tmp_path), "--launcher", "python", "--", "--subset", "all", "--max_steps", "1",
                    "--batch_size", "2", "--per_device_batch_size", "2", "--max_eval_samples", "2",
                    "--max_new_tokens", "2", "--nli_model", "none", "--cs_model", "none"])
    second = json.loads((tmp_path / "task2" / "args.json").read_text())["args"]
    assert second["model"] == str(tmp_path / "task1" / "model") and second["forget_task"] == 2
    assert second["alpha"] == 1.0
    rows = (tmp_path / "continual.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 1", "| 2"]
    # MU is computed; FQ is not (continual runs have no retain model)
    assert all(r.split(" | ")[1] != "n/a" and r.endswith("| n/a |") for r in rows)
