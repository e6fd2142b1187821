"""Resident memory of RKLD with one base model (LoRA) against the three-copy path, measured on the path
rkld.py runs, in one run.

  three_copies  full fine-tuning (--lora_r 0): the student (fp32 weights, gradients, two Adam moments)
                beside a frozen original model and a frozen strengthened model, the live teacher
  one_base      --lora_r 8 (Closer-Look App. E.8): one base model carrying two adapters, the trained one
                and the strengthening one; the teacher runs the base with the strengthening adapter on
                and off (models.AdapterView), the student with its own adapter

Each mode runs rkld.main() itself (--eval false, --precompute_teacher false, --max_steps N) in its own
subprocess, on the same model, data, seed and steps, with a strengthened model built once beforehand
(strengthening is its own stage, released before distillation; its cost is not what is compared): a
LoRA adapter with small random weights, given to one_base as the adapter and to three_copies merged
into a full model (the teacher's cost does not depend on what strengthening learned). The bench wraps
rkld.fit to take the distillation stage's peak: on CPU the process's resident set size sampled every
10 ms (also shown above the RSS the process had before loading any model), on GPU
torch.cuda.max_memory_allocated. The parent prints both modes and the ratio one_base / three_copies.

  python bench/bench_rkld_lora_memory.py                          # the embedded SmolLM2-135M (offline)
  python bench/bench_rkld_lora_memory.py --model PATH --steps 5
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from harness import launch, models, runlog  # noqa: E402
from bench_rkld_memory import PeakRSS  # noqa: E402


def strengthened_stand_ins(model_path: str, out: Path) -> tuple[str, str]:
    """(adapter folder, merged full model) of one LoRA adapter with small random weights on --model."""
    adapter, full = out / "adapter", out / "full"
    if not (full / "config.json").exists():
        acc = launch.make_accelerator(1, 1)[0]
        args = SimpleNamespace(model=model_path, lora_r=8, lora_alpha=32.0, lora_dropout=0.0,
                               lora_target_modules="all-linear", save_adapter_only=False, gradient_checkpointing=False)
        model = models.load_trained(args, acc)
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(1e-3 * torch.randn_like(p))
        tok = models.load_tokenizer(model_path)
        fmt = models.prompt_format(tok, model_path)
        launch.save_model(acc, model, tok, fmt, adapter, adapter_only=True)
        launch.save_model(acc, model, tok, fmt, full)
    return str(adapter), str(full)


def run_mode(a) -> dict:
    import psutil
    start_rss = psutil.Process().memory_info().rss  # after imports, before any model is loaded
    import rkld
    out = common.RUNS_DIR / "bench" / f"rkld_lora_memory_{a.mode}"
    lora = ["--lora_r", "8"] if a.mode == "one_base" else []
    sys.argv = ["rkld.py", "--model", a.model, "--strengthened_model", a.strengthened_model, "--split", a.split,
                "--subset", "all", "--max_steps", str(a.steps), "--batch_size", str(a.batch),
                "--per_device_batch_size", str(a.batch), "--eval", "false", "--precompute_teacher", "false",
                "--overwrite", *lora, "--output_dir", str(out)]
    seen, fit = {}, rkld.fit

    def measured_fit(*args, **kw):  # the distillation stage (no strengthening stage: --strengthened_model)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sampler, t0 = PeakRSS(), time.time()
        model = fit(*args, **kw)
        if cuda:
            torch.cuda.synchronize()
        seen.update(seconds=time.time() - t0, peak_bytes=torch.cuda.max_memory_allocated() if cuda else sampler.stop())
        return model
    rkld.fit = measured_fit
    rkld.main()
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"mode": a.mode, "peak_bytes": seen["peak_bytes"], "start_rss": start_rss, "step_s": seen["seconds"] / a.steps,
            "first_loss": losses[0], "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to unlearn (default: the embedded SmolLM2-135M)")
    p.add_argument("--split", default="forget01")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="distillation steps (the first includes warm-up)")
    p.add_argument("--mode", choices=["three_copies", "one_base"], help=argparse.SUPPRESS)
    p.add_argument("--strengthened_model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a)))
        return
    a.model = models.resolve_model_path(a.model)
    adapter, full = strengthened_stand_ins(a.model, common.RUNS_DIR / "bench" / "lora_strengthened_stand_in")
    res = {}
    for mode, strengthened in (("three_copies", full), ("one_base", adapter)):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", a.model, "--strengthened_model", strengthened,
               "--split", a.split, "--batch", str(a.batch), "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    full_, one = res["three_copies"], res["one_base"]
    gib = 2 ** 30
    print(f"RKLD, live teacher, rkld.main() on {a.model} ({a.split}, batch {a.batch}, {a.steps} steps, {one['device']})")
    print(runlog.table([(m, r["peak_bytes"] / gib, (r["peak_bytes"] - r["start_rss"]) / gib if r["device"] == "cpu"
                         else r["peak_bytes"] / gib, r["process_peak_bytes"] / gib, r["step_s"], r["first_loss"])
                        for m, r in res.items()],
                       ("mode", "peak GiB (distilling)", "above start GiB", "process peak GiB", "s/step", "first loss")))
    above = lambda r: r["peak_bytes"] - (r["start_rss"] if r["device"] == "cpu" else 0)  # noqa: E731
    print(f"one_base/three_copies: peak memory while distilling {one['peak_bytes'] / full_['peak_bytes']:.2f}x, "
          f"above the start {above(one) / above(full_):.2f}x, step time {one['step_s'] / full_['step_s']:.2f}x; "
          f"first losses {full_['first_loss']:.6f} and {one['first_loss']:.6f} (the same teacher and starting student)")


if __name__ == "__main__":
    main()
