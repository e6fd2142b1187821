"""The papers' training protocols: RKLD's first epoch of peak forget quality, closer-look's step counts."""
import json
import math
import types

import pytest
from transformers import HfArgumentParser

import common
from harness import flags, launch
import me_gd
import rkld

EVAL = ["--max_eval_samples", 2, "--max_new_tokens", 2, "--nli_model", "none", "--cs_model", "none"]


def _rkld_peak_run(monkeypatch, model, out, epochs, lr, *extra):
    """rkld.py on the quick subset with --peak_epoch (on by default for a model folder)."""
    monkeypatch.setattr("sys.argv", ["rkld.py", *map(str, [
        "--model", model, "--retain_model", model, "--subset", "quick", "--epochs", epochs, "--batch_size", 20,
        "--per_device_batch_size", 20, "--lr", lr, "--strengthen_epochs", 1, *EVAL, *extra, "--output_dir", out])])
    rkld.main()


def _parse(module, *argv):
    args = HfArgumentParser(module.Args).parse_args_into_dataclasses([str(a) for a in argv])[0]
    return flags.finalize_args(args, module.METHOD, module.QUICK, module.PAPER)


def test_first_peak_keeps_the_earliest_of_equal_epochs():
    from evaluation import method_eval
    ep = lambda *fqs: [{"epoch": i + 1, "forget_quality": f} for i, f in enumerate(fqs)]  # noqa: E731
    assert method_eval.first_peak(ep(0.2, 0.5, 0.5, 0.4))["epoch"] == 2
    assert method_eval.first_peak(ep(0.2, 0.5, 0.5 * (1 + 1e-12), 0.6))["epoch"] == 4
    assert method_eval.first_peak(ep(1.0 - 3e-16, 1.0))["epoch"] == 1  # float noise is no new peak
    assert method_eval.first_peak(ep(None, 1e-30, 3e-30))["epoch"] == 3  # tiny p-values still rank
    assert method_eval.first_peak(ep(None, None)) is None


def test_rkld_paper_default_is_ten_epochs_with_the_peak_epoch(tiny_model_dir):
    a = _parse(rkld, "--model", tiny_model_dir)
    assert (a.epochs, a.peak_epoch, a.save_peak, a.schedule) == (10, True, True, "epochs")
    q = rkld.Args(model="quick")  # the quick CPU path keeps its shorter recipe, evaluated at the end
    assert (rkld.QUICK["epochs"], q.peak_epoch) == (5, None) and "peak_epoch" not in rkld.QUICK
    assert _parse(rkld, "--model", tiny_model_dir, "--eval", "false").peak_epoch is False
    with pytest.raises(common.TofuError, match="needs --eval true"):
        _parse(rkld, "--model", tiny_model_dir, "--eval", "false", "--peak_epoch", "true")


def test_peak_epoch_keeps_and_evaluates_the_first_epoch_of_peak_forget_quality(monkeypatch, tmp_path, tiny_model_dir):
    """Three epochs whose forget quality (a KS p-value over 40 rows, so a few discrete values) ties at
    epochs 2 and 3: the first peak is epoch 2. Its weights are kept and evaluated in full, so the peak
    row's truth ratios are epoch 2's, not the last epoch's; epochs 1-2 are scored on the forget split
    only (no generation). Catches: a later tie replacing the first peak, saving the wrong epoch's
    weights, evaluating the last model as the peak, generating at every epoch."""
    _rkld_peak_run(monkeypatch, tiny_model_dir, tmp_path, 3, 3e-3)
    record = json.loads((tmp_path / "peak_epoch.json").read_text())
    fqs = [e["forget_quality"] for e in record["epochs"]]
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3] and fqs[1] == fqs[2] > fqs[0]
    assert record["peak_epoch"] == 2 and record["weights"] == str(tmp_path / "peak_model")
    assert record["selection"]["forget_quality_evaluations"] == 2 and record["selection"]["seconds"] > 0
    for e in ("epoch1", "epoch2"):  # forget quality alone: the forget split, no generation
        assert not (tmp_path / "eval" / e / "eval_log.json").exists()  # no retain, real-author or world-fact rows
        assert "generated_text" not in json.loads((tmp_path / "eval" / e / "eval_log_forget.json").read_text())
    tr = {n: json.loads((tmp_path / "eval" / n / "eval_log_forget.json").read_text())["truth_ratio"]
          for n in ("epoch2", "peak", "after")}
    assert all(tr["peak"][i] == pytest.approx(v, rel=1e-4) for i, v in tr["epoch2"].items())
    assert any(tr["after"][i] != pytest.approx(v, rel=1e-4) for i, v in tr["epoch2"].items())
    assert (tmp_path / "eval" / "peak" / "eval_log.json").exists()  # the full evaluation at that epoch


def test_without_save_peak_the_checkpoint_goes_after_its_evaluation(monkeypatch, tmp_path, tiny_model_dir):
    _rkld_peak_run(monkeypatch, tiny_model_dir, tmp_path, 2, 1e-12, "--save_peak", "false")
    record = json.loads((tmp_path / "peak_epoch.json").read_text())
    assert record["peak_epoch"] == 1 and record["weights"] is None and not (tmp_path / "peak_model").exists()
    assert (tmp_path / "eval" / "peak" / "summary.json").exists()


@pytest.mark.parametrize("split,n,steps,warmup", [("forget01", 40, 6, 0), ("forget05", 200, 31, 6),
                                                  ("forget10", 400, 62, 12)])
def test_reference_schedule_gives_closer_look_step_counts(split, n, steps, warmup):
    """closer-look forget.py: floor(5 N / 32) steps, floor(N / 32) warmup when > 1 (losses.md section 3),
    here on 2 processes x 4 micro-batches of 4 (its launch) and on 1 process x 8 of 4."""
    assert len(common.load_split(split)) == n
    for world, ga in ((2, 4), (1, 8)):
        acc = types.SimpleNamespace(num_processes=world, gradient_accumulation_steps=ga)
        s = launch.step_counts(n, 4, acc, 5, 1.0, rule="reference")
        assert (s["total_steps"], s["warmup_steps"]) == (steps, warmup)
        e = launch.step_counts(n, 4, acc, 5, 1.0, rule="epochs")  # every epoch in full: a short step per epoch
        assert e["total_steps"] == 5 * math.ceil(math.ceil(n / (4 * world)) / ga) > steps


def test_closer_look_paper_defaults_train_the_reference_steps(monkeypatch, tmp_path, tiny_model_dir):
    """me_gd on forget01 with the paper recipe: 6 optimizer steps (3 of the 5 epochs: 2 steps each, one of
    32 rows and one of 8), no warmup, no clipping, as the reference's HF Trainer does."""
    a = _parse(me_gd, "--model", tiny_model_dir)
    assert (a.schedule, a.max_grad_norm, a.epochs) == ("reference", 0.0, 5)
    monkeypatch.setattr("sys.argv", ["me_gd.py", *map(str, [
        "--model", tiny_model_dir, "--subset", "quick", "--per_device_batch_size", 8, "--pad_to", 0,
        "--eval", "false", "--output_dir", tmp_path])])
    me_gd.main()
    derived = json.loads((tmp_path / "args.json").read_text())["derived"]
    assert (derived["total_steps"], derived["warmup_steps"], derived["grad_accum"]) == (6, 0, 4)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 0, 1, 1, 2, 2]
    # no warmup: step 1 runs at the full rate, then the decay (the logged lr is the one each step used)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-5 * (6 - k) / 6 for k in range(6)])


def test_with_every_epoch_evaluated_the_peak_reuses_its_epoch(monkeypatch, tmp_path, tiny_model_dir):
    """--eval_every_epoch with --peak_epoch: the peak epoch was evaluated in full during training, so its
    row is that evaluation (copied to eval/peak), not a second evaluation of peak_model. Catches the
    peak evaluated twice (a full evaluation wasted per run of the curves) or the wrong epoch copied."""
    from evaluation import method_eval
    names, real = [], method_eval.MethodEval.run
    monkeypatch.setattr(method_eval.MethodEval, "run",
                        lambda self, model, name, *a, **k: names.append(name) or real(self, model, name, *a, **k))
    _rkld_peak_run(monkeypatch, tiny_model_dir, tmp_path, 3, 3e-3, "--eval_every_epoch", "true")
    record = json.loads((tmp_path / "peak_epoch.json").read_text())
    assert record["peak_epoch"] == 2 and names == ["before", "epoch1", "epoch2", "after"]
    peak, epoch2 = (json.loads((tmp_path / "eval" / n / "summary.json").read_text()) for n in ("peak", "epoch2"))
    assert peak == epoch2 and (tmp_path / "eval" / "peak" / "eval_log.json").exists()
