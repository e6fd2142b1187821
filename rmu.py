"""RMU (Representation Misdirection for Unlearning): push one hidden layer's activations on forget
tokens towards a fixed random direction, keep them on retain tokens, training only a few layers.

Paper: The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning
       (Li et al., 2024), arXiv:2403.03218, section 5 (RMU) and App. B (hyperparameters).
Reference code: github.com/centerforaisafety/wmdp (rmu/unlearn.py); on TOFU, open-unlearning
       (locuslab/open-unlearning, src/trainer/unlearn/rmu.py, configs/trainer/RMU.yaml).

Objective (h_l = the output of decoder layer l, i.e. hidden_states[l + 1]; u a fixed random unit vector):
  L = gamma * L_forget + alpha * L_retain
  L_forget = mean over forget sequences of the mean over their answer tokens t of
             (1/d) * ||h_l(x_f)_t - c * u||^2
  L_retain = the same with target h_l^frozen(x_r)_t, the frozen starting model's activation on the
             retain pair (--retain_loss activations, the paper's); --retain_loss gd: retain NLL instead
  u: uniform [0, 1)^d, normalised to length 1, drawn once from --seed (the reference code's torch.rand).
  Only the parameters of --trained_modules in --trained_layers (layers at or below l) train.
  (1/d: the reference code's mse_loss averages over the d hidden units; the paper writes the squared
  norm. c and alpha were tuned with the mean, so we keep it. docs/specs.md, RMU.)

Launch:
  python rmu.py --split forget01                          # quick CPU path (embedded SmolLM2-135M)
  accelerate launch rmu.py --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Reproducing the paper (WMDP, Zephyr-7B, App. B): the defaults: --layer 7, --trained_layers 5,6,7,
  --trained_modules mlp.down_proj, --steering_coeff 6.5, --alpha 1200 (lr 5e-5 there; on TOFU we keep the
  shared lr 1e-5, batch 32, 10 epochs of open-unlearning's TOFU runs).
open-unlearning on TOFU (RMU.yaml): --steering_coeff 2 --alpha 1 --trained_modules all
  --trained_layers 0,1,...,7 (it trains every parameter: those above layer 7 get no gradient, and the
  embeddings, which it also trains, stay frozen here).
LoRA: --lora_r puts the adapter on exactly the trained modules (named modules only, not "all").
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F


# ====================================================================
# METHOD LOGIC (the part people copy): pure functions, no globals, no I/O
# ====================================================================
# Shapes: hidden [B, T, d] (one layer's activations, any dtype, upcast to fp32 here), mask [B, T]
# (True on the tokens a term averages over: the answer tokens, labels != -100, unshifted: the
# activation at position t is the one of token t). logits [B, T, V], labels [B, T] for the retain NLL.


def control_vector(dim: int, coeff: float, seed: int = 0) -> torch.Tensor:
    """c * u [d]: u uniform on [0, 1)^d from a generator seeded with `seed`, scaled to unit length
    (the WMDP code's torch.rand; all units positive), then multiplied by the steering coefficient c."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return coeff * u / u.norm()


def activation_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences (those with at least one masked token) of the mean over their masked
    tokens t of (1/d) * ||hidden_t - target_t||^2. target is [B, T, d] or a vector [d] broadcast to
    every token; it is detached (a constant)."""
    sq = (hidden.float() - target.detach().float()).pow(2).mean(-1)
    m = mask.to(sq.dtype)
    n = m.sum(-1)
    per_seq = (sq * m).sum(-1) / n.clamp(min=1)
    has = n > 0
    return per_seq[has].sum() / has.sum().clamp(min=1)


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's forget term: activation_mse(h_l(x_f), c * u, answer tokens). control = control_vector(...)."""
    return activation_mse(hidden, control, mask)


def rmu_retain_loss(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's retain term: activation_mse(h_l(x_r), h_l^frozen(x_r), answer tokens); ref_hidden detached."""
    return activation_mse(hidden, ref_hidden, mask)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL = -(sum of log p(label) over all scored tokens in the micro-batch) / (their count).

    A token mean over the micro-batch, not a mean of per-sequence means: the semantics of
    HF `outputs.loss`, used by every reference for GD (retain) and IDK (forget). Averages over
    answer tokens only (labels != -100). An empty batch gives 0, not NaN.
    """
    n_tokens = (labels[:, 1:] != -100).sum()
    return -sequence_logprob(logits, labels).sum() / n_tokens.clamp(min=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence [B]: sum over scored tokens (labels[:, 1:] != -100) of the
    fp32 log-prob of the label, taken from log_softmax (cross_entropy) of logits[:, :-1]."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                          ignore_index=-100, reduction="none")
    return -nll.sum(-1)


# ====================================================================
# ARGUMENTS
# ====================================================================
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

import common  # noqa: E402
from common import TofuError  # noqa: E402
from evaluation import method_eval  # noqa: E402
from harness import flags, forward_batch, launch, models, runlog, scenarios  # noqa: E402


@dataclasses.dataclass
class Args(flags.MethodArgs):
    layer: int = flags.flag(7, "l: the decoder layer (0-based) whose output activations RMU steers (WMDP App. B: 7 for Zephyr-7B; open-unlearning RMU.yaml on TOFU: model.layers.7). Must be below the last layer (the last one's hidden state is taken after the final norm).")
    steering_coeff: float = flags.flag(6.5, "c, the length of the target c*u on forget tokens (WMDP App. B: 6.5 for Zephyr-7B; open-unlearning RMU.yaml on TOFU: 2). It should be several times the layer's typical activation size.")
    alpha: float = flags.flag(1200.0, "Weight of the retain term (WMDP App. B: 1200 for Zephyr-7B; open-unlearning RMU.yaml on TOFU: 1).")
    forget_weight: float = flags.flag(1.0, "gamma, weight of the forget term (open-unlearning RMU.yaml: 1; the paper has none).")
    trained_layers: str = flags.flag(None, "Comma-separated decoder layers whose --trained_modules train, each at or below --layer (no gradient reaches the ones above). Default: l-2, l-1, l (WMDP App. B: layers 5, 6, 7 for l = 7; open-unlearning on TOFU trains every parameter: 0,...,7 with --trained_modules all).")
    trained_modules: str = flags.flag("mlp.down_proj", "Comma-separated modules inside each trained layer, named as in the model (mlp.down_proj: the WMDP code's parameter 6 of a Zephyr layer, the MLP's output projection), or 'all' (every parameter of those layers, as open-unlearning's TOFU config: .*). With --lora_r the adapter goes on exactly these modules, so 'all' is refused there.")
    pad_to: int = flags.flag(0, "Pad batch parts to this many tokens (0: the longest in the micro-batch). RMU's terms average over answer tokens only, so padding never counts and 0 is the only useful value; kept for the shared main().")
    retain_loss: str = flags.flag("activations", "activations = ||h_l - h_l^frozen||^2 on retain answer tokens (WMDP §5; open-unlearning EMBED_DIFF), or gd = retain NLL (open-unlearning retain_loss_type NLL).")

    def __post_init__(self):
        # Checked at parse time, before any model is loaded or evaluated.
        if self.retain_loss not in ("activations", "gd"):
            raise TofuError(f"--retain_loss must be activations or gd, not {self.retain_loss!r}")
        if self.pad_to < 0:
            raise TofuError(f"--pad_to must be 0 (pad to the longest) or a length, not {self.pad_to}")
        if self.layer < 0:
            raise TofuError(f"--layer must be 0 or more, not {self.layer}")
        if self.trained_layers is None:
            self.trained_layers = ",".join(str(i) for i in range(max(0, self.layer - 2), self.layer + 1))
        try:
            layers = [int(x) for x in self.trained_layers.split(",") if x.strip()]
        except ValueError:
            raise TofuError(f"--trained_layers must be comma-separated layer numbers, not {self.trained_layers!r}") from None
        if not layers or any(i < 0 or i > self.layer for i in layers):
            raise TofuError(f"--trained_layers {self.trained_layers} must name layers from 0 to --layer {self.layer}: "
                            "no gradient reaches a layer above it")
        if not self.trained_modules.strip():
            raise TofuError("--trained_modules is empty; name modules (e.g. mlp.down_proj) or use all")
        if self.lora_r:
            if self.trained_modules.strip() == "all":
                raise TofuError("--lora_r puts the adapter on the trained modules, so name them (e.g. "
                                "mlp.down_proj,self_attn.o_proj) instead of --trained_modules all")
            if self.lora_target_modules != "all-linear":
                raise TofuError("rmu.py chooses the adapter's modules from --trained_layers and --trained_modules; "
                                "drop --lora_target_modules")
            self.lora_target_modules = ",".join(f"layers.{i}.{m.strip()}" for i in layers
                                                for m in self.trained_modules.split(",") if m.strip())


METHOD = "rmu"
PAPER = {"lr": 1e-5, "epochs": 10, "batch_size": 32,
         "_source": "open-unlearning's TOFU runs (finetune.yaml: lr 1e-5, 10 epochs)"}
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8, "_source": "ours: rkld.py's quick recipe, not tuned for RMU"}


# ====================================================================
# METHOD SETUP AND STEP (RMU-specific; the loop in main() calls these)
# ====================================================================
def decoder_layers(model) -> str:
    """The name of the model's list of decoder layers (model.layers for Llama-like models): the
    ModuleList with config.num_hidden_layers entries."""
    n = model.config.num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return name
    raise TofuError(f"found no list of {n} decoder layers in {type(model).__name__}; rmu.py needs one")


def freeze_all_but(model, layers_name: str, layers: list[int], modules: list[str]) -> list[str]:
    """Train only the parameters of `modules` (or every one, 'all') in decoder layers `layers`;
    returns their names. Refuses a module that names no parameter."""
    prefixes = [f"{layers_name}.{i}." + ("" if m == "all" else f"{m}.") for i in layers for m in modules]
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(n.startswith(p) for n in names):
            raise TofuError(f"--trained_modules: no parameter {p}*; name modules inside a layer (e.g. mlp.down_proj) "
                            "or use all")
    trained = []
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith(q) for q in prefixes))
        if p.requires_grad:
            trained.append(n)
    return trained


def setup_frozen(args, ds, tok, accelerator, evaluator) -> dict:
    """The trained model with only the chosen parameters trainable (with LoRA: the adapter on them),
    the frozen starting model (a copy; with LoRA the base with the adapter off) for the retain term,
    and the control vector c*u."""
    if not ds.retain:
        raise TofuError(f"rmu.py needs retain rows, but {scenarios.retain_source(args)} has none")
    model = models.load_trained(args, accelerator)
    n_layers = model.config.num_hidden_layers
    if args.layer >= n_layers - 1:
        raise TofuError(f"--layer {args.layer} must be below the model's last layer ({n_layers - 1}): choose 0 to "
                        f"{n_layers - 2}")
    if not args.lora_r:
        layers = [int(x) for x in args.trained_layers.split(",") if x.strip()]
        freeze_all_but(model, decoder_layers(model), layers, [m.strip() for m in args.trained_modules.split(",")])
    frozen = {"model": model, "control": control_vector(model.config.hidden_size, args.steering_coeff, args.seed)}
    if args.retain_loss == "activations":
        frozen["ref"] = launch.starting_model(args, accelerator, frozen)  # with LoRA: the trained model's base
    return frozen


def padded_parts(args) -> tuple[str, ...]:
    """No term averages over padding: every part is padded to the longest in its micro-batch."""
    return ()


def batch_parts(args) -> tuple[str, ...]:
    """The batch parts step_losses reads (common.ForgetRetainDataset tokenizes only these)."""
    return ("forget", "retain")


def hidden(model, part: dict, layer: int) -> torch.Tensor:
    """The output of decoder layer `layer` [B, T, d] (hidden_states[0] is the embeddings)."""
    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer + 1]


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': gamma * forget + alpha * retain, 'loss/forget': ..., 'loss/retain': ...} for one micro-batch."""
    f, r = batch["forget"], batch["retain"]
    h = hidden(model, f, args.layer)
    frozen["control"] = frozen["control"].to(h.device)  # copied to the device once, not every micro-batch
    out = {"loss/forget": rmu_forget_loss(h, frozen["control"], f["labels"] != -100)}
    if args.retain_loss == "activations":
        with torch.no_grad():
            h_ref = hidden(frozen["ref"], r, args.layer)
        out["loss/retain"] = rmu_retain_loss(hidden(model, r, args.layer), h_ref, r["labels"] != -100)
    else:
        out["loss/retain"] = nll_loss(model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits,
                                      r["labels"])
    out["loss"] = args.forget_weight * out["loss/forget"] + args.alpha * out["loss/retain"]
    return out


# ====================================================================
# MAIN (shared boilerplate: identical in every method script)
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


def main():
    args = flags.finalize_args(flags.parse(Args, QUICK, PAPER), METHOD, QUICK, PAPER)
    accelerator, ga = launch.make_accelerator(args.batch_size, args.per_device_batch_size, args.max_grad_norm,
                                              args.report_to, args.output_dir)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    tok = models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model, args.prompt_format, args.system_prompt)
    forget, retain = scenarios.method_rows(args)
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed, idk=common.load_idk(),
                                    parts=batch_parts(args))
    loader = launch.make_loader(ds, args.per_device_batch_size, args.seed, accelerator,
                                lambda b: common.collate_pairs(b, tok.pad_token_id, args.pad_to, padded_parts(args)))
    derived = {"world_size": accelerator.num_processes, "grad_accum": ga,
               "effective_batch": args.per_device_batch_size * ga * accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type), "forget_rows": len(forget),
               "retain_rows": len(retain), "truncated": ds.n_truncated, "prompt_format": dataclasses.asdict(fmt),
               **launch.step_counts(len(ds), args.per_device_batch_size, accelerator, args.epochs, args.warmup_epochs,
                                    args.max_steps, args.schedule)}
    if accelerator.is_main_process:
        print(flags.recipe_line(METHOD, args, derived, (QUICK if args.recipe == "quick" else PAPER).get("_source")))
    log = runlog.RunLogger(out_dir, args, derived, accelerator.is_main_process, accelerator, defer=True)
    evaluator = method_eval.MethodEval(args, tok, fmt, accelerator, out_dir, log)
    frozen = setup_frozen(args, ds, tok, accelerator, evaluator)  # stages that train (strengthening) end here
    history = [(k.split("/")[1], v) for k, v in frozen.items() if k.startswith("eval/")]
    model = frozen.pop("model", None) or models.load_trained(args, accelerator)  # with --lora_r: base + adapter
    forward_batch.share_forwards(frozen)  # frozen models batch like the trained one under --forward_batch
    log.open()  # set up without a refusal: the run folder gets args.json and metrics.jsonl now

    def at_epoch(epoch, prepared):  # epoch 0: the starting model, evaluated as prepared for training
        if epoch == 0:
            history.insert(0, ("before", evaluator.run(prepared, "before", cache_key=args.model)))
        else:  # --eval_every_epoch: in full; --peak_epoch: forget quality, keeping the best epoch's weights
            history.extend(evaluator.epoch_end(prepared, epoch))

    model = fit(accelerator, model, loader, lambda m, b: step_losses(m, b, frozen, args), args, args.epochs,
                args.lr, METHOD, log, at_epoch)
    frozen.clear()  # the frozen models are no longer needed: free them before the last evaluation
    launch.save_model(accelerator, model, tok, fmt, out_dir / "model")
    if accelerator.is_main_process:
        print(f"[{METHOD}] saved the unlearned model to {out_dir / 'model'}")
    history.append(("after", evaluator.run(model, "after")))
    launch.release(accelerator, model)
    history.extend(evaluator.peak(history[-1][1], args.epochs))  # --peak_epoch: that epoch in full
    evaluator.attack(out_dir / "model", history)  # --relearn_attack, --quantize_attack (evaluation/attacks.py)
    evaluator.report(history)
    log.finish()


if __name__ == "__main__":
    common.cli(main)
