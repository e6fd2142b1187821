"""--report_to: accelerate's trackers get the run's arguments, every step's losses and every
evaluation's numbers; the default (none) needs nothing and writes nothing new."""
import json

import pytest

from harness import models, runlog
import me_gd
from common import TofuError

RUN = ["--subset", "quick", "--max_steps", 2, "--batch_size", 2, "--per_device_batch_size", 2,
       "--max_eval_samples", 2, "--max_new_tokens", 3, "--nli_model", "none", "--cs_model", "none"]


def run(monkeypatch, out, *argv):
    monkeypatch.setattr("sys.argv", ["me_gd.py", "--output_dir", str(out), *map(str, argv)])
    me_gd.main()


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = [p for p in folder.rglob("events.out.tfevents.*")]
    out = {}
    for p in runs:
        acc = EventAccumulator(str(p))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_losses_evaluations_and_config(monkeypatch, tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    run(monkeypatch, out, "--model", tiny_model_dir, "--retain_model", tiny_model_dir, "--report_to", "tensorboard",
        *RUN)
    tb = scalars(out / "tensorboard")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "loss/forget", "loss/retain", "lr"):  # every step, at its step, with its value
        assert tb[key] == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key
    before = json.loads((out / "eval" / "before" / "summary.json").read_text())
    after = json.loads((out / "eval" / "after" / "summary.json").read_text())
    assert before["forget_prob"] != after["forget_prob"]
    assert tb["eval/forget_prob"] == [(0, pytest.approx(before["forget_prob"], rel=1e-6)),
                                      (2, pytest.approx(after["forget_prob"], rel=1e-6))]
    assert tb["eval/forget_quality"][1] == (2, pytest.approx(after["forget_quality"], rel=1e-6))
    hparams = list((out / "tensorboard").rglob("hparams.yml"))  # the arguments, as the run's config
    assert hparams and "alpha: 0.1" in hparams[0].read_text() and "report_to: tensorboard" in hparams[0].read_text()


def test_default_writes_no_tracker_files(monkeypatch, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run(monkeypatch, out, "--model", tiny_model_dir, *RUN[:8], "--eval", "false")
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


def test_missing_tracker_package_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(runlog.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TofuError, match=r"^--report_to wandb needs the wandb package: pip install wandb$"):
        runlog.trackers("wandb")
    with pytest.raises(TofuError, match="--report_to all found neither"):
        runlog.trackers("all")
    with pytest.raises(TofuError, match="--report_to must be one of"):
        runlog.trackers("mlflow")


def test_finetune_logs_each_models_losses_in_one_run(monkeypatch, tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    import finetune
    monkeypatch.setattr("sys.argv", ["finetune.py", "--model", str(tiny_model_dir), "--subset", "quick",
                                     "--quick_retain_authors", "1", "--epochs", "1", "--max_steps", "2", "--lr", "1e-3",
                                     "--batch_size", "8", "--per_device_batch_size", "4", "--output_root",
                                     str(tmp_path), "--report_rows", "0", "--report_to", "tensorboard"])
    finetune.main()
    tb = scalars(tmp_path / "tensorboard")
    for data in ("full", "retain99"):
        path = models.finetuned_dir(str(tiny_model_dir), "forget01", "quick", data, 1, tmp_path)
        metrics = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        assert tb[f"{data}/loss"] == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]


def test_evaluator_cli_reports_its_summary(monkeypatch, tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    import evaluate_tofu
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n"
                                              for i in range(3)))
    monkeypatch.setattr("sys.argv", ["evaluate_tofu.py", "--model", str(tiny_model_dir), "--forget_data",
                                     str(tmp_path / "f.jsonl"), "--output_dir", str(tmp_path / "ev"),
                                     "--max_new_tokens", "2", "--nli_model", "none", "--cs_model", "none",
                                     "--report_to", "tensorboard"])
    evaluate_tofu.main()
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert scalars(tmp_path / "ev" / "tensorboard")["eval/forget_prob"] == [(0, pytest.approx(s["forget_prob"]))]
