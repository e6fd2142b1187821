"""Time of RKLD's teacher precompute (--precompute_teacher) with full fine-tuning against one base with
LoRA, side by side in one run.

  full      --lora_r 0: the teacher is two models, the original and the strengthened one (a full copy)
  one_base  --lora_r 8: one base carrying the trained adapter and the strengthening adapter; the teacher
            runs that base twice per batch, adapters off and the strengthening adapter alone
            (models.AdapterView, peft's per-call adapter_names)

Both run rkld.precompute_teacher on the same forget rows, the same batches and the same strengthened
weights (one LoRA adapter with small random weights, merged into a full model for `full`: the cost does
not depend on what strengthening learned), in turns (full, one_base, full, one_base, ...) so a load on the
shared machine falls on both. It prints the seconds of every turn, the median per mode and the ratio.

  python bench/bench_rkld_lora_precompute.py                      # embedded SmolLM2-135M, forget01 (40 rows)
  python bench/bench_rkld_lora_precompute.py --model PATH --rows 40 --repeats 2
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rkld  # noqa: E402
from harness import launch, models  # noqa: E402
from bench_rkld_lora_memory import strengthened_stand_ins  # noqa: E402


def teacher(mode: str, model_path: str, adapter: str, full: str, acc):
    if mode == "full":
        ori, strong = (launch.place_frozen(models.load_model(p, frozen=True)[0], acc) for p in (model_path, full))
        return rkld.Teacher(ori, strong, 8.0)
    args = SimpleNamespace(model=model_path, lora_r=8, lora_alpha=32.0, lora_dropout=0.0,
                           lora_target_modules="all-linear", save_adapter_only=False, gradient_checkpointing=False)
    model = models.load_trained(args, acc)
    model.load_adapter(adapter, adapter_name=rkld.STRENGTHENED)
    return rkld.Teacher(models.AdapterView(model), models.AdapterView(model, rkld.STRENGTHENED), 8.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model preset, folder or HF id (default: the embedded one)")
    p.add_argument("--split", default="forget01", help="forget split whose rows are precomputed (default forget01)")
    p.add_argument("--rows", type=int, default=0, help="first N forget rows (0, default: all)")
    p.add_argument("--batch_size", type=int, default=4, help="rows per forward (rkld.py: --per_device_batch_size, 4)")
    p.add_argument("--repeats", type=int, default=2, help="turns per mode (default 2)")
    a = p.parse_args(argv)
    model_path = models.resolve_model_path(a.model)
    acc = launch.make_accelerator(a.batch_size, a.batch_size)[0]
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    adapter, full = strengthened_stand_ins(model_path, work)
    tok = models.load_tokenizer(model_path)
    fmt = models.prompt_format(tok, model_path)
    forget = common.load_split(a.split)[:a.rows or None]
    ds = common.ForgetRetainDataset(forget, [], tok, fmt, 512, 0)
    times = {"full": [], "one_base": []}
    for r in range(a.repeats):
        for mode in times:
            t = teacher(mode, model_path, adapter, full, acc)
            t0 = time.perf_counter()
            store = rkld.precompute_teacher(t, ds, tok.pad_token_id, acc, work / f"{mode}{r}.f32", a.batch_size)
            times[mode].append(time.perf_counter() - t0)
            del store, t
            print(f"[bench] {mode} turn {r + 1}: {times[mode][-1]:.1f} s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n{len(forget)} rows of {a.split}, batch {a.batch_size}, {torch.get_num_threads()} threads, "
          f"{a.model}: precompute median full {med['full']:.1f} s, one_base {med['one_base']:.1f} s, "
          f"one_base / full = {med['one_base'] / med['full']:.2f}")
    return med


if __name__ == "__main__":
    common.cli(main)
