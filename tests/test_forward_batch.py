"""--forward_batch: one forward of several micro-batches gives the micro-batch path's numbers.

Each case trains the tiny model for two optimizer steps of an effective batch of 32 in micro-batches of 4
on forget01's 40 quick rows: step 1 is a full window of 8 micro-batches, step 2 the epoch's short last
window of 2 (weighted by launch.window_weight). Once with --forward_batch 4 (one micro-batch a forward,
the path before the flag) and once with --forward_batch 32 (the whole window in one forward and one
backward): the logged losses (per-micro-batch losses averaged over the step) agree to rel 1e-5 and the
saved weights to atol 1e-6. Every method of every training script runs here in one process; the
two-process cases (DDP, FSDP2) are in tests/test_distributed.py.
"""
import json
import os
import runpy

import pytest
import torch
from safetensors.torch import load_file

import baselines
from harness import forward_batch, launch

REPO = launch.common.REPO
STEPS = ["--recipe", "quick", "--subset", "quick", "--batch_size", 32, "--per_device_batch_size", 4, "--epochs", 1, "--schedule", "epochs",
         "--warmup_epochs", 0, "--lr", 1e-4, "--seed", 3, "--max_grad_norm", 0]
UNLEARN = [*STEPS, "--eval", "false"]
RKLD = [*UNLEARN, "--strengthen_epochs", 1, "--strengthen_lr", 1e-2]
CASES = {  # name -> (script, arguments after --model and --output_dir)
    **{m: ("baselines.py", ["--method", m, *UNLEARN]) for m in baselines.METHODS if m not in ("ta", "pdu")},  # ta: no training
    "pdu": ("baselines.py", ["--method", "pdu", *UNLEARN, "--dual_warmup_epochs", 0]),  # lam moves after step 1
    "rkld": ("rkld.py", RKLD),                                                     # precomputed teacher (quick)
    "rkld_live_kl": ("rkld.py", [*RKLD, "--precompute_teacher", "false", "--retain_loss", "kl"]),
    "me_gd": ("me_gd.py", UNLEARN),
    "me_gd_kl": ("me_gd.py", [*UNLEARN, "--retain_loss", "kl"]),
    "idk_ap": ("idk_ap.py", UNLEARN),
    "idk_dpo_kl": ("idk_ap.py", [*UNLEARN, "--forget_loss", "dpo", "--retain_loss", "kl"]),
    "rmu": ("rmu.py", [*UNLEARN, "--layer", 0]),
    "rmu_gd": ("rmu.py", [*UNLEARN, "--layer", 0, "--retain_loss", "gd"]),
    # LoRA: the reference is the trained model's own base (models.AdapterView), batched like the trained model
    "npo_kl_lora": ("baselines.py", ["--method", "npo_kl", *UNLEARN, "--lora_r", 8]),
    "finetune": ("finetune.py", ["--subset", "quick", "--quick_retain_authors", 0, "--build", "target", *STEPS,
                                 "--report_rows", 2]),
}


# In the default suite: one case for each way a loss calls the models (a reference under no_grad, the trained
# model under no_grad (KTO), a LoRA adapter view, PDU's dual variable, the teacher store and the live teacher, hidden states, the
# model's own loss in finetune.py); TOFU_FULL_MATRIX=1 runs every method (about 5 min on 2 cores).
DEFAULT = ("npo_kl", "npo_kl_lora", "dpo_gd", "kto_kl", "pdu", "rkld", "rkld_live_kl", "me_gd_kl", "idk_dpo_kl", "rmu", "finetune")
MATRIX = [n for n in CASES if n in DEFAULT or os.environ.get("TOFU_FULL_MATRIX") == "1"]


def train(monkeypatch, tmp_path, model_dir, name, forward_batch):
    """(logged metrics, saved weights) of case `name` run in this process at --forward_batch."""
    script, argv = CASES[name]
    out = tmp_path / f"fb{forward_batch}"
    where = ["--output_root", out] if script == "finetune.py" else ["--output_dir", out]
    monkeypatch.setattr("sys.argv", [script, *map(str, ["--model", model_dir, *argv, *where,
                                                        "--forward_batch", forward_batch])])
    runpy.run_path(str(REPO / script), run_name="__main__")
    if script == "finetune.py":
        out = next(p for p in out.iterdir() if (p / "metrics.jsonl").exists())
        weights = out / "model.safetensors"
    else:
        weights = out / "model" / "model.safetensors"
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], load_file(weights)


def assert_same(a, b):
    (m1, w1), (m2, w2) = a, b
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2]
    for x, y in zip(m1, m2):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (k, x, y)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", MATRIX)
def test_one_forward_of_the_window_equals_eight_micro_batches(name, monkeypatch, tmp_path, tiny_model_dir):
    # Catches: one mean over all 32 rows instead of the mean of the 8 micro-batch means; the short last
    # window's weight dropped; a micro-batch given another one's rows or its padded length mis-sliced;
    # a frozen model run per micro-batch on the wrong rows; accelerate counting micro-batches, not forwards.
    assert_same(train(monkeypatch, tmp_path, tiny_model_dir, name, 4),
                train(monkeypatch, tmp_path, tiny_model_dir, name, 32))


def test_forward_batch_refusals():
    # Catches: a forward that straddles two optimizer steps (6 micro-batches of a window of 8), or a
    # forward of a part of a micro-batch, run instead of refused.
    assert forward_batch.micro_batches_per_forward("32", 4, 8) == 8 and forward_batch.micro_batches_per_forward("auto", 4, 8) is None
    for value, msg in (("24", "6 micro-batches of 4, which does not divide this process's accumulation window of 8; "
                               r"choose one of \[4, 8, 16, 32\]"),
                       ("6", "must be a multiple of --per_device_batch_size 4"), ("0", "auto or a number of rows"),
                       ("big", "auto or a number of rows")):
        with pytest.raises(launch.common.TofuError, match=msg):
            forward_batch.micro_batches_per_forward(value, 4, 8)


def test_auto_probe_takes_the_largest_that_fits_and_leaves_no_trace(tiny_model_dir, monkeypatch):
    # Catches: a probe that stops at the first size that fits from below, leaves gradients or moves the
    # random state (dropout, sampling after it), or counts a probe step in PDU's dual variable.
    from accelerate import Accelerator
    from harness import models
    model = models.load_model(str(tiny_model_dir))[0]
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    rows = launch.common.load_split("forget01")[:12]
    ds = launch.common.QADataset(rows, tok, fmt, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: launch.common.collate(b, tok.pad_token_id))
    seen, dual = [], baselines.DualVariable(1.0, 0.1, 1.0, 0)

    def loss_fn(m, b):
        group = forward_batch.ForwardGroup.active
        seen.append(len(group.batches))
        if len(group.batches) > 2:  # what a GPU that fits two micro-batches a forward says
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        loss = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        dual.observe(loss, forward_batch.ends_step())
        return {"loss": loss + 0 * torch.rand(())}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    state = torch.random.get_rng_state()
    k = forward_batch.probe_forward_size(Accelerator(cpu=True), model, loader, loss_fn, 2, 8)
    assert k == 2 and seen == [8, 4, 2, 2]            # 8 and 4 micro-batches fail, 2 fits (both of its losses)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters()) and dual.n == 0
