"""baselines.py: argument resolution, a two-step smoke run of every method, reference models
loaded only where used, task arithmetic on the saved weights, and main() identical to rkld.py's.
(The loss functions themselves are checked by hand in test_losses_baselines.py.)"""
import inspect
import json
import math

import pytest
import torch
from transformers import HfArgumentParser

import baselines
import common
from harness import flags, models
import rkld

ALL = ["ga", "ga_gd", "ga_kl", "npo", "npo_gd", "npo_kl", "dpo", "dpo_gd", "dpo_kl", "kto", "kto_gd", "kto_kl",
       "idk", "idk_gd", "simnpo", "simnpo_gd", "undial", "ta", "wga", "wga_gd", "wga_kl", "satimp", "satimp_gd",
       "ce_u", "pdu"]
NO_REF = {"ga", "ga_gd", "idk", "idk_gd", "simnpo", "simnpo_gd", "ta", "wga", "wga_gd", "satimp", "satimp_gd", "ce_u",
          "pdu"}
WITH_RETAIN = {"ga_gd", "ga_kl", "npo_gd", "npo_kl", "dpo_gd", "dpo_kl", "kto_gd", "kto_kl", "idk_gd", "simnpo_gd",
               "wga_gd", "wga_kl", "satimp_gd", "pdu"}
# At step 1 the trained model still equals the reference, so log-ratios are 0:
# NPO and DPO give -(2/beta) log sigmoid(0) = 20 ln 2, KTO gives 1 - (2/beta) sigmoid(0) = -9.
FIRST_FORGET = {"npo": 20 * math.log(2), "dpo": 20 * math.log(2), "kto": -9.0}
SMOKE = ["--subset", "quick", "--max_steps", 2, "--batch_size", 2, "--per_device_batch_size", 2, "--eval", "false"]


def parse(*argv):
    return HfArgumentParser(baselines.Args).parse_args_into_dataclasses([str(a) for a in argv])[0]


def run(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["baselines.py", *map(str, argv)])
    baselines.main()


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_main_is_byte_identical_to_rkld_main():
    assert inspect.getsource(baselines.main) == inspect.getsource(rkld.main)


def test_method_table():
    assert list(baselines.METHODS) == ALL
    for alias, name in baselines.ALIASES.items():   # RKLD's "X+RT" names
        assert alias.endswith("_rt") and name == alias[:-3] + "_gd" and name in baselines.METHODS
    assert {r for _, r in baselines.METHODS.values()} == {None, "gd", "kl"}


def test_argument_resolution(tiny_model_dir):
    a = parse("--method", "ga_rt")
    assert a.method == "ga_gd" and a.forget_weight == 1.0 and a.beta is None
    a = flags.finalize_args(parse("--method", "ga_rt", "--model", tiny_model_dir), "baselines", {}, {})
    model = f"model_{tiny_model_dir.name}"                                 # a local folder: by its name
    assert a.output_dir == str(common.RUNS_DIR / "ga_gd" / f"forget01-{model}")  # named after --method
    a = flags.finalize_args(parse("--method", "npo", "--beta", 0.1, "--model", tiny_model_dir), "baselines", {}, {})
    assert a.output_dir == str(common.RUNS_DIR / "npo" / f"forget01-{model}")    # npo's own beta: not named
    a = flags.finalize_args(parse("--method", "npo", "--beta", 0.2, "--model", tiny_model_dir), "baselines", {}, {})
    assert a.output_dir == str(common.RUNS_DIR / "npo" / f"forget01-{model}-beta_0.2")
    a = parse("--method", "simnpo", "--split", "forget05", "--forget_task", 2)
    assert (a.beta, a.delta, a.forget_weight) == (4.5, 0.0, 0.125)
    a = flags.finalize_args(parse("--method", "simnpo", "--split", "forget05", "--forget_task", 2, "--model",
                                  tiny_model_dir), "baselines", {}, {})
    assert a.output_dir == str(common.RUNS_DIR / "simnpo" / f"forget05-task2-{model}")
    a = parse("--method", "simnpo_gd", "--forget_weight", 1, "--beta", 2, "--output_dir", "elsewhere")
    assert (a.forget_weight, a.beta, a.output_dir) == (1.0, 2.0, "elsewhere")
    assert [parse("--method", m).beta for m in ("npo_kl", "dpo", "kto_gd", "undial")] == [0.1, 0.1, 0.1, 10.0]
    a = parse("--method", "undial", "--model", "org/real-model")          # open-unlearning recipe
    assert (a.lr, a.epochs) == (1e-4, 10)
    a = parse("--method", "undial")                                       # quick: the quick recipe fills these
    assert (a.lr, a.epochs) == (None, None)
    assert parse("--method", "ta").epochs == 0
    with pytest.raises(common.TofuError, match="'gradient_ascent' is unknown; valid: ga, ga_gd, ga_kl, npo"):
        parse("--method", "gradient_ascent")
    with pytest.raises(common.TofuError, match="--method is required"):
        parse()
    with pytest.raises(common.TofuError, match="ta does not train"):
        parse("--method", "ta", "--epochs", 3)


def test_newer_baselines_take_open_unlearnings_defaults():
    # Catches a default that drifted from open-unlearning's TOFU configs (WGA.yaml, SatImp.yaml, CEU.yaml,
    # community/methods/PDU/run.sh) or the pdu warmup that never lets the dual variable move on the quick path.
    a = parse("--method", "wga_gd")
    assert (a.beta, a.forget_weight, a.retain_weight) == (1.0, 1.0, 1.0)
    a = parse("--method", "satimp_gd")
    assert (a.beta, a.beta2, a.forget_weight, a.retain_weight) == (5.0, 1.0, 0.1, 1.0)
    assert parse("--method", "ce_u").ceu_skip_first == 1 and baselines.METHODS["ce_u"] == ("ce_u", None)
    a = parse("--method", "pdu")
    assert (a.forget_weight, a.retain_weight, a.retain_bound, a.dual_step, a.dual_warmup_epochs) == (1.0, 100.0, 0.3, 5.0, 0.0)
    a = parse("--method", "pdu", "--model", "org/real-model")
    assert (a.epochs, a.dual_warmup_epochs) == (10, 5.0)
    assert parse("--method", "npo_gd").retain_weight == 1.0
    with pytest.raises(common.TofuError, match="--dual_step must be"):
        parse("--method", "pdu", "--dual_step", -1)


@pytest.mark.parametrize("method", ["npo", "dpo_kl", "kto_gd", "simnpo"])
def test_beta_is_checked_at_parse_time_where_a_loss_divides_by_it(method):
    """Catches the check that ran only in setup_frozen, after the data, the evaluation and the
    models had loaded; undial's beta is a logit penalty, not a divisor, so 0 is allowed there."""
    with pytest.raises(common.TofuError, match=f"--beta must be positive for {method} .*, not 0.0"):
        parse("--method", method, "--beta", 0)
    with pytest.raises(common.TofuError, match="--beta must be positive"):
        parse("--method", method, "--beta", -0.1)
    assert parse("--method", "undial", "--beta", 0).beta == 0.0
    with pytest.raises(common.TofuError, match="--strengthen_lr must be positive"):
        parse("--method", "ta", "--strengthen_lr", -1)


def test_cli_reports_an_unknown_method_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["baselines.py", "--method", "npo_rkl"])
    with pytest.raises(SystemExit) as e:
        common.cli(baselines.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "simnpo_gd, undial, ta, wga" in err


@pytest.fixture
def frozen_seen(monkeypatch):
    """What setup_frozen returned during the run."""
    seen, setup = {}, baselines.setup_frozen
    monkeypatch.setattr(baselines, "setup_frozen", lambda *a: seen.update(setup(*a)) or dict(seen))
    return seen


@pytest.mark.parametrize("method", [m for m in ALL if m != "ta"])
def test_smoke_every_method(monkeypatch, tmp_path, tiny_model_dir, frozen_seen, method):
    extra = ["--dual_warmup_epochs", 0] if method == "pdu" else []  # a real model's default waits 5 epochs
    run(monkeypatch, "--method", method, "--model", tiny_model_dir, *SMOKE, *extra, "--output_dir", tmp_path)
    ms = metrics(tmp_path)
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        assert {"loss", "loss/forget", "lr", "epoch"} <= set(m) and ("loss/retain" in m) == (method in WITH_RETAIN)
        assert all(math.isfinite(m[k]) for k in ("loss", "loss/forget"))
        w = {"simnpo": 0.125, "satimp": 0.1}.get(method.split("_")[0], 1.0)
        if method == "pdu":  # lam * (retain NLL - eps), lam starting at 100 and moving after step 1
            assert m["loss"] == pytest.approx(m["loss/forget"] + m["pdu/lambda"] * (m["loss/retain"] - 0.3), rel=1e-5)
        else:
            assert m["loss"] == pytest.approx(w * m["loss/forget"] + m.get("loss/retain", 0.0), rel=1e-5, abs=1e-6)
    forget, retain = baselines.METHODS[method]
    if forget in FIRST_FORGET:
        assert ms[0]["loss/forget"] == pytest.approx(FIRST_FORGET[forget], abs=1e-4)
    if retain == "kl":
        assert ms[0]["loss/retain"] == pytest.approx(0.0, abs=1e-5)   # KL(p_ref || p_theta) with theta = ref
    assert {"ga": ms[0]["loss/forget"] < 0, "idk": ms[0]["loss/forget"] > 0, "wga": ms[0]["loss/forget"] < 0,
            "satimp": ms[0]["loss/forget"] < 0, "ce_u": ms[0]["loss/forget"] > 0,
            "pdu": ms[0]["loss/forget"] > 0}.get(forget, True)
    if forget == "pdu":  # the dual variable: lam_0 = 100, then lam_1 = max(0, 100 + 5 * (step 1's retain NLL - 0.3))
        assert ms[0]["pdu/lambda"] == 100.0
        assert ms[1]["pdu/lambda"] == pytest.approx(max(0.0, 100 + 5 * (ms[0]["loss/retain"] - 0.3)), rel=1e-6)
    assert (frozen_seen["ref"] is None) == (method in NO_REF)
    assert (tmp_path / "model" / "config.json").exists()


def test_missing_retain_rows_stop_before_training(monkeypatch, tmp_path, tiny_model_dir):
    with pytest.raises(common.TofuError, match="npo_gd needs retain rows"):
        run(monkeypatch, "--method", "npo_gd", "--model", tiny_model_dir, *SMOKE, "--quick_retain_authors", 0,
            "--output_dir", tmp_path)
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------- task arithmetic
def _weights(path):
    return models.load_model(str(path), dtype=torch.float32)[0].state_dict()


def _assert_negated(out, ori_dir, str_dir, lam):
    ori, strong, got = _weights(ori_dir), _weights(str_dir), _weights(out / "model")
    assert set(got) == set(ori)
    moved = 0.0
    for name, theta in got.items():
        torch.testing.assert_close(theta, ori[name] - lam * (strong[name] - ori[name]), rtol=0, atol=1e-6)
        moved = max(moved, (theta - ori[name]).abs().max().item())
    assert moved > 1e-3   # the strengthened model really differs, so the check has teeth


@pytest.fixture(scope="module")
def ta_run(tiny_model_dir, tmp_path_factory):
    """One ta run that builds its own (briefly) strengthened model; the other test reuses it."""
    out = tmp_path_factory.mktemp("ta")
    mp = pytest.MonkeyPatch()
    run(mp, "--method", "ta", "--model", tiny_model_dir, *SMOKE, "--batch_size", 8, "--per_device_batch_size", 8,
        "--strengthen_epochs", 1, "--strengthen_lr", 1e-2, "--output_dir", out)
    mp.undo()
    return out


def test_ta_builds_the_strengthened_model_and_saves_the_negation(ta_run, tiny_model_dir):
    assert (ta_run / "strengthened" / "config.json").exists()
    assert metrics(ta_run) == []
    assert json.loads((ta_run / "args.json").read_text())["derived"]["total_steps"] == 0
    _assert_negated(ta_run, tiny_model_dir, ta_run / "strengthened", 1.0)


def test_ta_reuses_a_strengthened_model_with_lambda(monkeypatch, tmp_path, ta_run, tiny_model_dir, frozen_seen):
    run(monkeypatch, "--method", "ta", "--model", tiny_model_dir, *SMOKE, "--ta_lambda", 0.5,
        "--strengthened_model", ta_run / "strengthened", "--output_dir", tmp_path)
    assert not (tmp_path / "strengthened").exists() and frozen_seen["ref"] is None
    _assert_negated(tmp_path, tiny_model_dir, ta_run / "strengthened", 0.5)


def test_ta_rejects_a_mismatched_strengthened_model(monkeypatch, tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = tmp_path / "other_vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=401, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    models.load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    with pytest.raises(common.TofuError, match="other tensors or shapes than --model"):
        run(monkeypatch, "--method", "ta", "--model", tiny_model_dir, *SMOKE, "--strengthened_model", other,
            "--output_dir", tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
