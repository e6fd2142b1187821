"""finetune.py: a short run builds target and retain models on the quick subset."""
import json

import pytest

import common
from harness import models
import finetune


def run(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["finetune.py", *map(str, argv)])
    finetune.main()


def test_builds_target_and_retain_on_the_quick_subset(monkeypatch, tmp_path, tiny_model_dir, capsys):
    run(monkeypatch, "--model", tiny_model_dir, "--subset", "quick", "--quick_retain_authors", 1, "--epochs", 1,
        "--lr", 1e-3, "--batch_size", 8, "--per_device_batch_size", 4, "--output_root", tmp_path, "--report_rows", 2)
    target = models.finetuned_dir(str(tiny_model_dir), "forget01", "quick", "full", 1, tmp_path)
    retain = models.finetuned_dir(str(tiny_model_dir), "forget01", "quick", "retain99", 1, tmp_path)
    for path, rows, authors in ((target, 60, [0, 198, 199]), (retain, 20, [0])):
        info = json.loads((path / "args.json").read_text())["derived"]
        assert (info["rows"], info["authors"], info["grad_accum"]) == (rows, authors, 2)
        assert info["steps_per_epoch"] == rows // 8 + (rows % 8 > 0) and info["warmup_steps"] == info["steps_per_epoch"]
        assert len((path / "metrics.jsonl").read_text().splitlines()) == info["total_steps"]
        assert json.loads((path / common.FORMAT_FILE).read_text())["kind"] == "chat"
    out = capsys.readouterr().out
    assert "forget authors" in out and "retain authors" in out and "ROUGE-L" in out
    # a second call reuses what exists
    run(monkeypatch, "--model", tiny_model_dir, "--subset", "quick", "--quick_retain_authors", 1,
        "--output_root", tmp_path, "--report_rows", 0)
    assert "exists" in capsys.readouterr().out


def test_bad_arguments(monkeypatch, tiny_model_dir):
    with pytest.raises(common.TofuError, match="unknown split"):
        run(monkeypatch, "--split", "forget03")
    with pytest.raises(common.TofuError, match="--build must be"):
        run(monkeypatch, "--build", "oracle")


def test_system_prompt_is_saved_with_the_model_and_numbers_are_checked(monkeypatch, tmp_path, tiny_model_dir):
    """--system_prompt none reaches the saved format (unlearning and evaluation read it from there).
    Catches finetune.py ignoring the flag, and --lr 0 / --batch_size 0 reaching training."""
    run(monkeypatch, "--model", tiny_model_dir, "--subset", "quick", "--build", "target", "--max_steps", 1, "--lr", 1e-3,
        "--batch_size", 4, "--per_device_batch_size", 4, "--output_root", tmp_path, "--report_rows", 0,
        "--system_prompt", "none")
    target = models.finetuned_dir(str(tiny_model_dir), "forget01", "quick", "full", 4, tmp_path)
    assert json.loads((target / common.FORMAT_FILE).read_text()) == {"kind": "chat", "system_prompt": None}
    cheap = ["--model", tiny_model_dir, "--max_steps", 1, "--output_root", tmp_path / "bad", "--report_rows", 0]
    with pytest.raises(common.TofuError, match="--lr must be positive, not 0.0"):
        run(monkeypatch, *cheap, "--lr", 0)
    with pytest.raises(common.TofuError, match="--batch_size must be at least 1"):
        run(monkeypatch, *cheap, "--batch_size", 0)
