"""ME+GD: untargeted unlearning by maximising the entropy of every next-token prediction
on the forget set, with gradient descent (or KL) on the retain set.

Paper: A Closer Look at Machine Unlearning for Large Language Models
       (Yuan et al., 2024), arXiv:2410.08109, section 3, Eq. 6-7, App. B, D, E.2, E.5.
Reference code: github.com/sail-sg/closer-look-LLM-unlearning (trainer/losses.py, ME).

Objective:
  L = alpha * L_ME(forget) + L_retain
  L_ME  = mean over positions t of KL(U || p_theta(. | x'_<t)),  x' = question + answer (+ padding),
          U uniform over the V tokens
          KL(U || p) = -log V - (1/V) * sum_v log(p(v) + 1e-12)   (what the reference code computes)
          --me_divergence paper: KL(p || U) = log V - H(p)   (the paper's Eq. 6 as written)
          --me_epsilon 0: exact log_softmax instead of log(softmax + 1e-12)
          positions: all B x (T-1) of the batch padded to T = --pad_to (500), padding included,
          as in the reference code (mask=false); --loss_reduction tokens: question and answer
          tokens only (the paper's text); --mask_question: answer tokens only (App. E.5)
  L_retain = NLL_theta(y_r | x_r)  (GD, token mean over retain answer tokens)
          or KL(p_ref || p_theta) on the retain pair (ME+KL), averaged like L_ME (all B x T
          positions by default; non-padding positions with --loss_reduction tokens)

Launch:
  python me_gd.py --split forget01                      # quick CPU path (embedded SmolLM2-135M)
  accelerate launch me_gd.py --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Reproducing the paper:
  TOFU (section 5.1): defaults, i.e. --alpha 0.1 --retain_loss gd, lr 1e-5, wd 0.01, effective
    batch 32, 5 epochs, one warmup epoch then linear decay (App. D).
  ME+KL (App. E.2): --retain_loss kl.
  Loss over answer tokens only (App. E.5 ablation): --mask_question.
  LoRA (App. E.8, Table 9): --lora_r 8 --lora_alpha 32 --epochs 5 and --lr from {5e-5, 1e-4, 2e-4,
    5e-4} (the paper reports the best-balanced one); the reference is the base with the adapter off.
  Continual unlearning (section 5.2): --forget_task k (alpha then defaults to 1.0), with --model
    set to the previous task's model/ folder; scripts/continual.py runs the whole sequence.
  alpha = 0.1 was tuned for the reference code's ME: log(softmax + 1e-12), averaged over every
  position of a batch padded to 500, mostly padding (losses.md section 8, quirk 2). The defaults
  (--me_divergence reference --me_epsilon 1e-12 --loss_reduction reference --pad_to 500)
  compute exactly that, so alpha keeps its meaning; the quick path pads to the longest item
  (--pad_to 0). --loss_reduction tokens --me_epsilon 0 is the clean loss over real tokens,
  whose strength per unit alpha differs.
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
# Shapes: logits [B, T, V] (any dtype, upcast to fp32 here), labels [B, T] with -100 on
# prompt and padding, attention_mask [B, T] with 0 on padding. logits[:, t] predict
# token t + 1.


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence [B]: sum over scored tokens (labels[:, 1:] != -100) of the
    fp32 log-prob of the label, taken from log_softmax (cross_entropy) of logits[:, :-1]."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                          ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def me_loss(logits: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
            divergence: str = "kl_u_p", mask_question: bool = False, reduction: str = "reference",
            eps: float = 1e-12) -> torch.Tensor:
    """Maximum-entropy forget loss: mean over positions t of D(p_theta,t, U), U uniform over V.

    divergence:
      "kl_u_p" (alias "reference", default): KL(U || p_t) = -log V - (1/V) sum_v log p_t(v)
          = CE(U, p_t) - log V. The reference code's choice; its logit gradient is p_t - U.
      "kl_p_u" (alias "paper"): KL(p_t || U) = sum_v p_t(v) log p_t(v) + log V = log V - H(p_t),
          Eq. 6 as written in the paper.
    Both are zero exactly when p_t is uniform.

    log p: eps > 0 gives log(softmax(logits) + eps), the reference code's form (eps = 1e-12,
    closer-look trainer/losses.py); it caps -log p at about 27.6 and removes the gradient of
    tokens with p << eps. eps = 0 gives the exact fp32 log_softmax.

    Positions t (logits[:, t] predict token t + 1; the last position predicts nothing):
      reduction "reference" (default): every one of the B x (T - 1) positions of the batch,
          padding included, as the reference computes it (mask=false: its labels are the whole
          padded input, so nothing is -100; losses.md section 1.5 and section 8, quirk 2). The
          reference pads every batch to T = 500 (see the --pad_to flag); padding positions
          are computed by the model and receive gradient.
      reduction "tokens": only positions whose input and target token are both real
          (attention_mask == 1): question and answer tokens, never padding (the paper's text).
      mask_question=True (App. E.5 ablation), either reduction: only answer targets
          (labels[:, 1:] != -100), which is what the reference averages over with mask=true.
    Reduction: a mean over the kept positions of the micro-batch (a token mean; the paper's
    per-sequence mean then batch mean agrees when sequences have equal length).
    """
    x = logits[:, :-1].float()
    p = F.softmax(x, dim=-1)
    logp = torch.log(p + eps) if eps > 0 else F.log_softmax(x, dim=-1)
    vocab = logp.size(-1)
    if divergence in ("kl_u_p", "reference"):
        per_position = -logp.mean(-1) - math.log(vocab)
    elif divergence in ("kl_p_u", "paper"):
        per_position = (p * logp).sum(-1) + math.log(vocab)
    else:
        raise ValueError(f"unknown ME divergence {divergence!r}; use 'kl_u_p' (reference code) "
                         f"or 'kl_p_u' (paper).")
    if mask_question:
        if labels is None:
            raise ValueError("me_loss with mask_question=True needs labels to find the answer tokens.")
        keep = labels[:, 1:] != -100
    elif reduction == "reference":
        return per_position.mean()
    elif reduction == "tokens":
        keep = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    else:
        raise ValueError(f"unknown reduction {reduction!r}; use 'reference' (B x T, padding included) or 'tokens'.")
    return per_position[keep].sum() / keep.sum().clamp(min=1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL = -(sum of log p(label) over all scored tokens in the micro-batch) / (their count).

    A token mean over the micro-batch, not a mean of per-sequence means: the semantics of
    HF `outputs.loss`, used by every reference for GD (retain) and IDK (forget). Averages over
    answer tokens only (labels != -100). An empty batch gives 0, not NaN.
    """
    n_tokens = (labels[:, 1:] != -100).sum()
    return -sequence_logprob(logits, labels).sum() / n_tokens.clamp(min=1)


def kl_retain_loss(logits: torch.Tensor, ref_logits: torch.Tensor, attention_mask: torch.Tensor,
                   reduction: str = "reference") -> torch.Tensor:
    """Retain KL = mean over positions t of KL(p_ref,t || p_theta,t)
    = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v)).

    Direction: the frozen reference model is the target distribution p, the trained model
    is q (forward KL from the reference, as in CL/TOFU/open-unlearning `kl_div(log p_theta,
    log p_ref, log_target=True)`). Logits are not shifted: both models are compared at the
    same positions. ref_logits are detached.
    Positions (project decisions 4 and 5):
      reduction "reference" (default): all B x T positions of the batch, question and padding
          included, divided by B * T (the references' `batchmean` on logits flattened to
          [B*T, V]; they pad every batch to T = 500 in CL and TOFU, see the --pad_to flag).
          attention_mask is not used.
      reduction "tokens": only positions whose input token is real (attention_mask == 1),
          question tokens included; a token mean over the micro-batch.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits.detach().float(), dim=-1)
    per_position = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    if reduction == "reference":
        return per_position.mean()
    if reduction == "tokens":
        keep = attention_mask.bool()
        return per_position[keep].sum() / keep.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; use 'reference' (B x T, padding included) or 'tokens'.")


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
    alpha: float = flags.flag(None, "Weight of the ME loss in alpha*L_ME + L_retain. Default 0.1 (closer-look §5.1, App. D); 1.0 when --forget_task is set (continual unlearning, App. D and E.6).")
    me_divergence: str = flags.flag("reference", "reference = KL(U||p_theta), what the closer-look code computes and what produced its numbers; paper = KL(p_theta||U) = log V - H(p_theta), Eq. 6 as written.")
    mask_question: bool = flags.flag(False, "Average ME over answer tokens only (App. E.5 ablation; the reference code's mask=true). Default: every position (--loss_reduction reference) or question and answer tokens (tokens).")
    me_epsilon: float = flags.flag(1e-12, "ME takes log(softmax + eps) (closer-look trainer/losses.py ME: 1e-12, what produced the paper's numbers; it caps -log p at 27.6 and drops the gradient of tokens with p << eps); 0 = exact fp32 log_softmax.")
    retain_loss: str = flags.flag("gd", "gd = retain NLL (ME+GD, the paper's method) or kl = KL(p_ori||p_theta) on retain pairs (ME+KL, App. E.2; loads the frozen starting model).")
    loss_reduction: str = flags.flag("reference", "How ME and the retain KL average over positions, so that alpha keeps the paper's meaning. reference = mean over all B x T positions of the padded batch, padding included (closer-look trainer/losses.py: ME with mask=false over B x (T-1) shifted positions, KL with kl_div batchmean over B x T); tokens = real tokens only (ME: question and answer tokens; KL: non-padding positions).")
    pad_to: int = flags.flag(None, "Pad the batch parts that --loss_reduction reference averages over (forget for ME unless --mask_question, retain for --retain_loss kl) to this many tokens (or to the longest, if longer), so padding positions count as in the references: closer-look and TOFU pad every sequence to max_length 500 (dataset/data_module.py). Default 500 for real models; 0 (pad to the longest in the micro-batch) for --model quick, to keep the CPU path fast. Ignored with --loss_reduction tokens.")

    def __post_init__(self):
        # Checked at parse time, before any model is loaded or evaluated.
        if self.me_divergence not in ("reference", "paper"):
            raise TofuError(f"--me_divergence must be reference (KL(U||p)) or paper (KL(p||U)), "
                            f"not {self.me_divergence!r}")
        if self.retain_loss not in ("gd", "kl"):
            raise TofuError(f"--retain_loss must be gd or kl, not {self.retain_loss!r}")
        if self.loss_reduction not in ("reference", "tokens"):
            raise TofuError(f"--loss_reduction must be reference (B x T, padding included) or tokens, "
                            f"not {self.loss_reduction!r}")
        if self.pad_to is not None and self.pad_to < 0:
            raise TofuError(f"--pad_to must be 0 (pad to the longest) or a length, not {self.pad_to}")
        if not self.me_epsilon >= 0:
            raise TofuError(f"--me_epsilon must be 0 (exact log_softmax) or positive, not {self.me_epsilon}")
        if self.alpha is None:
            self.alpha = 1.0 if self.forget_task is not None else 0.1


METHOD = "me_gd"
# pad_to: closer-look pads every sequence to max_length 500; the quick path pads per batch (0)
PAPER = {"lr": 1e-5, "epochs": 5, "batch_size": 32, "schedule": "reference", "max_grad_norm": 0.0, "pad_to": 500, "_source": "closer-look App. D"}
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8, "pad_to": 0, "_source": "ours: rkld's quick recipe, not tuned for ME+GD"}


# ====================================================================
# METHOD SETUP AND STEP (ME-specific; the loop in main() calls these)
# ====================================================================
def setup_frozen(args, ds, tok, accelerator, evaluator) -> dict:
    """The frozen starting model, loaded only for --retain_loss kl (the target of KL(p_ori||p_theta)).
    In continual unlearning that is --model, the previous task's output, as in the reference code."""
    if not ds.retain:
        raise TofuError(f"--retain_loss {args.retain_loss} needs retain rows, but {scenarios.retain_source(args)} has none")
    if args.retain_loss != "kl":
        return {"ori": None}
    frozen = {}
    frozen["ori"] = launch.starting_model(args, accelerator, frozen)  # with LoRA: the trained model's base
    return frozen


def padded_parts(args) -> tuple[str, ...]:
    """Batch parts padded to --pad_to: those a reference-reduced loss averages over, padding included
    (the ME term over every forget position, unless --mask_question; the retain KL)."""
    if args.loss_reduction != "reference":
        return ()
    return (*(() if args.mask_question else ("forget",)), *(("retain",) if args.retain_loss == "kl" else ()))


def batch_parts(args) -> tuple[str, ...]:
    """The batch parts step_losses reads (common.ForgetRetainDataset tokenizes only these)."""
    return ("forget", "retain")


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': alpha * ME + retain, 'loss/forget': ME, 'loss/retain': ...} for one micro-batch."""
    f, r = batch["forget"], batch["retain"]
    logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    out = {"loss/forget": me_loss(logits, f["attention_mask"], f["labels"], args.me_divergence, args.mask_question,
                                  args.loss_reduction, args.me_epsilon)}
    r_logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
    if args.retain_loss == "gd":
        out["loss/retain"] = nll_loss(r_logits, r["labels"])
    else:
        with torch.no_grad():
            ref = frozen["ori"](input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        out["loss/retain"] = kl_retain_loss(r_logits, ref, r["attention_mask"], args.loss_reduction)
    out["loss"] = args.alpha * out["loss/forget"] + out["loss/retain"]
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
