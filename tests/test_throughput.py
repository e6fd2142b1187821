"""bench/throughput.py on the tiny model: the two sides take turns step by step, compute the same per-step
losses on the same batches, every method gets a ratio, and a Trainer fed the batches in another order is
caught. Timings are not asserted (a tiny model on a shared CPU measures noise)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import throughput  # noqa: E402

QUICK_RUN = ["--steps", "2", "--warmup", "1", "--rounds", "1", "--batch", "2"]


def test_both_sides_compute_the_same_steps(tmp_path, tiny_model_dir, capsys):
    out = throughput.main(["--model", str(tiny_model_dir), "--methods", "me_gd,npo_gd", *QUICK_RUN,
                           "--json", str(tmp_path / "tp.json")])
    assert json.loads((tmp_path / "tp.json").read_text())["methods"].keys() == {"me_gd", "npo_gd"}
    for name, r in out["methods"].items():
        assert len(r["losses_ours"]) == len(r["losses_trainer"]) == 4  # warmup + steps + the step that ends the timing
        assert r["losses_trainer"] == pytest.approx(r["losses_ours"], rel=1e-4)
        assert len(set(r["losses_ours"])) > 1  # the weights moved: agreement is not just the starting model's
        assert r["same_tokens"] and all(t > 0 for t in r["tokens_per_step"])
        assert r["ratio"] > 0 and r["ratio"] == pytest.approx(r["ours_tok_s"] / r["trainer_tok_s"])
        assert r["ratio_cpu"] == pytest.approx(r["ours_tok_cpu_s"] / r["trainer_tok_cpu_s"]) and r["ratio_cpu"] > 0
        assert r["ratio_cpu_rounds"] == [pytest.approx(o / t) for o, t in  # one round: its pair is the median's
                                         zip(r["ours_rounds_tok_cpu_s"], r["trainer_rounds_tok_cpu_s"])]
    assert out["config"]["cores_allowed"] and len(out["config"]["load_before"]) == 3
    assert out["methods"]["me_gd"]["forwards_per_step"] == {"trained": 2, "frozen": 0}
    assert out["methods"]["npo_gd"]["forwards_per_step"] == {"trained": 2, "frozen": 1}  # the reference model
    table = capsys.readouterr().out.split("ours/Trainer")[1]
    assert "me_gd" in table and "npo_gd" in table


def test_trainer_given_other_batch_order_is_a_mismatch(tmp_path, tiny_model_dir, monkeypatch):
    run_trainer = throughput.run_trainer
    monkeypatch.setattr(throughput, "run_trainer", lambda s, a, out, baton: run_trainer(
        {**s, "batches": s["batches"][::-1]}, a, out, baton))
    with pytest.raises(SystemExit) as e:
        throughput.main(["--model", str(tiny_model_dir), "--methods", "ga_gd", *QUICK_RUN])
    assert e.value.code == 1


def test_sides_take_turns_step_by_step(tmp_path, tiny_model_dir):
    out = throughput.main(["--model", str(tiny_model_dir), "--methods", "npo_gd", *QUICK_RUN, "--rounds", "2"])
    r = out["methods"]["npo_gd"]
    assert r["losses_agree"] and r["same_tokens"]
    assert r["forwards_per_step"] == {"trained": 2, "frozen": 1}  # the other side's reference forwards not counted
    spans = sorted([(*sp, "ours") for sp in r["spans"]["ours"]] + [(*sp, "trainer") for sp in r["spans"]["trainer"]])
    assert len(spans) == 2 * 2 * 2  # sides x rounds x timed steps
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        assert end <= start  # one side computes at a time
    sides = [side for *_, side in spans]
    assert sides[:4] == ["ours", "trainer"] * 2 and sides[4:] == ["trainer", "ours"] * 2  # the first side alternates
    for side in ("ours", "trainer"):  # every timed step kept, round after round: a step runs over its turn's span
        assert r["step_s"][side] == [pytest.approx(end - start) for start, end in r["spans"][side]]
        assert len(r["step_cpu_s"][side]) == 2 * 2 and min(r["step_cpu_s"][side]) > 0


def test_a_side_that_fails_stops_both(tiny_model_dir, monkeypatch):
    def broken(s, a, out, baton):
        baton.wait("trainer")
        raise ZeroDivisionError("planted")
    monkeypatch.setattr(throughput, "run_trainer", broken)
    with pytest.raises(ZeroDivisionError, match="planted"):  # the Trainer's own error, not a hang or ours' wait
        throughput.main(["--model", str(tiny_model_dir), "--methods", "ga_gd", *QUICK_RUN])
