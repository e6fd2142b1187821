"""IDK+AP: targeted unlearning. Fine-tune the model to answer forget questions with a
refusal template (IDK), regularised by Answer Preservation (AP) on the retain set, which
lowers the refusal's likelihood on retain questions while keeping the true answer's.

Paper: A Closer Look at Machine Unlearning for Large Language Models
       (Yuan et al., 2024), arXiv:2410.08109, section 4, Eq. 3, 8, 9, App. C, D, E.2.
Reference code: github.com/sail-sg/closer-look-LLM-unlearning (trainer/losses.py, IDK and AP).

Objective:
  L = L_forget + L_retain
  L_forget = NLL_theta(idk | x_f)    (IDK: token mean over the refusal's tokens)
     or --forget_loss dpo:
       -(2/beta) * mean log sigmoid(beta * ([log pi_theta(idk|x_f) - log pi_theta(y_f|x_f)]
                                            - [log pi_ref(idk|x_f) - log pi_ref(y_f|x_f)]))
  L_retain = L_AP = -(1/beta) * mean log sigmoid(-beta * (log pi_theta(idk|x_r) - log pi_theta(y_r|x_r)))
     or --retain_loss gd: NLL_theta(y_r | x_r)
     or --retain_loss kl: KL(p_ref || p_theta) on the retain pair, averaged over all B x T positions
        of the batch padded to --pad_to (500), padding included, as in the reference code;
        --loss_reduction tokens: non-padding positions only
  log pi(y|x) is summed over answer tokens; idk is one of the 100 refusal templates, drawn
  per item by common.ForgetRetainDataset.pick from a generator seeded by (seed, epoch, index);
  the same template serves the forget and the retain question of an item. The reference
  model (DPO, KL) is the frozen starting model; AP needs none.

Launch:
  python idk_ap.py --split forget01                     # quick CPU path (embedded SmolLM2-135M)
  accelerate launch idk_ap.py --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Reproducing the paper:
  TOFU (section 5.1): defaults, i.e. --forget_loss idk --retain_loss ap, beta=0.1, weights 1/1,
    lr 1e-5, wd 0.01, effective batch 32, 5 epochs, one warmup epoch then linear decay (App. D).
  DPO+AP (App. E.2): --forget_loss dpo (needs the frozen reference model).
  IDK+GD / IDK+KL baselines: --retain_loss gd / --retain_loss kl.
  LoRA (App. E.8, Table 9): --lora_r 8 --lora_alpha 32 --epochs 5 and --lr from {5e-5, 1e-4, 2e-4,
    5e-4} (the paper reports the best-balanced one); the reference is the base with the adapter off.
  Continual unlearning (section 5.2): --forget_task k, with --model set to the previous
    task's model/ folder (which is then also the DPO/KL reference, as in the reference code);
    scripts/continual.py runs the whole sequence.
  The reference code fixes each item's IDK template for all epochs (it reseeds the global
  RNG with the index); ours changes across epochs (losses.md section 8, quirk 7).
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
# prompt and padding. logits[:, t] predict labels[:, t + 1].


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence [B]: sum over scored tokens (labels[:, 1:] != -100) of the
    fp32 log-prob of the label, taken from log_softmax (cross_entropy) of logits[:, :-1]."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                          ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL = -(sum of log p(label) over all scored tokens in the micro-batch) / (their count).

    A token mean over the micro-batch, not a mean of per-sequence means: the semantics of
    HF `outputs.loss`, used by every reference for GD (retain) and IDK (forget). Averages over
    answer tokens only (labels != -100). An empty batch gives 0, not NaN.
    """
    n_tokens = (labels[:, 1:] != -100).sum()
    return -sequence_logprob(logits, labels).sum() / n_tokens.clamp(min=1)


def idk_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IDK forget loss = NLL of the refusal template given the forget question:
    nll_loss on (forget question, IDK answer) with the question masked, i.e. a token mean
    over the template's tokens in the micro-batch (Paper Eq. 3; CL losses.py)."""
    return nll_loss(logits, labels)


def ap_loss(logp_idk_retain: torch.Tensor, logp_ans_retain: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """AP = -(1/beta) * mean_batch log sigmoid(-beta * (log pi_theta(idk|x_r) - log pi_theta(y_r|x_r))).

    Inputs are summed answer log-probs [B] of (retain question, IDK template) and (retain
    question, true answer), both under the trained model: AP needs no reference model.
    Factor 1/beta, not 2/beta (Paper Eq. 8). Mean over sequences. Its gradient is
    mean_batch W * grad(log pi(idk|x_r) - log pi(y_r|x_r)) with the adaptive weight
    W = 1 / (1 + (pi(y_r|x_r) / pi(idk|x_r))^beta) = sigmoid(beta * (logp_idk - logp_ans))
    (Paper Eq. 9, App. C): descent lowers the refusal and raises the true answer.
    """
    log_ratio = logp_idk_retain - logp_ans_retain
    return -(1.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def dpo_loss(logp_win_theta: torch.Tensor, logp_lose_theta: torch.Tensor,
             logp_win_ref: torch.Tensor, logp_lose_ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO = -(2/beta) * mean_batch log sigmoid(beta * ((win_theta - lose_theta) - (win_ref - lose_ref))).

    For unlearning (IdkDPO): win = (forget question, IDK template), lose = (forget question,
    true forget answer). All inputs are summed answer log-probs [B]; the *_ref ones come from
    the frozen reference model. Mean over sequences. Factor 2/beta as in CL and
    open-unlearning (TOFU's own DPO has none and does not run, losses.md section 2).
    """
    margin = (logp_win_theta - logp_lose_theta) - (logp_win_ref - logp_lose_ref).detach()
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


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
    forget_loss: str = flags.flag("idk", "idk = NLL of a refusal template on forget questions (IDK+AP, closer-look §4) or dpo = DPO preferring the template over the forget answer (DPO+AP, App. E.2; loads the frozen starting model as reference).")
    retain_loss: str = flags.flag("ap", "ap = answer preservation, Eq. 8 (IDK+AP; no reference model), gd = retain NLL (IDK+GD) or kl = KL(p_ori||p_theta) on retain pairs (IDK+KL; loads the frozen starting model).")
    beta: float = flags.flag(0.1, "Inverse temperature of AP and DPO (closer-look App. D: 0.1). The two terms are weighted 1:1 (closer-look scripts/tofu/idk_ap.sh).")
    loss_reduction: str = flags.flag("reference", "How the retain KL (--retain_loss kl) averages over positions. reference = mean over all B x T positions of the padded retain batch, question and padding included (CL trainer/losses.py, TOFU dataloader.py and open-unlearning trainer/utils.py: kl_div batchmean on [B*T, V]); tokens = mean over non-padding positions only.")
    pad_to: int = flags.flag(None, "Pad the batch parts that --loss_reduction reference averages over (retain, for --retain_loss kl) to this many tokens (or to the longest, if longer), so padding positions count as in the references: closer-look and TOFU pad every sequence to max_length 500 (dataset/data_module.py). Default 500 for real models; 0 (pad to the longest in the micro-batch) for --model quick, to keep the CPU path fast. Ignored with --loss_reduction tokens.")

    def __post_init__(self):
        # Checked at parse time, before any model is loaded or evaluated.
        if self.forget_loss not in ("idk", "dpo"):
            raise TofuError(f"--forget_loss must be idk or dpo, not {self.forget_loss!r}")
        if self.retain_loss not in ("ap", "gd", "kl"):
            raise TofuError(f"--retain_loss must be ap, gd or kl, not {self.retain_loss!r}")
        if self.loss_reduction not in ("reference", "tokens"):
            raise TofuError(f"--loss_reduction must be reference (B x T, padding included) or tokens, "
                            f"not {self.loss_reduction!r}")
        if self.pad_to is not None and self.pad_to < 0:
            raise TofuError(f"--pad_to must be 0 (pad to the longest) or a length, not {self.pad_to}")
        if not self.beta > 0:
            raise TofuError(f"--beta must be positive, not {self.beta}")


METHOD = "idk_ap"
# pad_to: closer-look pads every sequence to max_length 500; the quick path pads per batch (0)
PAPER = {"lr": 1e-5, "epochs": 5, "batch_size": 32, "schedule": "reference", "max_grad_norm": 0.0, "pad_to": 500, "_source": "closer-look App. D"}
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8, "pad_to": 0, "_source": "ours: rkld's quick recipe, not tuned for IDK+AP"}


# ====================================================================
# METHOD SETUP AND STEP (IDK-specific; the loop in main() calls these)
# ====================================================================
def setup_frozen(args, ds, tok, accelerator, evaluator) -> dict:
    """The frozen starting model as reference, loaded only for --forget_loss dpo or --retain_loss kl.
    In continual unlearning that is --model, the previous task's output, as in the reference code."""
    if not ds.retain:
        raise TofuError(f"--retain_loss {args.retain_loss} needs retain rows, but {scenarios.retain_source(args)} has none")
    if args.forget_loss != "dpo" and args.retain_loss != "kl":
        return {"ref": None}
    frozen = {}
    frozen["ref"] = launch.starting_model(args, accelerator, frozen)  # with LoRA: the trained model's base
    return frozen


def _logits(model, part: dict) -> torch.Tensor:
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits


def padded_parts(args) -> tuple[str, ...]:
    """Batch parts padded to --pad_to: those a reference-reduced loss averages over, padding included."""
    return ("retain",) if args.retain_loss == "kl" and args.loss_reduction == "reference" else ()


def batch_parts(args) -> tuple[str, ...]:
    """The batch parts step_losses reads (common.ForgetRetainDataset tokenizes only these)."""
    return ("forget", "forget_idk", "retain", *(("retain_idk",) if args.retain_loss == "ap" else ()))


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': forget + retain, 'loss/forget': IDK or DPO, 'loss/retain': AP, GD or KL} for one micro-batch."""
    f, fi, r = batch["forget"], batch["forget_idk"], batch["retain"]
    idk_logits = _logits(model, fi)
    if args.forget_loss == "idk":
        forget = idk_loss(idk_logits, fi["labels"])
    else:
        with torch.no_grad():
            ref_win = sequence_logprob(_logits(frozen["ref"], fi), fi["labels"])
            ref_lose = sequence_logprob(_logits(frozen["ref"], f), f["labels"])
        forget = dpo_loss(sequence_logprob(idk_logits, fi["labels"]),
                          sequence_logprob(_logits(model, f), f["labels"]), ref_win, ref_lose, args.beta)
    r_logits = _logits(model, r)
    if args.retain_loss == "ap":
        ri = batch["retain_idk"]
        retain = ap_loss(sequence_logprob(_logits(model, ri), ri["labels"]),
                         sequence_logprob(r_logits, r["labels"]), args.beta)
    elif args.retain_loss == "gd":
        retain = nll_loss(r_logits, r["labels"])
    else:
        with torch.no_grad():
            ref = _logits(frozen["ref"], r)
        retain = kl_retain_loss(r_logits, ref, r["attention_mask"], args.loss_reduction)
    return {"loss/forget": forget, "loss/retain": retain, "loss": forget + retain}


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
