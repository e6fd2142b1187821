"""Attacks that undo unlearning, run on a saved model folder after unlearning (the method scripts'
OUTPUT_DIR/model, or any folder through evaluate_tofu.py), each beside the retain model under the same
attack, the yardstick of "truly forgotten" (shared/specs/README.md item 11; docs/specs.md, "Attacks").

  Relearning   Hu et al., "Unlearning or Obfuscating? Jogging the Memory of Unlearned LLMs via Benign
               Relearning", ICLR 2025, arXiv 2406.13356: a few steps of plain fine-tuning on part of the
               forget set bring the rest back. The forget rows are split by question (seeded, fixed:
               split_questions); a copy of the model is fine-tuned on one part (relearn()) and evaluated
               on the other, beside the unlearned model on that part and the retain model after the
               same relearning (same split, recipe and seed; cached).
  Quantization Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025,
               arXiv 2410.16454: the unlearned model loaded in 4 or 8 bits (bitsandbytes, as the paper,
               with its BitsAndBytesConfig defaults) and evaluated again on the forget split, beside the
               target and retain models quantized the same way (cached).

Every evaluation is evaluation.engine.evaluate() with the options of the unlearned model's, restricted
to the forget rows, so whatever evaluate() reports is reported for the attacked models too; summary.json
holds the numbers under relearn_attack/<model>/<metric> and quantize_attack/<bits>/<model>/<metric>.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import common
from harness import launch, models, runlog, scenarios
from evaluation.engine import evaluate, task_rows
from evaluation.logs import cell, eval_cache_dir

# ---------------------------------------------------------------------------
# Recipes and flags
# ---------------------------------------------------------------------------
# Hu et al. relearn by ordinary fine-tuning (AdamW, the model's fine-tuning loss) on a small relearn set
# for a few steps. The paper recipe takes TOFU's own fine-tuning rate (1e-5, TOFU config/finetune.yaml,
# the rate that taught the target) and batch (4 per device, TOFU finetune.sh); the quick recipe takes
# finetune.py's rate for the embedded 135M model (2e-4, the rate that taught the quick target).
# The number of steps (10) and the relearn share (half of the forget questions) are ours: the paper's
# point is "a few steps on a small part"; its exact TOFU step counts were not checked here.
RELEARN_RECIPES = {
    "paper": {"steps": 10, "lr": 1e-5, "batch_size": 4, "fraction": 0.5,
              "_source": "Hu et al. 2025 (fine-tuning on part of the forget set); lr and batch: TOFU's fine-tuning "
                         "(config/finetune.yaml, finetune.sh); steps and fraction: ours"},
    "quick": {"steps": 10, "lr": 2e-4, "batch_size": 4, "fraction": 0.5,
              "_source": "ours, for the embedded 135M model: lr of finetune.py's embedded recipe (what taught the "
                         "quick target)"},
}
RELEARN_WEIGHT_DECAY = 0.01  # TOFU fine-tuning's AdamW weight decay (config/finetune.yaml)
RELEARN_MAX_GRAD_NORM = 1.0  # HF Trainer's default clipping, as TOFU's fine-tuning ran under it

# bit width -> BitsAndBytesConfig arguments: Zhang et al.'s utils.load_model passes load_in_4bit=True or
# load_in_8bit=True and nothing else, so bitsandbytes' defaults hold (4 bit: FP4, no double quantization).
QUANT_BITS = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_8bit": True}}
QUANT_LIBRARY = "bitsandbytes"
QUANT_INSTALL = "pip install bitsandbytes==0.50.2 (optional in requirements.txt; it runs on CPU and CUDA)"


@dataclass
class AttackArgs:
    """The attack flags, shared by evaluate_tofu.py and every method script (harness/flags.MethodArgs)."""
    relearn_attack: bool = dataclasses.field(default=False, metadata={"help": (
        "After unlearning, fine-tune a copy of the unlearned model for a few steps on half of the forget questions "
        "and evaluate the other half (Hu et al. 2025, arXiv 2406.13356), beside the unlearned model and the retain "
        "model under the same attack (cached); summary.json: relearn_attack/... Needs the model in fp32 plus AdamW "
        "state on one device (16 bytes a parameter).")})
    relearn_steps: int = dataclasses.field(default=None, metadata={"help": (
        "Relearning optimizer steps. Default: paper 10, quick 10 (ours: 'a few steps', Hu et al.).")})
    relearn_lr: float = dataclasses.field(default=None, metadata={"help": (
        "Relearning AdamW rate (constant, no warmup, weight decay 0.01, clipping 1.0). Default: paper 1e-5 (TOFU's "
        "fine-tuning rate), quick 2e-4 (finetune.py's embedded recipe).")})
    relearn_batch_size: int = dataclasses.field(default=None, metadata={"help": (
        "Relearning batch. Default: 4 (TOFU's per-device fine-tuning batch).")})
    relearn_fraction: float = dataclasses.field(default=None, metadata={"help": (
        "Share of the forget questions relearned on (the rest are evaluated), split by a hash of seed and question "
        "so the split does not depend on row order. Default: 0.5 (ours).")})
    quantize_attack: str = dataclasses.field(default="", metadata={"help": (
        "Comma list of 4bit, 8bit: load the unlearned model quantized through bitsandbytes (Zhang et al. 2025, "
        "arXiv 2410.16454, BitsAndBytesConfig(load_in_4bit / load_in_8bit) defaults as their code) and evaluate the "
        "forget split again, beside the target (--model of a method script; evaluate_tofu.py --target_model) and "
        "retain models quantized the same way (cached); summary.json: quantize_attack/<bits>/... Needs "
        f"{QUANT_INSTALL}.")})


ATTACK_FLAGS = tuple(f.name for f in dataclasses.fields(AttackArgs))


def parse_bits(spec: str | None) -> list[str]:
    """'4bit,8bit' -> ['4bit', '8bit'] (order kept, repeats dropped); '' -> []."""
    out = []
    for part in (spec or "").split(","):
        b = part.strip().lower()
        if not b:
            continue
        if b not in QUANT_BITS:
            raise common.TofuError(f"unknown --quantize_attack bit width {part.strip()!r}; valid: "
                                   f"{', '.join(QUANT_BITS)} (comma-separated)")
        if b not in out:
            out.append(b)
    return out


def quantization_library() -> str:
    """'bitsandbytes <version>', or one sentence saying what to install."""
    if importlib.util.find_spec(QUANT_LIBRARY) is None:
        raise common.TofuError(f"--quantize_attack needs the {QUANT_LIBRARY} package, which is not installed: "
                               f"{QUANT_INSTALL}")
    from importlib.metadata import version
    return f"{QUANT_LIBRARY} {version(QUANT_LIBRARY)}"


def relearn_recipe(recipe: str, steps=None, lr=None, batch_size=None, fraction=None) -> dict:
    """The relearning recipe: the named one with the given values replacing its own, checked."""
    base = RELEARN_RECIPES[recipe]
    r = {"steps": steps if steps is not None else base["steps"], "lr": lr if lr is not None else base["lr"],
         "batch_size": batch_size if batch_size is not None else base["batch_size"],
         "fraction": fraction if fraction is not None else base["fraction"], "recipe": recipe,
         "source": base["_source"]}
    if not (isinstance(r["steps"], int) and r["steps"] >= 1):
        raise common.TofuError(f"--relearn_steps must be at least 1, not {r['steps']}")
    if not (r["lr"] > 0 and math.isfinite(r["lr"])):
        raise common.TofuError(f"--relearn_lr must be positive, not {r['lr']}")
    if not (isinstance(r["batch_size"], int) and r["batch_size"] >= 1):
        raise common.TofuError(f"--relearn_batch_size must be at least 1, not {r['batch_size']}")
    if not 0 < r["fraction"] < 1:
        raise common.TofuError(f"--relearn_fraction must be between 0 and 1 (exclusive), not {r['fraction']}")
    return r


# ---------------------------------------------------------------------------
# The relearning attack: the split and the training loop
# ---------------------------------------------------------------------------
def split_questions(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(relearn rows, evaluation rows): the distinct questions ranked by sha1(seed, question), the first
    round(fraction x n) (at least 1, at most n - 1) relearned on; every row of a question goes to its
    question's part. The split depends on the seed and the questions only, not on their order."""
    questions = list(dict.fromkeys(r["question"] for r in rows))
    if len(questions) < 2:
        raise common.TofuError(f"the forget set has {len(questions)} distinct question(s); the relearning attack needs "
                               "at least 2 (one part to relearn on, another to evaluate)")
    ranked = sorted(questions, key=lambda q: hashlib.sha1(f"{seed}\x00{q}".encode()).hexdigest())
    k = min(max(1, round(fraction * len(questions))), len(questions) - 1)
    learn = set(ranked[:k])
    return [r for r in rows if r["question"] in learn], [r for r in rows if r["question"] not in learn]


def relearn(model, tokenizer, fmt, rows: list[dict], steps: int, lr: float, batch_size: int, seed: int,
            max_length: int = 512, bar: bool = False) -> list[float]:
    """Fine-tune `model` in place on (question, answer) rows: `steps` AdamW steps at a constant rate on
    batches drawn without replacement from a seeded shuffle (reshuffled each pass), the mean NLL of the
    answer tokens (common.encode_qa's labels) as the loss. Returns each step's loss."""
    device = next(model.parameters()).device
    seqs = [common.encode_qa(tokenizer, fmt, r["question"], r["answer"], max_length) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=RELEARN_WEIGHT_DECAY)
    order, losses = [], []
    for _ in tqdm(range(steps), desc="  relearn", disable=not bar, leave=False):
        if len(order) < batch_size:
            order += torch.randperm(len(seqs), generator=gen).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        b = {k: v.to(device) for k, v in common.collate([seqs[i] for i in chunk], tokenizer.pad_token_id).items()}
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, RELEARN_MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    return losses


# ---------------------------------------------------------------------------
# The quantization attack: loading
# ---------------------------------------------------------------------------
def load_quantized(path: str, bits: str, device):
    """The model folder loaded with its linear layers quantized by bitsandbytes (QUANT_BITS[bits]),
    the other weights at the evaluation precision (fp32 on CPU, bf16 on GPUs: models.default_dtype)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    folder = models.resolve_model_path(path)
    if models.adapter_base(folder):
        raise common.TofuError(f"{path} holds a LoRA adapter alone; --quantize_attack quantizes a whole model: save "
                               "the run without --save_adapter_only (the adapter merged), or merge it first")
    # LLM.int8() casts fp32 inputs to fp16 for its int8 matmul and logs it at every forward (docs/specs.md)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    device = torch.device(device)
    place = torch.cuda.current_device() if device.type == "cuda" else str(device)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANT_BITS[bits]),
                                                 dtype=models.default_dtype(frozen=True), device_map={"": place})
    model.eval().requires_grad_(False)
    models.no_kv_cache(model)
    return model


# ---------------------------------------------------------------------------
# Running the attacks and reporting them
# ---------------------------------------------------------------------------
ROLES = {"unlearned": "the unlearned model", "attacked": "the unlearned model under the attack",
         "target": "the target (before unlearning) under the attack", "retain": "the retain model under the attack"}


def metrics_of(summary: dict) -> dict:
    """The numbers of an evaluation's summary (every top-level number or None; no settings, lists, text)."""
    return {k: v for k, v in summary.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def fingerprint(rows: list[dict]) -> str:
    return hashlib.sha1(json.dumps([[r.get("index"), r["question"], r["answer"]] for r in rows]).encode()).hexdigest()[:16]


class Attacks:
    """The attacks a run asked for, checked before any model loads (plan) and run on a saved model
    folder (run). `eval_kw` are the keyword arguments of the unlearned model's evaluate() call; each
    attack's evaluation uses them, restricted to the forget rows."""

    def __init__(self, tokenizer, fmt, split: str, eval_kw: dict, out_dir, accelerator, recipe: str, seed: int,
                 relearn_attack: bool = False, quantize_attack: str = "", relearn_steps=None, relearn_lr=None,
                 relearn_batch_size=None, relearn_fraction=None, max_length: int = 512):
        self.tok, self.fmt, self.split, self.acc, self.seed = tokenizer, fmt, split, accelerator, seed
        self.kw = {k: v for k, v in eval_kw.items() if k not in ("verbose", "progress", "retain_logs", "tasks")}
        self.out, self.max_length = Path(out_dir), max_length
        self.bits = parse_bits(quantize_attack)
        self.library = quantization_library() if self.bits else None
        self.recipe = relearn_recipe(recipe, relearn_steps, relearn_lr, relearn_batch_size,
                                     relearn_fraction) if relearn_attack else None
        self.forget = self.forget_rows()
        self.parts = split_questions(self.forget, self.recipe["fraction"], seed) if self.recipe else None

    @property
    def active(self) -> bool:
        return bool(self.recipe or self.bits)

    @property
    def main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    def forget_rows(self) -> list[dict]:
        """The forget rows the unlearned model's evaluation scores (its data, author subset, cap and order)."""
        cap = self.kw.get("max_eval_samples")
        cap = cap.get("forget") if isinstance(cap, dict) else cap
        if self.kw.get("data") is not None:
            return self.kw["data"]["forget"][:cap]
        return task_rows("forget", self.split, self.kw.get("authors"), cap, self.kw.get("source", "local"),
                         self.kw.get("forget_task"), self.kw.get("row_order", "tofu"))

    def _key(self) -> dict:
        return {**{k: v for k, v in self.kw.items() if k not in ("accelerator", "data")},
                "data": fingerprint(self.forget), "fmt": dataclasses.asdict(self.fmt), "split": self.split}

    def _evaluate(self, model, out: Path, rows: list[dict] | None, retain_logs=None) -> dict:
        """evaluate() on the forget rows alone (`rows`: a part of them, evaluated as your own data)."""
        kw = dict(self.kw)
        split = self.split
        if rows is not None:
            kw.update(data={"forget": rows}, max_eval_samples=None)
            split = scenarios.CUSTOM
        return evaluate(model, self.tok, self.fmt, split, out, tasks=("forget",), retain_logs=retain_logs,
                        verbose=False, progress=True, **kw)

    def _cached(self, model_path: str, settings: dict, out: Path, compute) -> tuple[dict, Path]:
        """(summary, cache folder) of the evaluation compute(folder) of a saved model, reused from
        runs/eval_cache when it was made with the same settings, and copied to `out`. Rank 0 decides;
        the cache is written whole or not at all."""
        cache = eval_cache_dir(model_path, {**self._key(), **settings})
        if launch.main_decides(self.acc, lambda: (cache / "summary.json").exists()):
            if self.main:
                print(f"[attack] reusing {model_path} under the same attack ({cache})", flush=True)
        else:
            tmp = cache
            if self.main:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
            compute(tmp)
            if self.main:
                runlog.replace_dir(tmp, cache)
        if self.acc is not None:
            self.acc.wait_for_everyone()
        if self.main:
            shutil.copytree(cache, out, dirs_exist_ok=True)
        return launch.main_decides(self.acc, lambda: json.loads((cache / "summary.json").read_text())), cache

    def _device(self):
        return self.acc.device if self.acc is not None else torch.device("cpu")

    def _relearned(self, model_path: str, bar: bool):
        """A fresh fp32 copy of the saved model, relearned on the relearn part; (model, losses)."""
        model = models.load_model(model_path, dtype=torch.float32)[0].to(self._device())
        models.no_kv_cache(model)  # training forwards build no KV cache (as fit() does)
        r = self.recipe
        losses = relearn(model, self.tok, self.fmt, self.parts[0], r["steps"], r["lr"], r["batch_size"], self.seed,
                         self.max_length, bar)
        return model, losses

    def relearn_attack(self, model_path: str, retain_model: str | None) -> dict:
        learn, held = self.parts
        out = self.out / "relearn_attack"
        r = self.recipe
        t0 = time.time()
        res = {"relearn_attack/recipe": {k: r[k] for k in ("steps", "lr", "batch_size", "fraction", "recipe", "source")}
               | {"seed": self.seed, "weight_decay": RELEARN_WEIGHT_DECAY, "max_grad_norm": RELEARN_MAX_GRAD_NORM},
               "relearn_attack/relearn_rows": [x.get("index") for x in learn],
               "relearn_attack/eval_rows": [x.get("index") for x in held]}
        if self.main:
            print(f"[attack] relearning: {r['steps']} steps at lr {r['lr']:g}, batch {r['batch_size']}, on "
                  f"{len(learn)} forget rows; evaluated on the other {len(held)} ({r['source']})", flush=True)
        retain_dir = None
        if retain_model:
            def retain_run(folder):
                model, losses = self._relearned(retain_model, self.main)
                s = self._evaluate(model, folder, held)
                if self.main:
                    runlog.atomic_write_json(folder / "summary.json", {**s, "relearn_losses": losses})
                del model
                gc.collect()
            settings = {"attack": "relearn", "recipe": res["relearn_attack/recipe"],
                        "rows": [fingerprint(learn), fingerprint(held)]}
            s, retain_dir = self._cached(retain_model, settings, out / "retain", retain_run)
            res.update({f"relearn_attack/retain/{k}": v for k, v in metrics_of(s).items()})
        else:
            res["relearn_attack/retain_reason"] = "not computed: no retain model (--retain_model)"
        model = models.load_model(model_path, dtype=torch.float32, frozen=True)[0].to(self._device())
        s = self._evaluate(model, out / "unlearned", held)
        res.update({f"relearn_attack/unlearned/{k}": v for k, v in metrics_of(s).items()})
        del model
        model, losses = self._relearned(model_path, self.main)
        s = self._evaluate(model, out / "attacked", held, retain_logs=retain_dir)
        res.update({f"relearn_attack/attacked/{k}": v for k, v in metrics_of(s).items()})
        res["relearn_attack/losses"] = losses
        res["relearn_attack/seconds"] = round(time.time() - t0, 1)
        del model
        gc.collect()
        return res

    def quantize_attack(self, model_path: str, target_model: str | None, retain_model: str | None) -> dict:
        res = {"quantize_attack/library": f"{self.library}, BitsAndBytesConfig defaults (Zhang et al. 2025)"}
        for bits in self.bits:
            t0 = time.time()
            out = self.out / "quantize_attack" / bits
            if self.main:
                print(f"[attack] quantization: {bits} through {self.library}", flush=True)
            retain_dir = None
            for role, path in (("retain", retain_model), ("target", target_model)):
                if not path:
                    res[f"quantize_attack/{bits}/{role}_reason"] = (
                        f"not computed: no {role} model ({'--retain_model' if role == 'retain' else '--model of the method script, evaluate_tofu.py --target_model'})")
                    continue

                def run(folder, path=path, role=role):
                    model = load_quantized(path, bits, self._device())
                    self._evaluate(model, folder, None, retain_logs=retain_dir if role == "target" else None)
                    del model
                    gc.collect()
                s, cache = self._cached(path, {"attack": "quantize", "bits": bits, "library": self.library,
                                               "retain_logs": str(retain_dir) if role == "target" else None},
                                        out / role, run)
                res.update({f"quantize_attack/{bits}/{role}/{k}": v for k, v in metrics_of(s).items()})
                if role == "retain":
                    retain_dir = cache
            model = load_quantized(model_path, bits, self._device())
            s = self._evaluate(model, out / "attacked", None, retain_logs=retain_dir)
            res.update({f"quantize_attack/{bits}/attacked/{k}": v for k, v in metrics_of(s).items()})
            res[f"quantize_attack/{bits}/seconds"] = round(time.time() - t0, 1)
            del model
            gc.collect()
        return res

    def run(self, model_path: str, target_model: str | None, retain_model: str | None) -> dict:
        """Every attack asked for, on the saved model folder; the summary keys they add."""
        res = {}
        if self.recipe:
            res.update(self.relearn_attack(str(model_path), retain_model))
        if self.bits:
            res.update(self.quantize_attack(str(model_path), target_model, retain_model))
        if self.main and res:
            runlog.atomic_write_json(self.out / "attacks.json", res)
        return res


def num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(cell(v))


def table(s: dict) -> str:
    """One line per attack: forget ROUGE-L and Prob of the unlearned model, the attacked one and the retain
    model under the same attack (the yardstick), and the attacked model's forget quality against it."""
    rows, notes = [], []
    if "relearn_attack/eval_rows" in s:
        p = "relearn_attack/"
        rows.append((f"relearn ({len(s[p + 'relearn_rows'])} rows learned, {len(s[p + 'eval_rows'])} held out)",
                     *(cell(s.get(f"{p}{m}/{k}")) for k in ("forget_rouge", "forget_prob")
                       for m in ("unlearned", "attacked", "retain")), cell(s.get(f"{p}attacked/forget_quality"))))
        if p + "retain_reason" in s:
            notes.append(f"n/c relearn retain: {s[p + 'retain_reason'].removeprefix('not computed: ')}")
    for bits in QUANT_BITS:
        p = f"quantize_attack/{bits}/"
        if not any(k.startswith(p) for k in s):
            continue
        rows.append((f"quantize {bits} (all {s.get(p + 'attacked/n_forget', '?')} forget rows)",
                     *(cell(s.get(k) if m == "unlearned" else s.get(f"{p}{m}/{k}")) for k in ("forget_rouge", "forget_prob")
                       for m in ("unlearned", "attacked", "retain")), cell(s.get(f"{p}attacked/forget_quality"))))
        if f"{p}target/forget_prob" in s:
            notes.append(f"quantize {bits}: the target quantized the same way has f.ROUGE "
                         f"{num(s.get(p + 'target/forget_rouge'))}, f.Prob {num(s.get(p + 'target/forget_prob'))}")
        notes += [f"n/c quantize {bits} {role}: {s[p + role + '_reason'].removeprefix('not computed: ')}"
                  for role in ("retain", "target") if p + role + "_reason" in s]
    if not rows:
        return ""
    head = ("attack", "f.ROUGE unlearned", "attacked", "retain attacked", "f.Prob unlearned", "attacked",
            "retain attacked", "FQ attacked")
    lib = s.get("quantize_attack/library")
    return "\n".join(["attacks that undo unlearning (forget set; the retain model under the same attack is the "
                      "yardstick; FQ: KS against it)", runlog.table(rows, head), *notes,
                      *([f"quantization: {lib}"] if lib else [])])
