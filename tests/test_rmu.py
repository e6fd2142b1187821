"""rmu.py: the activation loss by hand, argument checks, a two-step smoke run of each variant on the
tiny model (full fine-tuning of the chosen modules, LoRA on them, the NLL retain term), only the chosen
parameters moving, and the shared main() and fit(). (Its direction: test_loss_directions.py.)"""
import inspect
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser

import common
import me_gd
import rmu

SMOKE = ["--subset", "quick", "--max_steps", 2, "--batch_size", 2, "--per_device_batch_size", 2, "--eval", "false",
         "--layer", 0, "--lr", 1e-2, "--warmup_epochs", 0]


def parse(*argv):
    return HfArgumentParser(rmu.Args).parse_args_into_dataclasses([str(a) for a in argv])[0]


def test_activation_mse_by_hand():
    # Catches: a token mean over the batch instead of per sequence then over sequences, the sum over d
    # instead of the mean, the mask ignored, a sequence without masked tokens counted (or NaN).
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]],
                      [[2.0, 2.0], [5.0, 5.0], [0.0, 1.0]],
                      [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]])
    target = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    seq0 = (((1 - 1) ** 2 + (2 - 0) ** 2) / 2 + ((3 - 1) ** 2 + (-1 - 0) ** 2) / 2) / 2   # 2 tokens
    seq1 = ((0 - 1) ** 2 + (1 - 0) ** 2) / 2                                               # 1 token
    assert rmu.activation_mse(h, target, mask).item() == pytest.approx((seq0 + seq1) / 2)
    assert rmu.rmu_forget_loss(h, target, mask).item() == pytest.approx((seq0 + seq1) / 2)
    ref = torch.zeros_like(h)
    ref_val = ((1 + 4) / 2 + (9 + 1) / 2) / 2
    assert rmu.rmu_retain_loss(h, ref, mask).item() == pytest.approx((ref_val + 0.5) / 2)
    x = h.clone().requires_grad_(True)
    rmu.rmu_retain_loss(x, ref.requires_grad_(True), mask).backward()
    assert ref.grad is None and x.grad[2].abs().sum() == 0 and x.grad[0, 1].abs().sum() == 0


def test_arguments_and_refusals():
    a = parse()
    assert (a.layer, a.steering_coeff, a.alpha, a.trained_layers, a.trained_modules) == (7, 6.5, 1200.0, "5,6,7",
                                                                                         "mlp.down_proj")
    assert parse("--layer", 1).trained_layers == "0,1"
    a = parse("--layer", 3, "--lora_r", 8, "--trained_modules", "mlp.down_proj,self_attn.o_proj")
    assert a.lora_target_modules == ("layers.1.mlp.down_proj,layers.1.self_attn.o_proj,layers.2.mlp.down_proj,"
                                     "layers.2.self_attn.o_proj,layers.3.mlp.down_proj,layers.3.self_attn.o_proj")
    for argv, msg in [(["--trained_layers", "3,8"], "must name layers from 0 to --layer 7"),
                      (["--trained_layers", "a"], "comma-separated layer numbers"),
                      (["--lora_r", 8, "--trained_modules", "all"], "instead of --trained_modules all"),
                      (["--lora_r", 8, "--lora_target_modules", "q_proj"], "drop --lora_target_modules"),
                      (["--retain_loss", "kl"], "--retain_loss must be activations or gd")]:
        with pytest.raises(common.TofuError, match=msg):
            parse(*argv)


def run(monkeypatch, out, *argv):
    monkeypatch.setattr("sys.argv", ["rmu.py", "--output_dir", str(out), *map(str, argv)])
    rmu.main()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and {"loss/forget", "loss/retain", "lr"} <= set(m) for m in metrics)
    return metrics


@pytest.mark.parametrize("flags", [[], ["--lora_r", 4], ["--retain_loss", "gd", "--trained_modules", "all"]])
def test_smoke_and_only_the_chosen_parameters_move(monkeypatch, tmp_path, tiny_model_dir, flags):
    ms = run(monkeypatch, tmp_path, "--model", tiny_model_dir, *SMOKE, *flags)
    alpha = 1200.0
    for m in ms:
        assert m["loss"] == pytest.approx(m["loss/forget"] + alpha * m["loss/retain"], rel=1e-5)
    if "gd" not in flags:  # step 1: the trained model is the frozen one
        assert ms[0]["loss/retain"] == pytest.approx(0.0, abs=1e-7)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if "all" in flags:
        assert moved and all(k.startswith("model.layers.0.") for k in moved)
    else:  # the default module of layer 0 (with LoRA: the adapter on it, merged at the save)
        assert moved == {"model.layers.0.mlp.down_proj.weight"}


def test_a_layer_the_model_lacks_is_refused(monkeypatch, tmp_path, tiny_model_dir):
    with pytest.raises(common.TofuError, match="--layer 1 must be below the model's last layer"):
        run(monkeypatch, tmp_path, "--model", tiny_model_dir, *SMOKE, "--layer", 1)


def test_cli_help_names_the_sources():
    help_text = HfArgumentParser(rmu.Args).format_help()
    assert "WMDP App. B" in help_text and "open-unlearning RMU.yaml" in help_text


def test_main_and_fit_are_the_shared_ones():
    assert inspect.getsource(rmu.main) == inspect.getsource(me_gd.main)
    assert inspect.getsource(rmu.fit) == inspect.getsource(me_gd.fit)
