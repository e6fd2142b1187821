"""ME+GD: untargeted unlearning by maximising the entropy of every next-token prediction
on the forget set, with gradient descent (or KL) on the retain set.

Paper: A Closer Look at Machine Unlearning for Large Language Models
       (Yuan et al., 2024), arXiv:2410.08109, section 3, Eq. 6-7, App. B, D, E.2, E.5.
Reference code: github.com/sail-sg/closer-look-LLM-unlearning (trainer/losses.py, ME).

Objective:
  L = alpha * L_ME(forget) + L_retain
  L_ME  = mean over positions t of question and answer tokens (never padding) of
          KL(U || p_theta(. | x'_<t)),  x' = question + answer, U uniform over the V tokens
          KL(U || p) = -log V - (1/V) * sum_v log p(v)   (what the reference code computes)
          --me_divergence paper: KL(p || U) = log V - H(p)   (the paper's Eq. 6 as written)
  L_retain = NLL_theta(y_r | x_r)  (GD, token mean over retain answer tokens)
          or mean over non-padding positions of KL(p_ref || p_theta) on the retain pair (ME+KL)

Launch:
  python me_gd.py --split forget01                      # quick CPU path (embedded SmolLM2-135M)
  accelerate launch me_gd.py --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Reproducing the paper:
  TOFU (section 5.1): defaults, i.e. --alpha 0.1 --retain_loss gd, lr 1e-5, wd 0.01, effective
    batch 32, 5 epochs, one warmup epoch then linear decay (App. D).
  ME+KL (App. E.2): --retain_loss kl.
  Loss over answer tokens only (App. E.5 ablation): --mask_question.
  Continual unlearning (section 5.2): --forget_task k (alpha then defaults to 1.0), with --model
    set to the previous task's model/ folder; scripts/continual.py runs the whole sequence.
  The reference code also averages ME over padding up to length 500 (losses.md section 8,
  quirk 2); we never do. The default divergence KL(U || p) is the one that produced the
  paper's numbers.
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


def _sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence [B]: sum over scored tokens (labels[:, 1:] != -100) of the
    fp32 log-prob of the label, taken from log_softmax (cross_entropy) of logits[:, :-1]."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                          ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def me_loss(logits: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
            divergence: str = "kl_u_p", mask_question: bool = False) -> torch.Tensor:
    """Maximum-entropy forget loss: mean over positions t of D(p_theta,t, U), U uniform over V.

    divergence:
      "kl_u_p" (alias "reference", default): KL(U || p_t) = -log V - (1/V) sum_v log p_t(v)
          = CE(U, p_t) - log V. The reference code's choice; its logit gradient is p_t - U.
      "kl_p_u" (alias "paper"): KL(p_t || U) = sum_v p_t(v) log p_t(v) + log V = log V - H(p_t),
          Eq. 6 as written in the paper.
    Both are >= 0 and zero exactly when p_t is uniform.

    Positions: t is kept when both its input token and its target token t + 1 are real
    (attention_mask == 1), so question and answer tokens count and padding never does (the
    reference averages over padding too, losses.md section 8, quirk 2). With
    mask_question=True only answer targets count (labels[:, 1:] != -100), the App. E.5
    ablation. Reduction: token mean over the kept positions of the micro-batch (the paper's
    per-sequence mean then batch mean; the two agree when sequences have equal length).

    log p comes from log_softmax in fp32, so no epsilon is needed: the reference's
    log(softmax + 1e-12) only guards against softmax underflowing to 0, and it biases
    log p upwards for tiny probabilities.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    vocab = logp.size(-1)
    if divergence in ("kl_u_p", "reference"):
        per_position = -logp.mean(-1) - math.log(vocab)
    elif divergence in ("kl_p_u", "paper"):
        per_position = (logp.exp() * logp).sum(-1) + math.log(vocab)
    else:
        raise ValueError(f"unknown ME divergence {divergence!r}; use 'kl_u_p' (reference code) "
                         f"or 'kl_p_u' (paper).")
    keep = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    if mask_question:
        if labels is None:
            raise ValueError("me_loss with mask_question=True needs labels to find the answer tokens.")
        keep = keep & (labels[:, 1:] != -100)
    return per_position[keep].sum() / keep.sum().clamp(min=1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL = -(sum of log p(label) over all scored tokens in the micro-batch) / (their count).

    A token mean over the micro-batch, not a mean of per-sequence means: the semantics of
    HF `outputs.loss`, used by every reference for GD (retain) and IDK (forget). Averages over
    answer tokens only (labels != -100). An empty batch gives 0, not NaN.
    """
    n_tokens = (labels[:, 1:] != -100).sum()
    return -_sequence_logprob(logits, labels).sum() / n_tokens.clamp(min=1)


def kl_retain_loss(logits: torch.Tensor, ref_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Retain KL = mean over non-padding positions t of KL(p_ref,t || p_theta,t)
    = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v)).

    Direction: the frozen reference model is the target distribution p, the trained model
    is q (forward KL from the reference, as in CL/TOFU/open-unlearning `kl_div(log p_theta,
    log p_ref, log_target=True)`). Averages over every position whose input token is real
    (attention_mask == 1), question tokens included; logits are not shifted because both
    models are compared at the same positions. The references also average over padding
    positions (dividing by B*T); we exclude padding (project decision 5).
    ref_logits are detached. Token mean over the micro-batch.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits.detach().float(), dim=-1)
    per_position = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    keep = attention_mask.bool()
    return per_position[keep].sum() / keep.sum().clamp(min=1)


# ====================================================================
# ARGUMENTS
# ====================================================================
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import HfArgumentParser, get_linear_schedule_with_warmup  # noqa: E402

import common  # noqa: E402
import evaluate_tofu  # noqa: E402
from common import TofuError  # noqa: E402


@dataclasses.dataclass
class Args(common.MethodArgs):
    alpha: float = common._f(None, "Weight of the ME loss in alpha*L_ME + L_retain. Default 0.1 (closer-look §5.1, App. D); 1.0 when --forget_task is set (continual unlearning, App. D and E.6).")
    me_divergence: str = common._f("reference", "reference = KL(U||p_theta), what the closer-look code computes and what produced its numbers; paper = KL(p_theta||U) = log V - H(p_theta), Eq. 6 as written.")
    mask_question: bool = common._f(False, "Average ME over answer tokens only (App. E.5 ablation). Default: question and answer tokens, never padding (the paper).")
    retain_loss: str = common._f("gd", "gd = retain NLL (ME+GD, the paper's method) or kl = KL(p_ori||p_theta) on retain pairs (ME+KL, App. E.2; loads the frozen starting model).")

    def __post_init__(self):
        # Checked at parse time, before any model is loaded or evaluated.
        if self.me_divergence not in ("reference", "paper"):
            raise TofuError(f"--me_divergence must be reference (KL(U||p)) or paper (KL(p||U)), "
                            f"not {self.me_divergence!r}")
        if self.retain_loss not in ("gd", "kl"):
            raise TofuError(f"--retain_loss must be gd or kl, not {self.retain_loss!r}")
        if self.alpha is None:
            self.alpha = 1.0 if self.forget_task is not None else 0.1


METHOD = "me_gd"
PAPER = {"lr": 1e-5, "epochs": 5, "batch_size": 32}            # closer-look App. D
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8}             # rkld's quick recipe, not tuned separately for ME+GD


# ====================================================================
# METHOD SETUP AND STEP (ME-specific; the loop in main() calls these)
# ====================================================================
def setup_frozen(args, ds, tok, accelerator, evaluator) -> dict:
    """The frozen starting model, loaded only for --retain_loss kl (the target of KL(p_ori||p_theta)).
    In continual unlearning that is --model, the previous task's output, as in the reference code."""
    if not ds.retain:
        raise TofuError(f"--retain_loss {args.retain_loss} needs retain rows, but {common.RETAIN_OF[args.split]} "
                        f"has none for this subset (--quick_retain_authors {args.quick_retain_authors})")
    if args.retain_loss != "kl":
        return {"ori": None}
    return {"ori": common.place_frozen(common.load_model(args.model, frozen=True)[0], accelerator)}


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': alpha * ME + retain, 'loss/forget': ME, 'loss/retain': ...} for one micro-batch."""
    f, r = batch["forget"], batch["retain"]
    logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    out = {"loss/forget": me_loss(logits, f["attention_mask"], f["labels"], args.me_divergence, args.mask_question)}
    r_logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
    if args.retain_loss == "gd":
        out["loss/retain"] = nll_loss(r_logits, r["labels"])
    else:
        with torch.no_grad():
            ref = frozen["ori"](input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        out["loss/retain"] = kl_retain_loss(r_logits, ref, r["attention_mask"])
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
    caller ends the stage with common.release()."""
    sizes = common.schedule(len(loader.dataset), loader.batch_size, accelerator, epochs, args.warmup_epochs,
                            args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, sizes["warmup_steps"], sizes["total_steps"])
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ga, meter, step, total = accelerator.gradient_accumulation_steps, common.LossMeter(), 0, sizes["total_steps"]
    if at_epoch:
        at_epoch(0, model)
    bar = tqdm(total=total, desc=desc, disable=not accelerator.is_main_process)
    for epoch in range(epochs if total else 0):
        model.train()
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        for i, batch in enumerate(loader):
            with accelerator.accumulate(model):
                losses = loss_fn(model, batch)
                accelerator.backward(losses["loss"] * common.window_weight(i, len(loader), ga))
                meter.add(losses)
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
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items()})
                log.log(step, {"epoch": epoch, **logged, "lr": scheduler.get_last_lr()[0]})
                if step == total:
                    break
        if step == total:
            break
        if at_epoch and epoch + 1 < epochs:
            at_epoch(epoch + 1, model)
    bar.close()
    return model


def main():
    args = common.finalize_args(HfArgumentParser(Args).parse_args_into_dataclasses()[0], METHOD, QUICK, PAPER)
    accelerator, ga = common.make_accelerator(args.batch_size, args.per_device_batch_size)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    tok = common.load_tokenizer(args.model)
    fmt = common.prompt_format(tok, args.model, args.prompt_format)
    forget, retain = common.forget_retain_rows(args.split, common.subset_authors(args), args.forget_task)
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed, idk=common.load_idk())
    loader = torch.utils.data.DataLoader(ds, batch_size=args.per_device_batch_size, shuffle=True,
                                         collate_fn=lambda b: common.collate_pairs(b, tok.pad_token_id),
                                         generator=torch.Generator().manual_seed(args.seed))
    derived = {"world_size": accelerator.num_processes, "grad_accum": ga,
               "effective_batch": args.per_device_batch_size * ga * accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type), "forget_rows": len(forget),
               "retain_rows": len(retain), "truncated": ds.n_truncated, "prompt_format": dataclasses.asdict(fmt),
               **common.schedule(len(ds), args.per_device_batch_size, accelerator, args.epochs, args.warmup_epochs,
                                 args.max_steps)}
    log = common.RunLogger(out_dir, args, derived, accelerator.is_main_process)
    evaluator = evaluate_tofu.MethodEval(args, tok, fmt, accelerator, out_dir)
    frozen = setup_frozen(args, ds, tok, accelerator, evaluator)  # stages that train (strengthening) end here
    history = [(k.split("/")[1], v) for k, v in frozen.items() if k.startswith("eval/")]
    model = frozen.pop("model", None) or common.load_model(args.model)[0]

    def at_epoch(epoch, prepared):  # epoch 0: the starting model, evaluated as prepared for training
        if epoch == 0:
            history.insert(0, ("before", evaluator.run(prepared, "before", cache_key=args.model)))
        elif args.eval_every_epoch:
            history.append((f"epoch{epoch}", evaluator.run(prepared, f"epoch{epoch}")))

    model = fit(accelerator, model, loader, lambda m, b: step_losses(m, b, frozen, args), args, args.epochs,
                args.lr, METHOD, log, at_epoch)
    frozen.clear()  # the frozen models are no longer needed: free them before the last evaluation
    common.save_model(accelerator, model, tok, fmt, out_dir / "model")
    if accelerator.is_main_process:
        print(f"[{METHOD}] saved the unlearned model to {out_dir / 'model'}")
    history.append(("after", evaluator.run(model, "after")))
    common.release(accelerator, model)
    evaluator.report(history)


if __name__ == "__main__":
    common.cli(main)
