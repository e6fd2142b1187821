"""idk_ap.py end to end: a two-step smoke run of every variant on the tiny model, one run
with evaluation, a continual task, the CLI's --help and error line, and the shared main()."""
import inspect
import json
import math

import pytest

import common
import idk_ap
import me_gd
import rkld
import rmu

SMOKE = ["--subset", "quick", "--max_steps", 2, "--batch_size", 2, "--per_device_batch_size", 2, "--eval", "false"]


def run(monkeypatch, out, *argv):
    monkeypatch.setattr("sys.argv", ["idk_ap.py", "--output_dir", str(out), *map(str, argv)])
    idk_ap.main()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all({"loss", "loss/forget", "loss/retain", "lr"} <= set(m) for m in metrics)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["loss"] == pytest.approx(m["loss/forget"] + m["loss/retain"], rel=1e-5) for m in metrics)
    assert (out / "model" / "config.json").exists()
    return metrics


# every forget x retain pair; idk+ap, the default, runs with evaluation below
@pytest.mark.parametrize("forget,retain", [("idk", "gd"), ("idk", "kl"), ("dpo", "ap"), ("dpo", "gd"), ("dpo", "kl")])
def test_smoke_variants(monkeypatch, tmp_path, tiny_model_dir, forget, retain):
    metrics = run(monkeypatch, tmp_path, "--model", tiny_model_dir, *SMOKE, "--forget_loss", forget,
                  "--retain_loss", retain)
    first = metrics[0]  # step 1: the model still equals the frozen reference
    if forget == "dpo":
        assert first["loss/forget"] == pytest.approx(-(2 / 0.1) * math.log(0.5), rel=1e-4)
    if retain == "kl":
        assert first["loss/retain"] == pytest.approx(0.0, abs=1e-5)


def test_default_idk_ap_with_evaluation(monkeypatch, tmp_path, tiny_model_dir, hand_forget_quality):
    run(monkeypatch, tmp_path, "--model", tiny_model_dir, "--retain_model", tiny_model_dir, "--subset", "quick",
        "--max_steps", 2, "--batch_size", 4, "--per_device_batch_size", 2, "--max_eval_samples", 2,
        "--max_new_tokens", 3, "--nli_model", "none", "--cs_model", "none")
    # AP's value is checked by hand in test_loss_directions.py (test_idk_ap_step_reports_ap_by_hand)
    after = json.loads((tmp_path / "eval" / "after" / "summary.json").read_text())
    # the quick path caps the other splits at --max_eval_samples but keeps the forget split whole
    assert after["n_forget"] == 40 and "model_utility" in after
    # forget quality by hand. The retain model is the starting model, so "before" compares a
    # model with itself (p = 1; the retain model's forget pass is batched differently, so a
    # truth ratio may differ in the last float bits: KS statistic <= 1/40). "after" is
    # recomputed from the logs, with "before" standing in for the retain model. Catches an FQ
    # from the wrong logs or columns, which the old bound 0 <= FQ <= 1 could not.
    before = json.loads((tmp_path / "eval" / "before" / "summary.json").read_text())
    assert before["ks_statistic"] <= 1 / 40 and before["forget_quality"] == pytest.approx(1.0, abs=1e-12)
    fq, tr_after, tr_before = hand_forget_quality(tmp_path / "eval" / "after", tmp_path / "eval" / "before")
    assert tr_after != tr_before and after["forget_quality"] == pytest.approx(fq, rel=1e-9)
    retain_log = json.loads((tmp_path / "eval" / "after" / "eval_log.json").read_text())
    assert len(retain_log["avg_gt_loss"]) == 2
    assert (tmp_path / "eval" / "before" / "summary.json").exists()


def test_continual_task(monkeypatch, tmp_path, tiny_model_dir):
    run(monkeypatch, tmp_path, "--model", tiny_model_dir, "--forget_task", 2, *SMOKE)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["args"]["forget_task"] == 2 and saved["args"]["retain_model"] is None
    assert saved["derived"]["forget_rows"] == 40


def test_cli_help_and_bad_flag(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["idk_ap.py", "--help"])
    with pytest.raises(SystemExit) as e:
        common.cli(idk_ap.main)
    assert e.value.code == 0 and "--forget_loss" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["idk_ap.py", "--retain_loss", "rt", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        common.cli(idk_ap.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --retain_loss must be")


def test_needs_retain_rows(monkeypatch, tmp_path, tiny_model_dir):
    with pytest.raises(common.TofuError, match="needs retain rows"):
        run(monkeypatch, tmp_path, "--model", tiny_model_dir, *SMOKE, "--quick_retain_authors", 0)
    assert not (tmp_path / "model").exists()


def test_main_is_identical_across_method_scripts():
    assert inspect.getsource(idk_ap.main) == inspect.getsource(rkld.main) == inspect.getsource(me_gd.main) \
        == inspect.getsource(rmu.main)
