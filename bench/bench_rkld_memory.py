"""Memory and step time of RKLD's two teacher modes, measured on the path rkld.py runs, in one run.

  live        student + frozen original + frozen strengthened model resident while distilling
  precompute  the teacher's log-probs over the forget set written once to a float32 file in the
              run folder (4*V bytes per answer token, paged in by the OS as needed), after which
              the frozen models are freed and only the student trains (rkld.py --precompute_teacher)

Each mode runs rkld.main() itself (--eval false, --max_steps N) in its own subprocess, so one
mode's allocations cannot hide the other's, on the same model, data, seed and steps. The bench
wraps rkld.fit to time the distillation stage and to take its peak memory: on CPU the process's
resident set size, sampled every 10 ms by a thread; on GPU torch.cuda.max_memory_allocated. The
whole process's peak (getrusage) is reported beside it. The parent prints both modes and the
ratios precompute/live.

  python bench/bench_rkld_memory.py                       # quick target of forget01 (finetune.py first)
  python bench/bench_rkld_memory.py --model PATH --strengthened_model PATH --steps 5
"""
import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from harness import launch, models, runlog  # noqa: E402


def strengthened_stand_in(model_path: str, out: Path) -> str:
    """Without a strengthened model at hand, a copy of the target with small weight noise: the
    teacher's cost does not depend on what the strengthened model learned."""
    if not (out / "config.json").exists():
        model, tok = models.load_model(model_path)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        launch.save_prompt_format(models.prompt_format(tok, model_path), out)
    return str(out)


class PeakRSS:
    """The largest resident set size seen while active, sampled by a thread."""

    def __init__(self):
        import psutil
        self.proc, self.peak, self.on = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.on:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> int:
        self.on = False
        self.thread.join()
        return max(self.peak, self.proc.memory_info().rss)


def run_mode(a) -> dict:
    import rkld
    out = common.RUNS_DIR / "bench" / f"rkld_memory_{a.mode}"
    sys.argv = ["rkld.py", "--model", a.model, "--strengthened_model", a.strengthened_model, "--split", a.split,
                "--subset", "all", "--max_steps", str(a.steps), "--batch_size", str(a.batch),
                "--per_device_batch_size", str(a.batch), "--eval", "false", "--precompute_teacher",
                str(a.mode == "precompute"), "--output_dir", str(out)]
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
    t0 = time.time()
    rkld.main()
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"mode": a.mode, "peak_bytes": seen["peak_bytes"], "step_s": seen["seconds"] / a.steps,
            "setup_s": time.time() - t0 - seen["seconds"], "first_loss": losses[0],
            "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="target model (default: the quick forget01 target)")
    p.add_argument("--strengthened_model", default=None, help="default: a noisy copy of --model (see docstring)")
    p.add_argument("--split", default="forget01")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="distillation steps (the first includes warm-up)")
    p.add_argument("--mode", choices=["live", "precompute"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a)))
        return
    a.model = a.model or models.quick_model(a.split, "target")
    a.strengthened_model = a.strengthened_model or strengthened_stand_in(
        a.model, common.RUNS_DIR / "bench" / "strengthened_stand_in")
    res = {}
    for mode in ("live", "precompute"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", a.model, "--strengthened_model",
               a.strengthened_model, "--split", a.split, "--batch", str(a.batch), "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    live, pre = res["live"], res["precompute"]
    gib = 2 ** 30
    print(f"RKLD teacher modes, rkld.main() on {a.model} ({a.split}, batch {a.batch}, {a.steps} steps, {live['device']})")
    print(runlog.table([(m, r["peak_bytes"] / gib, r["process_peak_bytes"] / gib, r["step_s"], r["setup_s"],
                         r["first_loss"]) for m, r in res.items()],
                       ("mode", "peak GiB (distilling)", "process peak GiB", "s/step", "setup s", "first loss")))
    print(f"precompute/live: memory while distilling {pre['peak_bytes'] / live['peak_bytes']:.2f}x, "
          f"step time {pre['step_s'] / live['step_s']:.2f}x; first losses agree to "
          f"{abs(pre['first_loss'] - live['first_loss']):.2e}")


if __name__ == "__main__":
    main()
