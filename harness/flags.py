"""Arguments shared by the method scripts (each script subclasses MethodArgs), the recipes they
fill in (quick or paper), the checks made at parse time, and the run folder's name."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import types
from pathlib import Path

import common
from common import TofuError
from harness import forward_batch, launch, models, runlog, scenarios
from evaluation.attacks import ATTACK_FLAGS, AttackArgs


def flag(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class MemoryArgs:
    """LoRA and memory flags, shared by finetune.py and every method script (load_trained, save_model)."""
    lora_r: int = flag(0, "LoRA rank (peft): 0 (default) trains every weight, as the papers' main tables do; Closer-Look App. E.8 uses 8. The adapter trains on a frozen base (bf16 weights under mixed precision, fp32 on CPU); the starting model that references and KL terms need (NPO, DPO, KTO, UNDIAL, +KL, RKLD's original) is that base with the adapter off, and rkld.py builds the strengthened model as a second adapter, so no frozen copy is loaded.")
    lora_alpha: float = flag(32.0, "LoRA scaling numerator (the update is lora_alpha / lora_r x B A): 32, Closer-Look App. E.8.")
    lora_dropout: float = flag(0.0, "Dropout on the adapter's input. Closer-Look App. E.8 states none; 0 is peft's default and keeps a step deterministic (two processes give one's result).")
    lora_target_modules: str = flag("all-linear", "Modules that get an adapter: comma-separated names (peft matches a module's name or its last dotted parts, e.g. q_proj,v_proj), each of which must match a module, or 'all-linear' (peft's keyword: every linear layer but the output head). Closer-Look App. E.8 names none; all-linear is our choice.")
    save_adapter_only: bool = flag(False, "With LoRA, save the trained adapter alone (peft's adapter_config.json + adapter_model.safetensors, with the tokenizer) instead of the default: the adapter merged into the base, a plain model that every tool loads. The evaluator and the scripts load an adapter folder as its base (named in adapter_config.json) plus the adapter.")
    forward_batch: str = flag("auto", forward_batch.FORWARD_BATCH_HELP)
    gradient_checkpointing: bool = flag(False, "Recompute each layer's activations in the backward pass instead of storing them (transformers' activation checkpointing, non-reentrant): about a third more compute for activation memory of one layer instead of all. Off by default, as in the references. Works with LoRA (the embeddings' output requires grad).")


def check_memory_args(args) -> None:
    """The LoRA flags at parse time: numbers in range, and --save_adapter_only only with an adapter."""
    check_numbers(args, (("lora_r", *NON_NEGATIVE), ("lora_alpha", *POSITIVE),
                         ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)")))
    if args.save_adapter_only and not args.lora_r:
        raise TofuError("--save_adapter_only needs a LoRA adapter to save: set --lora_r (e.g. 8, Closer-Look App. E.8)")
    forward_batch.check_forward_batch(args.forward_batch, getattr(args, "per_device_batch_size", 1))
    if not args.lora_target_modules.strip():
        raise TofuError("--lora_target_modules is empty; name modules (e.g. q_proj,v_proj) or use all-linear")


PRIVACY_HELP = ("Membership inference and memorization on the forget set (evaluation/privacy.py, open-unlearning's "
                "definitions): the AUC of six attacks (LOSS, ZLib, Min-K%% k=0.4, Min-K%%++, GradNorm, Reference = NLL minus the "
                "retain model's) separating forget rows from holdout rows (--holdout_data), privleak on Min-K%% against the "
                "retain model's AUC (0.5 without a retain model, open-unlearning's fallback), extraction strength (ExtStr) and "
                "exact memorization (ExactMem). AUC convention: holdout labelled 1, forget 0, loss-like scores (AUC 1: the "
                "forget rows look remembered; 0.5: like unseen rows); MUSE's code reports 1 - AUC. Cost: one batched forward pass over the forget and holdout rows, 0.13x of the rest of the evaluation for SmolLM2-135M on the quick path (40 + 40 rows, 2-core CPU; 0.06x for the tests' tiny model; docs/evaluation.md). On by default for that cost; GradNorm is --privacy_gradnorm.")


@dataclasses.dataclass
class _MethodFlags:
    split: str = flag("forget01", "Forget split: forget01, forget05 or forget10 (TOFU); its retain split is retain99/95/90.")
    forget_data: str = flag(None, "Your own forget set instead of --split: a JSON-lines, CSV or Parquet file (or a hub dataset id, org/name[:config]) with `question` and `answer`; optional `paraphrased_answer` and `perturbed_answer` (a list) give the truth ratio, optional `name` groups rows by person.")
    scenario: str = flag("tofu", "tofu (the TOFU splits, or --forget_data) or real_world: Closer-Look's real-world scenario (§5.3, App. E.7) from --real_world_dir; the --model is unlearned as is (no fine-tuning stage), model utility (MU, harmonic mean of six metrics) is measured on 20 held-out neighbours and forget efficacy (FE) on the forget people, ES in the generation => answer direction on both.")
    real_world_dir: str = flag(None, "With --scenario real_world: the folder holding Closer-Look's forget.json, forget_perturbed.json, neighbor.json and neighbor_perturbed.json (its data/real_world/, downloaded as the README says).")
    retain_data: str = flag(None, "Your own retain set, with --forget_data (same format); without it the run has no retain rows, so methods with a retain term refuse.")
    forget_task: int = flag(None, "Continual unlearning (closer-look §5.2): unlearn task k of the split's task sequence; set --model to the previous task's output.")
    recipe: str = flag("auto", "The recipe that fills every flag below you leave unset (lr, batch, epochs, schedule, padding; each flag's help gives both recipes' values and sources): 'paper' (the method paper's settings for a 7B model), 'quick' (ours, sized for the embedded 135M model on a 2-core CPU), or 'auto' (default): quick for --model quick, paper for any other model. The run prints the recipe's effective values at start.")
    model: str = flag(models.QUICK, "Model to unlearn: HF id or folder (e.g. locuslab/tofu_ft_llama2-7b), or 'quick': the quick target built by `python finetune.py --split SPLIT`.")
    retain_model: str = flag("auto", "Retain (oracle) model for forget quality: folder/HF id, 'auto' (the quick retain model when --model quick, else none), or 'none'.")
    retain_logs: str = flag(None, "Folder of TOFU-format logs of the retain model (eval_log_forget.json, here or in one subfolder), e.g. TOFU's data/ft_epoch5_lr1e-05_llama2-7b_retain95_wd0.01 as downloaded (README); replaces --retain_model.")
    subset: str = flag("auto", "'quick' (CPU subset: forget-split authors + retain authors 0..quick_retain_authors-1), 'all', or 'auto' (quick when --model quick).")
    quick_retain_authors: int = flag(common.QUICK_RETAIN_AUTHORS, "Retain authors in the quick subset (must match finetune.py).")
    lr: float = flag(None, "AdamW learning rate. Default: the --recipe's.")
    epochs: int = flag(None, "Epochs over the forget set. Default: the --recipe's.")
    batch_size: int = flag(None, "Effective batch (per device x accumulation x processes). Default: the --recipe's (paper: 32 in all three reference codebases).")
    per_device_batch_size: int = flag(4, "Micro-batch per process (closer-look: 4).")
    weight_decay: float = flag(0.01, "AdamW weight decay (TOFU / closer-look / RKLD: 0.01).")
    warmup_epochs: float = flag(1.0, "Linear warmup in epochs, then linear decay to 0 (TOFU / closer-look / RKLD: one epoch).")
    max_grad_norm: float = flag(None, "Gradient clipping, 0 disables. Default: the method's paper recipe (0 for the closer-look code's methods: its DeepSpeed config has no gradient_clipping, losses.md section 3); 1.0 (HF Trainer's default) otherwise.")
    schedule: str = flag(None, "Optimizer steps and warmup. 'reference': floor(epochs x N / batch) steps and floor(N / batch) warmup steps when that is more than 1, else none (closer-look forget.py; training can stop inside an epoch); 'epochs': every epoch in full, a short last step when N is not a multiple of the batch, --warmup_epochs of warmup. Default: the method's paper recipe ('reference' for the closer-look methods and baselines, 'epochs' for RKLD, which has no code, and for --model quick).")
    last_window: str = flag("mean", "The last, short gradient-accumulation window of an epoch: mean = its step is the mean over its own micro-batches (ours); reference = divided by the full accumulation like every other window, as the references' HF Trainer does (a smaller step).")
    peak_epoch: bool = flag(None, "The RKLD paper's protocol (Table 2, Table 4, Fig. 3): forget quality after every epoch (forget split scored, no generation), the first epoch of peak forget quality kept and evaluated in full beside the last. Default: on for rkld.py on a real model (with --epochs 10), off otherwise.")
    save_peak: bool = flag(True, "With --peak_epoch: keep the first peak epoch's weights in OUTPUT_DIR/peak_model (one checkpoint, rewritten when forget quality improves); false deletes it after its evaluation.")
    max_length: int = flag(512, "Max tokens per example (open-unlearning: 512).")
    prompt_format: str = flag("auto", "auto, chat, llama2 or phi; auto uses the format saved beside the model, else TOFU's llama2 tags for a Llama-2 model (Llama architecture and tokenizer), else the chat template, else phi tags (models.prompt_format).")
    system_prompt: str = flag("auto", common.SYSTEM_PROMPT_HELP)
    seed: int = flag(42, "Seed for models, data order, retain pairing and IDK templates.")
    output_dir: str = flag(None, "Run folder. Default: runs/<method>/<split>[-task<k>][-<flag>_<value>...], naming every flag that changes the trained model and differs from its default (flags.run_name), e.g. runs/rkld/forget01-divergence_fkl.")
    overwrite: bool = flag(False, "Replace a finished run (args.json and model/) in the run folder that was made with other arguments; without it such a run is kept and this one refused.")
    eval: bool = flag(True, "Evaluate before and after unlearning (--eval false to skip).")
    eval_before: bool = flag(True, "Evaluate the starting model (reused from runs/eval_cache when cached). scripts/continual.py passes false from task 2 on: the start is the previous task's model, evaluated at its end.")
    eval_every_epoch: bool = flag(False, "Also evaluate after every epoch (to find the epoch of peak forget quality).")
    max_eval_samples: int = flag(None, "Rows per eval split (first N). Default: all (open-unlearning). On the quick path: 20, and the forget split is always whole there (forget quality needs every row), to fit the CPU budget. 300 applies TOFU's ds_size cap (retain and forget10: the first 300 of 400 rows, the rows of its published logs); Closer-Look's 300 forget10 rows are another set (--row_order closer_look).")
    row_order: str = flag("tofu", "Order of the forget split's rows before --max_eval_samples keeps the first N: 'tofu' (HF order, TOFU's ds_size rows) or 'closer_look' (its reordered file: with --max_eval_samples 300, forget10 rows 0-99 and 200-399, the rows behind its tables). See evaluate_tofu.py --help.")
    max_steps: int = flag(0, "Stop after this many optimizer steps (0: run every epoch); for smoke tests.")
    gen_max_length: int = flag(200, "Greedy generation stops at EOS or at this many tokens in total, prompt included (TOFU and Closer-Look: max_length=200); --max_new_tokens replaces it.")
    max_new_tokens: int = flag(None, "If set, generate up to this many new tokens instead of --gen_max_length in total (open-unlearning: 200).")
    cs_model: str = flag("auto", "Sentence model for cosine similarity (closer-look): 'auto' (paper's paraphrase-MiniLM-L6-v2, else the offline all-MiniLM-L6-v2), a folder, or 'none'.")
    ref_precision: str = flag("match", "Precision of the frozen reference model (NPO, DPO, KTO, UNDIAL, the +KL terms) under mixed precision (GPUs): match = the trained model's fp32 weights under the same bf16 autocast, so log-ratios are exactly 0 at theta = theta_ref (4 bytes a parameter); bf16 = bf16 weights (2 bytes; log-ratios are off 0 by bf16 rounding at the first step). The retain model is always evaluated at match. With --lora_r the reference is the trained model's own base (no copy), exact at the first step, and this flag does not apply.")
    benchmarks: str = flag("none", "General-capability benchmarks through lm-eval (optional package), on the model before and after unlearning: rkld (RKLD Table 1: PIQA, HellaSwag, ARC-E, ARC-C, COPA, WinoGrande, MathQA), closer_look (§5.3: MMLU, ARC-C, GSM8K, TriviaQA, TruthfulQA-MC1), a comma list of lm-eval task names, or none (evaluate_general.py).")
    benchmark_limit: int = flag(None, "Rows per benchmark task (lm-eval's limit), for smoke runs. Default: every row.")
    benchmark_batch_size: int = flag(8, "Sequences per lm-eval forward pass.")
    benchmark_include_path: str = flag(None, "A folder of your own lm-eval task YAMLs, so --benchmarks can name them.")
    report_to: str = flag("none", "Experiment trackers, through accelerate (main process only): tensorboard (OUTPUT_DIR/tensorboard), wandb, all (those installed) or none. They get the arguments as config, the losses and lr of every step and the numbers of every evaluation; metrics.jsonl is written either way.")
    privacy: bool = flag(True, PRIVACY_HELP)
    holdout_data: str = flag(None, "With --privacy: your own holdout set for membership inference (same format as --forget_data): rows of the same kind as the forget set that no model trained on. Default: on the quick path, the first TOFU authors neither quick model saw (authors 4.. by default; the run prints which); otherwise TOFU's holdout01/05/10 from the hub (locuslab/TOFU, as open-unlearning).")
    privacy_gradnorm: bool = flag(False, "With --privacy: also run the GradNorm attack (mia_auc/gradnorm): one forward and backward per forget and holdout row (batch of 1, as open-unlearning) with gradients of every weight, so the memory of a full gradient. Off by default for its cost (another 0.44x of the rest of the evaluation for SmolLM2-135M on the quick path, 2-core CPU) and memory; open-unlearning's default TOFU evaluation leaves it out too (configs/eval/tofu.yaml).")
    extraction_form: str = flag("definition", "Extraction strength's edge case: 'definition' (Carlini et al. 2021, Wang et al. 2025: 1 - k/n with k in 0..n, so a missed last token gives 0) or 'open_unlearning' (its loop stops at k = n-1, so such a row gives 1/n).")
    nli_model: str = flag("sileod/deberta-v3-base-tasksource-nli", "NLI model for the entailment score (closer-look); a folder or HF id. Offline without it, ES is 'not computed'.")


@dataclasses.dataclass
class MethodArgs(MemoryArgs, AttackArgs, _MethodFlags):
    """The flags every method script shares: the run's first (in --help too), then LoRA and memory."""


# Numeric flags, checked at parse time (before any model loads): (flag, test, what it must be).
# A flag a script lacks, or left unset (None: a recipe fills it), is skipped.
POSITIVE, AT_LEAST_1, NON_NEGATIVE = (lambda v: v > 0, "positive"), (lambda v: v >= 1, "at least 1"), \
    (lambda v: v >= 0, "0 or more")
NUMBER_RULES = (("lr", *POSITIVE), ("batch_size", *AT_LEAST_1), ("per_device_batch_size", *AT_LEAST_1),
                ("epochs", *NON_NEGATIVE), ("max_length", *AT_LEAST_1), ("warmup_epochs", *NON_NEGATIVE),
                ("weight_decay", *NON_NEGATIVE), ("max_grad_norm", *NON_NEGATIVE), ("max_steps", *NON_NEGATIVE),
                ("quick_retain_authors", *NON_NEGATIVE), ("forget_task", *AT_LEAST_1),
                ("max_eval_samples", *NON_NEGATIVE), ("benchmark_limit", *AT_LEAST_1),
                ("benchmark_batch_size", *AT_LEAST_1), ("gen_max_length", *AT_LEAST_1), ("max_new_tokens", *AT_LEAST_1))


def check_numbers(args, rules=NUMBER_RULES) -> None:
    """One sentence for the first flag out of range (`not ok` also refuses NaN)."""
    for name, ok, must in rules:
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            raise TofuError(f"--{name} must be {must}, not {v}")


def fill_defaults(args, quick_recipe: dict, paper_recipe: dict) -> None:
    """The defaults that depend on the model: --subset, and the recipe (quick or paper) for unset flags."""
    quick = args.model == models.QUICK
    args.recipe = resolve_recipe(args.recipe, quick)
    if args.subset == "auto":
        args.subset = "quick" if quick else "all"
    if args.subset not in ("quick", "all"):
        raise TofuError("--subset must be auto, quick or all")
    if args.row_order not in ("tofu", "closer_look"):
        raise TofuError(f"unknown --row_order '{args.row_order}'; valid: tofu, closer_look")
    if args.peak_epoch and not args.eval:
        raise TofuError("--peak_epoch chooses an epoch by forget quality, which needs --eval true")
    if not args.eval:  # the recipe's peak-epoch protocol needs evaluation: without it, train the epochs
        args.peak_epoch = False
    for k, v in {**{k: v for k, (v, _) in RECIPE_BASE.items()},
                 **(quick_recipe if args.recipe == "quick" else paper_recipe)}.items():
        if not k.startswith("_") and getattr(args, k) is None:
            setattr(args, k, v)
    if args.schedule not in ("reference", "epochs"):
        raise TofuError(f"--schedule must be reference or epochs, not {args.schedule!r}")
    if args.last_window not in ("mean", "reference"):
        raise TofuError(f"--last_window must be mean or reference, not {args.last_window!r}")
    if getattr(args, "extraction_form", "definition") not in ("definition", "open_unlearning"):
        raise TofuError(f"--extraction_form must be definition or open_unlearning, not {args.extraction_form!r}")
    if args.ref_precision not in ("match", "bf16"):
        raise TofuError(f"--ref_precision must be match or bf16, not {args.ref_precision!r}")


RECIPES = ("paper", "quick")
# What a recipe that leaves these flags out gives them: (value, source).
RECIPE_BASE = {"max_grad_norm": (1.0, "HF Trainer's default"), "schedule": ("epochs", "ours: every epoch in full"),
               "peak_epoch": (False, "ours: evaluated after the last epoch")}


def resolve_recipe(recipe: str, quick_model: bool) -> str:
    """--recipe auto as the model implies it (quick for the embedded quick model, paper otherwise)."""
    if recipe == "auto":
        return "quick" if quick_model else "paper"
    if recipe not in RECIPES:
        raise TofuError(f"--recipe must be auto, paper or quick, not {recipe!r}")
    return recipe


def parse(args_type, quick_recipe: dict, paper_recipe: dict):
    """Parse the command line into args_type, whose --help gives, for every flag a recipe sets, the
    value of each recipe and its source (the recipe's "_source")."""
    from transformers import HfArgumentParser
    recipes = {"paper": paper_recipe, "quick": quick_recipe}
    fields = args_type.__dataclass_fields__
    for name in sorted(set(paper_recipe) | set(quick_recipe)):
        if name.startswith("_") or name not in fields or "Recipes:" in fields[name].metadata.get("help", ""):
            continue
        vals = "; ".join(f"{r} {recipes[r][name]} ({recipes[r].get('_source', 'its recipe')})" if name in recipes[r]
                         else f"{r} {RECIPE_BASE[name][0]} ({RECIPE_BASE[name][1]})"
                         for r in RECIPES if name in recipes[r] or name in RECIPE_BASE)
        f = copy.copy(fields[name])  # a copy: the field object is shared with the parent dataclass
        f.metadata = types.MappingProxyType({**f.metadata, "help": f"{f.metadata.get('help', '')} Recipes: {vals}."})
        fields[name] = f
    return HfArgumentParser(args_type).parse_args_into_dataclasses()[0]


def recipe_line(name: str, args, derived: dict, source: str | None) -> str:
    """The start line: the recipe in use and the values it leads to, once flags and launch are known."""
    pad = getattr(args, "pad_to", 0)
    cap = " (stopped there by --max_steps)" if args.max_steps and derived["total_steps"] == args.max_steps else ""
    peak = ", forget quality after every epoch and the first peak kept (--peak_epoch)" if getattr(
        args, "peak_epoch", False) else ""
    return (f"[{name}] recipe {args.recipe} ({source or 'its recipe'}): lr {args.lr:g}, effective batch "
            f"{derived['effective_batch']}, {args.epochs} epochs, {derived['total_steps']} optimizer steps{cap}, "
            f"{derived['warmup_steps']} warmup steps, {getattr(args, 'schedule', 'epochs')} schedule, padding "
            f"{f'to {pad} tokens' if pad else 'to the longest in each batch'}{peak}; flags you give override it")


def finalize_args(args, method: str, quick_recipe: dict, paper_recipe: dict):
    """Validate args and fill the recipe defaults (quick recipe for the embedded model,
    the paper's otherwise). Returns args with resolved model paths and run folder."""
    scenarios.check_scenario(args)
    if args.split not in common.FORGET_SPLITS and args.split != scenarios.CUSTOM:
        raise TofuError(f"unknown split '{args.split}'; valid: {', '.join(common.FORGET_SPLITS)}")
    check_numbers(args)
    check_memory_args(args)
    runlog.trackers(args.report_to)
    quick, given_model = args.model == models.QUICK, args.model
    # What every flag would be if only the split, task, method and model had been given: the script's
    # own resolution (__post_init__) and the recipe, so a default filled in is never named as a choice.
    same = {k: getattr(args, k) for k in ("split", "forget_task", "method", "model", "recipe") if hasattr(args, k)}
    defaults = type(args)(**same) if dataclasses.is_dataclass(args) else None
    for a in (args, defaults) if defaults is not None else (args,):
        fill_defaults(a, quick_recipe, paper_recipe)
    if args.retain_model == "auto":
        args.retain_model = models.QUICK if quick and args.forget_task is None and args.split != scenarios.CUSTOM else "none"
    if args.retain_model == models.QUICK:
        args.retain_model = models.quick_model(args.split, "retain", args.quick_retain_authors)
    if args.retain_model == "none":
        args.retain_model = None
    if quick:  # continual tasks start from the target that learned every task's authors
        args.model = models.quick_model(args.split, "target", args.quick_retain_authors, args.forget_task is not None)
    if args.max_eval_samples is None and args.subset == "quick":
        args.max_eval_samples = common.QUICK_EVAL_SAMPLES
    if args.output_dir is None:  # baselines.py names the folder after its --method
        args.output_dir = str(common.RUNS_DIR / (getattr(args, "method", None) or method) / run_name(args, defaults, given_model))
    if Path(args.output_dir).resolve() == Path(models.resolve_model_path(args.model)).resolve():
        raise TofuError("--output_dir is the model being unlearned; choose another folder")
    check_run_folder(args)
    return args


# Flags left out of a run folder's name: the folder's own path (split, task, method), where it is and
# whether it may be replaced, and what only changes the evaluation, not the trained model (a run that
# differs in them alone is refused by check_run_folder instead).
UNNAMED = {"split", "forget_task", "method", "model", "recipe", "output_dir", "overwrite", "retain_model", "retain_logs",
           "report_to", "benchmarks", "benchmark_limit", "benchmark_batch_size", "benchmark_include_path",
           "max_eval_samples", "gen_max_length", "max_new_tokens", "cs_model", "nli_model", "save_peak",
           "gradient_checkpointing", "save_adapter_only", "privacy", "holdout_data", "privacy_gradnorm",
           "extraction_form"}


def path_part(value) -> str:
    """A flag value as a piece of a folder name: a folder under runs/ by its path there, any other
    folder by its name, a hub id org/name as org--name; other characters than letters, digits and
    . _ + - become _, and a long value keeps 40 characters and a hash of the whole."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    value = str(value)
    if "/" in value and os.path.isdir(os.path.expanduser(value)):  # isdir: False (no error) for odd strings
        p = Path(value).expanduser().resolve()
        value = str(p.relative_to(common.RUNS_DIR.resolve())) if p.is_relative_to(common.RUNS_DIR.resolve()) else p.name
    value = re.sub(r"[^A-Za-z0-9._+-]+", "_", value.replace("/", "--")).lstrip(".") or "_"
    if len(value) > 48:
        value = f"{value[:40]}_{hashlib.sha1(value.encode()).hexdigest()[:7]}"
    return value


UNNAMED |= set(ATTACK_FLAGS)  # the attacks (evaluation/attacks.py) evaluate the saved model, not change it


def run_name(args, defaults, model: str = models.QUICK) -> str:
    """The default run folder's name: <split>[-task<k>], then the model if it is not the quick one,
    then <flag>_<value> for every other flag that differs from `defaults` (what it would be if left
    unset), sorted by flag; UNNAMED flags are left out. Defaults give just the split:
    runs/rkld/forget01; --divergence fkl gives runs/rkld/forget01-divergence_fkl."""
    parts = [args.split] + ([f"task{args.forget_task}"] if args.forget_task else [])
    if model != models.QUICK:
        parts.append(f"model_{path_part(model)}")
    if getattr(args, "recipe", None) not in (None, resolve_recipe("auto", model == models.QUICK)):
        parts.append(f"recipe_{args.recipe}")  # the other recipe's values are then the defaults, not named
    for f in sorted(f.name for f in dataclasses.fields(args)) if defaults is not None else []:
        filled = getattr(args, "scenario", "tofu") == "real_world" and f in ("forget_data", "retain_data")
        if f not in UNNAMED and not filled and not f.startswith("eval") and getattr(args, f) != getattr(defaults, f):
            parts.append(f"{f}_{path_part(getattr(args, f))}")
    name = "-".join(parts)
    if len(name) > 150:  # file systems allow 255 bytes; keep the start readable and the whole distinct
        name = f"{name[:140]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def check_run_folder(args) -> None:
    """Refuse to reuse a run folder that holds a finished run (args.json and the saved model/) made
    with other arguments, unless --overwrite: nothing finished is replaced silently. The same
    arguments may run again (the run is redone in place, reusing the caches of its folder)."""
    out = Path(args.output_dir)
    if getattr(args, "overwrite", False) or not ((out / "args.json").exists() and (out / "model").exists()):
        return
    try:
        saved = json.loads((out / "args.json").read_text())["args"]
    except (ValueError, KeyError, TypeError):
        raise TofuError(f"{out} holds a model but an unreadable args.json; pass --overwrite to replace the run, "
                        "or choose another --output_dir") from None
    now = json.loads(json.dumps(dataclasses.asdict(args), default=str))
    missing = "(not recorded)"
    diff = [f"--{k} {saved.get(k, missing)} there, {now.get(k, missing)} now" for k in sorted(set(saved) | set(now))
            if k not in ("output_dir", "overwrite") and saved.get(k, missing) != now.get(k, missing)]
    if diff:
        raise TofuError(f"{out} holds a finished run made with other arguments ({'; '.join(diff)}); pass --overwrite "
                        "to replace it, or choose another --output_dir")
