"""Numerics of the GPU path, emulated on CPU: bf16 autocast for the trained model and bf16 frozen models
(TOFU_UNLEARN_MIXED_PRECISION=bf16, the switch models.mixed_precision reads)."""
import json
import math

import pytest
import torch

from harness import launch, models
import distributed
import rkld


def _first_losses(tmp_path, tiny_model_dir, *flags):
    out = tmp_path / "_".join(map(str, flags)) if flags else tmp_path / "default"
    distributed.launch("ddp", "baselines.py", "--method", "npo_kl", "--model", tiny_model_dir, "--subset", "quick",
                       "--max_steps", 1, "--batch_size", 4, "--per_device_batch_size", 4, "--pad_to", 0, "--eval",
                       "false", "--output_dir", out, *flags, world=1, env={"TOFU_UNLEARN_MIXED_PRECISION": "bf16"})
    derived = json.loads((out / "args.json").read_text())["derived"]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0]), derived


def test_reference_model_log_ratios_are_exactly_zero_at_the_start_under_bf16(tmp_path, tiny_model_dir):
    """NPO at theta = theta_ref: -(2/beta) log sigmoid(0) = 20 ln 2, and KL(p_ref || p_theta) = 0, exactly,
    when the reference runs in the trained model's precision (fp32 weights, bf16 autocast). With bf16
    reference weights (the old default) neither holds. Catches a reference model placed without the
    trained model's autocast or loaded in bf16 by default."""
    m, derived = _first_losses(tmp_path, tiny_model_dir)
    assert derived["world_size"] == 1 and m["loss/forget"] == pytest.approx(20 * math.log(2), abs=1e-6)
    assert m["loss/retain"] == pytest.approx(0.0, abs=1e-7)
    m16, _ = _first_losses(tmp_path, tiny_model_dir, "--ref_precision", "bf16")
    assert abs(m16["loss/forget"] - 20 * math.log(2)) > 1e-4 and m16["loss/retain"] > 1e-8


def test_teacher_logits_lose_no_bf16_rounding_at_the_head(tiny_model_dir):
    """The RKLD teacher from bf16 frozen models under bf16 autocast, against the same (bf16-representable)
    weights computed in fp32. With the fp32 output head the teacher's worst error is well below the bf16
    head's (the old path), whose logits sit on the bf16 grid (0.125 apart at 16-32) before alpha = 8
    multiplies their difference; the layers' bf16 matmuls below the head remain in both. The head's
    weights are scaled so logits reach 8-50, as real models' do."""
    def teacher(dtype, fp32_head):
        pair = []
        for noise in (0.0, 0.002):
            m = models.load_model(str(tiny_model_dir), dtype=torch.float32, frozen=True)[0]
            torch.manual_seed(1)
            with torch.no_grad():
                m.get_output_embeddings().weight.mul_(60.0)
                for p in m.parameters():
                    p.add_(noise * torch.randn_like(p))
                    p.copy_(p.to(torch.bfloat16).float())  # the bf16 model's weights, exactly
            m = m.to(dtype)
            pair.append(launch.fp32_output_head(m) if fp32_head else m)
        return rkld.Teacher(*pair, 8.0)

    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        exact = teacher(torch.float32, False)(input_ids=ids).logits
        assert 8 < exact.abs().max() < 200
        with torch.autocast("cpu", dtype=torch.bfloat16):
            old = teacher(torch.bfloat16, False)(input_ids=ids).logits
            new = teacher(torch.bfloat16, True)(input_ids=ids).logits
    worst_old, worst_new = (old - exact).abs().max().item(), (new - exact).abs().max().item()
    assert new.dtype == torch.float32 and worst_new < worst_old / 2, (worst_old, worst_new)
    assert (new - exact).abs().mean() < (old - exact).abs().mean()


def test_retain_and_trained_models_are_evaluated_at_one_precision(tmp_path, tiny_model_dir):
    """Under emulated bf16 the starting, unlearned and retain models' evaluations record the same
    precision (the retain model is loaded at the trained model's); a bf16 retain model is refused."""
    out = tmp_path / "run"
    distributed.launch("ddp", "baselines.py", "--method", "ga", "--model", tiny_model_dir, "--retain_model",
                       tiny_model_dir, "--subset", "quick", "--max_steps", 1, "--batch_size", 4,
                       "--per_device_batch_size", 4, "--max_eval_samples", 2, "--max_new_tokens", 2, "--nli_model",
                       "none", "--cs_model", "none", "--output_dir", out, world=1,
                       env={"TOFU_UNLEARN_MIXED_PRECISION": "bf16", "TOFU_UNLEARN_RUNS": str(tmp_path / "runs")})
    precisions = {json.loads((out / "eval" / n / "summary.json").read_text())["settings"]["precision"]
                  for n in ("before", "after")}
    retain = next((tmp_path / "runs" / "eval_cache").glob("*/summary.json"), None)
    retain_precisions = {json.loads(p.read_text())["settings"]["precision"]
                         for p in (tmp_path / "runs" / "eval_cache").glob("*/summary.json")}
    assert retain is not None and precisions == retain_precisions == {"fp32 weights, bf16 autocast"}
