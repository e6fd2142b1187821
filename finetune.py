"""Stage 0 of TOFU: fine-tune a base model into the target model and the retain (oracle) model.

TOFU: A Task of Fictitious Unlearning for LLMs (Maini et al. 2024, arXiv 2401.06121).
  target model  = base fine-tuned on `full`       (what unlearning starts from)
  retain model  = base fine-tuned on `retainXX`   (never saw the forget split; forget quality
                                                   compares an unlearned model against it)
  objective: mean NLL of the answer tokens (question masked), AdamW, warmup then linear decay.

  python finetune.py --split forget01                      # quick CPU subset, embedded SmolLM2-135M
  accelerate launch finetune.py --model meta-llama/Llama-2-7b-chat-hf --split forget05 --subset all

Reproducing TOFU: `--subset all` with the 7B defaults (lr 1e-5, 5 epochs, wd 0.01, effective
batch 32, one warmup epoch; TOFU finetune.py and config/finetune.yaml).
The quick subset (CPU): every author of the forget split plus authors 0-3 (common.quick_authors).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import common
from harness import flags, forward_batch, launch, models, runlog, scenarios
from common import TofuError


# ====================================================================
# ARGUMENTS
# ====================================================================
@dataclasses.dataclass
class _Flags:
    recipe: str = dataclasses.field(default="auto", metadata={"help": "The recipe that fills --lr, --epochs and --batch_size when left unset (each flag's help gives both): 'paper' (TOFU's, for a 7B model), 'quick' (ours, for the embedded preset on a 2-core CPU), or 'auto' (default): quick for the embedded preset, paper for any other model. Printed at start with its effective values."})
    model: str = dataclasses.field(default="smollm2-135m", metadata={"help": "Base model: HF id, local folder, or the embedded preset 'smollm2-135m' (SmolLM2-135M-Instruct, offline)."})
    split: str = dataclasses.field(default="forget01", metadata={"help": "Forget split whose target/retain pair to build: forget01, forget05 or forget10 (retain model trains on retain99/95/90)."})
    forget_data: str = dataclasses.field(default=None, metadata={"help": "Your own forget set instead of --split (JSON lines, CSV or Parquet with question and answer, as the method scripts' --forget_data): the target model trains on it plus --retain_data, so unlearning has something to remove."})
    retain_data: str = dataclasses.field(default=None, metadata={"help": "Your own retain set, with --forget_data: the target trains on it too, and the retain model on it alone (the yardstick of forget quality and the MIAs). Without it only the target is built."})
    build: str = dataclasses.field(default="both", metadata={"help": "Which models to build: both, target or retain."})
    subset: str = dataclasses.field(default="auto", metadata={"help": "Authors to train on: 'quick' (forget-split authors + authors 0..quick_retain_authors-1), 'all' (the TOFU benchmark), or 'auto' (quick for the embedded preset, all otherwise)."})
    quick_retain_authors: int = dataclasses.field(default=common.QUICK_RETAIN_AUTHORS, metadata={"help": "Retain authors kept by the quick subset (authors 0..N-1, 20 questions each)."})
    continual: bool = dataclasses.field(default=False, metadata={"help": "Build the continual scenario's quick target (scripts/continual.py on the quick path): the quick subset plus every author of the split's continual tasks (closer-look §5.2; forget01: authors 180-199, 480 questions with authors 0-3), so every task unlearns authors the model learned. Target only: continual tasks have no retain model."})
    lr: float = dataclasses.field(default=None, metadata={"help": "Learning rate. Default: 1e-5 (TOFU, Llama-2-7B); 2e-4 for the embedded preset (measured here: ROUGE-L recall 0.93 on forget-author and 0.86 on retain-author training answers after 4 epochs)."})
    epochs: int = dataclasses.field(default=None, metadata={"help": "Epochs. Default: 5 (TOFU); 4 for the embedded preset."})
    batch_size: int = dataclasses.field(default=None, metadata={"help": "Effective batch size (per device x grad accumulation x processes). Default: 32 (TOFU); 8 for the embedded preset."})
    per_device_batch_size: int = dataclasses.field(default=8, metadata={"help": "Micro-batch per process; gradient accumulation makes up the rest of batch_size."})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": "AdamW weight decay (TOFU: 0.01)."})
    warmup_epochs: float = dataclasses.field(default=1.0, metadata={"help": "Linear warmup length in epochs, then linear decay to 0 (TOFU: one epoch)."})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    max_length: int = dataclasses.field(default=512, metadata={"help": "Max tokens per example; longer ones are truncated and counted (TOFU: 500, open-unlearning: 512)."})
    prompt_format: str = dataclasses.field(default="auto", metadata={"help": "auto, chat, llama2 or phi (see common.PromptFormat). Must match unlearning and evaluation."})
    system_prompt: str = dataclasses.field(default="auto", metadata={"help": common.SYSTEM_PROMPT_HELP + " Saved with the model, so unlearning and evaluation use it."})
    seed: int = dataclasses.field(default=42, metadata={"help": "Seed (TOFU finetune: 42)."})
    output_root: str = dataclasses.field(default=str(common.RUNS_DIR / "models"), metadata={"help": "Models go to OUTPUT_ROOT/<model>_<subset>_<data>."})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "Rebuild a model that already exists."})
    schedule: str = dataclasses.field(default="epochs", metadata={"help": "epochs: every epoch in full, --warmup_epochs of warmup (TOFU finetune.py's floor(5 x 4000 / 32) = 625 steps is the same on the full set); reference: floor(epochs x N / batch) steps, as the unlearning scripts' --schedule."})
    last_window: str = dataclasses.field(default="mean", metadata={"help": "The last, short accumulation window of an epoch: mean = the mean over its own micro-batches; reference = divided by the full accumulation, as TOFU's HF Trainer does."})
    max_steps: int = dataclasses.field(default=0, metadata={"help": "Stop each model after this many optimizer steps (0: every epoch); for smoke tests."})
    report_to: str = dataclasses.field(default="none", metadata={"help": "Experiment trackers through accelerate (main process only): tensorboard (OUTPUT_ROOT/tensorboard), wandb, all (those installed) or none; they get the arguments and each model's losses under <data>/loss."})
    report_rows: int = dataclasses.field(default=20, metadata={"help": "Questions per group (forget authors, retain authors) in the end-of-run ROUGE report; 0 skips it."})


@dataclasses.dataclass
class Args(flags.MemoryArgs, _Flags):
    """finetune.py's flags, then the LoRA and memory flags every script shares."""


EMBEDDED_RECIPE = {"lr": 2e-4, "epochs": 4, "batch_size": 8, "_source": "ours, measured on the embedded preset"}
TOFU_RECIPE = {"lr": 1e-5, "epochs": 5, "batch_size": 32, "_source": "TOFU finetune.py, config/finetune.yaml"}


def resolve(args: Args) -> Args:
    if args.retain_data and not args.forget_data:
        raise TofuError("--retain_data goes with --forget_data; give both, or --split alone")
    if args.forget_data and args.continual:
        raise TofuError("--continual builds TOFU's continual target; leave it unset with --forget_data")
    if args.split not in common.FORGET_SPLITS:
        raise TofuError(f"unknown split '{args.split}'; valid: {', '.join(common.FORGET_SPLITS)}")
    if args.build not in ("both", "target", "retain"):
        raise TofuError("--build must be both, target or retain")
    if args.subset == "auto":
        args.subset = "quick" if args.model in models.PRESETS else "all"
    if args.subset not in ("quick", "all"):
        raise TofuError("--subset must be auto, quick or all")
    flags.check_numbers(args)
    flags.check_memory_args(args)
    if args.continual and args.subset != "quick":
        raise TofuError("--continual builds the quick subset's continual target; with --subset all the target "
                        "already learned every author")
    if args.continual and args.build == "retain":
        raise TofuError("--continual builds the target only (continual tasks have no retain model)")
    args.recipe = flags.resolve_recipe(args.recipe, args.model in models.PRESETS)
    for k, v in (EMBEDDED_RECIPE if args.recipe == "quick" else TOFU_RECIPE).items():
        if not k.startswith("_") and getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ====================================================================
# MAIN (shared boilerplate: fit() is identical to the method scripts')
# ====================================================================
def fit(accelerator, model, loader, loss_fn, args, epochs: int, lr: float, desc: str, log, at_epoch=None):
    """The training loop of every stage (fine-tuning, strengthening, unlearning): AdamW and a linear
    schedule; model, optimizer and loader prepared together (what FSDP2 needs); gradient accumulation
    as the Accelerator was built, the last window of an epoch weighted by its own size; clipping;
    logged losses averaged over the step's micro-batches and every rank. at_epoch(e, model) runs
    before training (e = 0) and after every epoch but the last. Returns the prepared model; the
    caller ends the stage with launch.release()."""
    sizes = launch.step_counts(len(loader.dataset), loader.batch_size, accelerator, epochs, args.warmup_epochs,
                               args.max_steps, args.schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, sizes["warmup_steps"], sizes["total_steps"])
    micro, (model, optimizer, loader) = loader.batch_size, accelerator.prepare(model, optimizer, loader)
    ga, meter, step, total = accelerator.gradient_accumulation_steps, launch.LossMeter(), 0, sizes["total_steps"]
    per_forward = forward_batch.forward_size(accelerator, model, loader, loss_fn, args.forward_batch, micro, ga, desc)
    note = launch.warmup_note(total, sizes["warmup_steps"], lr)
    if note and accelerator.is_main_process:
        print(f"[{desc}] {note}", flush=True)
    if at_epoch:
        at_epoch(0, model)
    bar, shared = tqdm(total=total, desc=desc, disable=not accelerator.is_main_process), forward_batch.SharedForward(model)
    with forward_batch.forwards_per_step(accelerator, ga // per_forward):  # accelerate counts forwards, not micro-batches
        for epoch in range(epochs if total else 0):
            model.train()
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            for i, batches in forward_batch.forward_groups(loader, per_forward):  # i: the group's first micro-batch
                with accelerator.accumulate(model):
                    with forward_batch.ForwardGroup(batches, accelerator.sync_gradients) as group:
                        losses = group.losses(loss_fn, shared)  # one loss per micro-batch, forwards shared
                    accelerator.backward(forward_batch.group_loss(losses, i, len(loader), ga, per_forward, args.last_window))
                    for one in losses:
                        meter.add(one)
                    if accelerator.sync_gradients:
                        logged = meter.mean(accelerator)  # a collective: every rank stops here, or none does
                        if not math.isfinite(logged["loss"]):
                            raise TofuError(f"loss is {logged['loss']} at step {step + 1} (epoch {epoch}); "
                                            "stopped before saving anything")
                        if args.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    used = scheduler.get_last_lr()[0]  # the rate this step ran at, before the schedule moves on
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items()})
                    log.log(step, {"epoch": epoch, **logged, "lr": used})
                    if step == total:
                        break
            if step == total:
                break
            if at_epoch and epoch + 1 < epochs:
                at_epoch(epoch + 1, model)
    bar.close()
    return model


def train_one(args: Args, rows: list[dict], data: str, out: Path, accelerator) -> dict:
    """Fine-tune args.model on `rows` (named `data` in logs), save it atomically to `out` and release
    everything the stage prepared, so the next model trains alone."""
    set_seed(args.seed)
    model, tok = models.load_trained(args, accelerator), models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model, args.prompt_format, args.system_prompt)
    ds = common.QADataset(rows, tok, fmt, args.max_length)
    loader = launch.make_loader(ds, args.per_device_batch_size, args.seed, accelerator,
                                lambda b: common.collate(b, tok.pad_token_id))
    sizes = launch.step_counts(len(ds), args.per_device_batch_size, accelerator, args.epochs, args.warmup_epochs,
                               args.max_steps, args.schedule)
    derived = {"data": data, "rows": len(ds), "authors": sorted({r["author"] for r in rows}, key=lambda a: (a is None, a or 0)),
               "truncated": ds.n_truncated, "world_size": accelerator.num_processes,
               "grad_accum": accelerator.gradient_accumulation_steps,
               "effective_batch": args.per_device_batch_size * accelerator.gradient_accumulation_steps
               * accelerator.num_processes, "distributed_type": str(accelerator.distributed_type), **sizes,
               "prompt_format": dataclasses.asdict(fmt)}
    log = runlog.RunLogger(out.parent / f".{out.name}.log", args, derived, accelerator.is_main_process, accelerator,
                           prefix=f"{data}/")  # one tracker run, each model's losses under its data's name
    if accelerator.is_main_process:
        print(f"[finetune] {data}: {len(ds)} rows ({ds.n_truncated} truncated to {args.max_length} tokens)\n"
              + flags.recipe_line("finetune", args, derived,
                                  (EMBEDDED_RECIPE if args.recipe == "quick" else TOFU_RECIPE)["_source"]), flush=True)
    t0 = time.time()
    model = fit(accelerator, model, loader, lambda m, b: {"loss": m(**b).loss}, args, args.epochs, args.lr,
                f"finetune {data}", log)  # HF loss: token-mean NLL of the answer tokens (+EOS)
    train_s = time.time() - t0
    launch.save_model(accelerator, model, tok, fmt, out, log.dir)  # args.json and metrics.jsonl go with the model
    launch.release(accelerator, model)
    return {"rows": rows, "train_s": train_s}


def custom_rows(forget_data: str, retain_data: str | None) -> dict[str, list[dict]]:
    """Your own sets as finetune.py trains on them: the target on forget + retain rows, the retain
    model on the retain rows; each row keeps the `author` its own set gave it (None without a name)."""
    forget = scenarios.load_custom(forget_data)
    retain = scenarios.load_custom(retain_data, "--retain_data") if retain_data else []
    return {"forget": forget, "target": forget + retain, "retain": retain}


def learned_answers(model, tok, fmt, rows, forget: list[dict], accelerator, n: int = 40) -> list[tuple]:
    """ROUGE-L recall of greedy answers to up to n questions of the forget set (TOFU's forget-split
    authors, or your --forget_data) and n of the other rows trained on. This is what 'the model
    memorized them' means."""
    from evaluation import engine, metrics
    asked = {r["question"] for r in forget}
    groups = {"forget authors": forget[:n], "retain authors": [r for r in rows if r["question"] not in asked][:n]}
    groups = {k: v for k, v in groups.items() if v}
    out = []
    for name, group in groups.items():
        gens = engine.generate_answers(model, tok, fmt, [r["question"] for r in group], accelerator=accelerator)
        scores = [metrics.rouge_recall(g, r["answer"])[1] for g, r in zip(gens, group)]
        out.append((name, len(group), sum(scores) / len(scores)))
    return out


def main():
    args = resolve(flags.parse(Args, EMBEDDED_RECIPE, TOFU_RECIPE))
    accelerator, _ = launch.make_accelerator(args.batch_size, args.per_device_batch_size, args.max_grad_norm,
                                             args.report_to, args.output_root)
    builds = {"target": "full", "retain": common.RETAIN_OF[args.split]}
    if args.forget_data:  # your own sets: target on forget + retain, retain model on retain alone
        custom = custom_rows(args.forget_data, args.retain_data)
        builds = {"target": "custom_target", **({"retain": "custom_retain"} if args.retain_data else {})}
    if args.build != "both" or args.continual:
        builds = {"target": builds["target"]} if args.continual else {args.build: builds[args.build]}
    if args.forget_data and not builds:
        raise TofuError("--build retain needs --retain_data: the retain model trains on your retain set")
    built, paths = [], {}
    for role, data in builds.items():
        if args.forget_data:
            out = Path(args.output_root) / f"{models.finetuned_dir(args.model, args.split, 'all', data).name}-" \
                f"{scenarios.custom_fingerprint(args.forget_data, args.retain_data)}"
        else:
            out = models.finetuned_dir(args.model, args.split, args.subset, data, args.quick_retain_authors,
                                       args.output_root, args.continual)
        paths[role] = out
        if (out / "config.json").exists() and not args.overwrite:
            if accelerator.is_main_process:
                print(f"[finetune] {role} model exists: {out} (use --overwrite to rebuild)")
            continue
        if args.forget_data:
            rows = custom[role]
        else:
            authors = (common.quick_authors(args.split, args.quick_retain_authors, args.continual)
                       if args.subset == "quick" else None)
            rows = common.select_authors(common.load_split(data), authors)
        Path(args.output_root).mkdir(parents=True, exist_ok=True)
        res = train_one(args, rows, data, out, accelerator)
        built.append((role, out, res["rows"], res["train_s"]))
        del res
    summary = []
    for role, out, rows, train_s in built if args.report_rows else []:  # once every model is on disk
        model, tok = models.load_model(str(out), frozen=True)
        fmt = models.prompt_format(tok, str(out))
        forget = custom["forget"] if args.forget_data else common.load_split(args.split)
        for group, n, rouge in learned_answers(launch.place_frozen(model, accelerator), tok, fmt, rows, forget,
                                               accelerator, args.report_rows):
            summary.append((role, out.name, group, n, rouge, f"{train_s / 60:.1f} min"))
    if accelerator.is_main_process and summary:
        print("\nHow well each model learned its answers (ROUGE-L recall of greedy answers to training questions;"
              "\nthe retain model never saw the forget authors, so its forget-author score is the floor):")
        print(runlog.table(summary, ("model", "folder", "questions", "n", "ROUGE-L", "train time")))
    if accelerator.is_main_process and args.forget_data:
        retain = f" --retain_model {paths['retain']}" if "retain" in paths else ""
        data = f"--forget_data {args.forget_data}" + (f" --retain_data {args.retain_data}" if args.retain_data else "")
        print(f"\n[finetune] unlearn your forget set from the target, forget quality against the retain model:\n"
              f"  python rkld.py --model {paths.get('target', '<target>')}{retain} {data}")
    accelerator.end_training()  # the --report_to trackers, if any


if __name__ == "__main__":
    common.cli(main)
