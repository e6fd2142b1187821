"""Memory and step time of RKLD's two teacher modes, measured in one run.

  live        student + frozen original + frozen strengthened model resident while distilling
  precompute  teacher log-probs over the forget set computed once (kept on CPU), then only
              the student is resident (rkld.py --precompute_teacher)

Each mode runs in its own subprocess (so one mode's allocations cannot hide the other's) on
the same model, data, seed and steps; the parent prints both and the ratios precompute/live.
On CPU the memory figure is the process's resident set size (sampled after every step while
distilling); on GPU it is torch.cuda.max_memory_allocated over the distillation steps.

  python bench/bench_rkld_memory.py                       # quick target of forget01 (finetune.py first)
  python bench/bench_rkld_memory.py --model PATH --strengthened_model PATH --steps 5
"""
import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rkld  # noqa: E402


def strengthened_stand_in(model_path: str, out: Path) -> str:
    """Without a strengthened model at hand, a copy of the target with small weight noise: the
    teacher's cost does not depend on what the strengthened model learned."""
    if not (out / "config.json").exists():
        model, tok = common.load_model(model_path)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def run_mode(a) -> dict:
    from accelerate import Accelerator
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    torch.manual_seed(0)
    model, tok = common.load_model(a.model)
    model.to(acc.device)
    fmt = common.prompt_format(tok, a.model)
    forget, _ = common.forget_retain_rows(a.split)
    ds = common.ForgetRetainDataset(forget, [], tok, fmt, seed=0)
    ori = common.load_model(a.model, frozen=True)[0].to(acc.device)
    strong = common.load_model(a.strengthened_model, frozen=True)[0].to(acc.device)
    teacher = rkld.Teacher(ori, strong, 8.0)
    frozen = {"teacher": teacher, "store": None, "ori": None}
    t_pre = 0.0
    if a.mode == "precompute":
        t0 = time.time()
        frozen = {"teacher": None, "store": rkld.precompute_teacher(teacher, ds, tok.pad_token_id, acc), "ori": None}
        t_pre = time.time() - t0
        del teacher, ori, strong
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    store_bytes = sum(t.numel() * t.element_size() for t in frozen["store"].values()) if frozen["store"] else 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    args = argparse.Namespace(divergence="rkl", retain_loss="none", retain_weight=1.0)
    batches = [common.collate_pairs([ds[i] for i in range(s * a.batch, (s + 1) * a.batch)], tok.pad_token_id)
               for s in range(a.steps + 1)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    peak, times = 0, []
    for k, b in enumerate(batches):
        b = {"index": b["index"], "forget": {n: v.to(acc.device) for n, v in b["forget"].items()}}
        t0 = time.time()
        with acc.autocast():
            loss = rkld.step_losses(model, b, frozen, args)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if k:  # the first step warms up allocators and the optimizer state
            times.append(time.time() - t0)
        peak = max(peak, rss())
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    return {"mode": a.mode, "peak_bytes": peak, "step_s": sum(times) / len(times), "precompute_s": t_pre,
            "store_bytes": store_bytes, "loss": float(loss), "device": str(acc.device)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="target model (default: the quick forget01 target)")
    p.add_argument("--strengthened_model", default=None, help="default: a noisy copy of --model (see docstring)")
    p.add_argument("--split", default="forget01")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--mode", choices=["live", "precompute"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a)))
        return
    a.model = a.model or common.quick_model(a.split, "target")
    a.strengthened_model = a.strengthened_model or strengthened_stand_in(
        a.model, common.RUNS_DIR / "bench" / "strengthened_stand_in")
    res = {}
    for mode in ("live", "precompute"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", a.model, "--strengthened_model",
               a.strengthened_model, "--split", a.split, "--batch", str(a.batch), "--steps", str(a.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    live, pre = res["live"], res["precompute"]
    gib = 2 ** 30
    print(f"RKLD teacher modes on {a.model} ({a.split}, batch {a.batch}, {a.steps} timed steps, {live['device']})")
    print(common.table([(m, r["peak_bytes"] / gib, r["step_s"], r["precompute_s"], r["store_bytes"] / gib, r["loss"])
                        for m, r in res.items()],
                       ("mode", "peak GiB", "s/step", "precompute s", "store GiB", "last loss")))
    print(f"precompute/live: memory {pre['peak_bytes'] / live['peak_bytes']:.2f}x, "
          f"step time {pre['step_s'] / live['step_s']:.2f}x; losses agree to {abs(pre['loss'] - live['loss']):.2e}")


if __name__ == "__main__":
    main()
