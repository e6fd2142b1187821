"""RKLD: Reverse KL-Divergence-based Knowledge Distillation for unlearning personal information.

Paper: Wang et al. 2024, "RKLD: Reverse KL-Divergence-based Knowledge Distillation for
Unlearning Personal Information in Large Language Models", arXiv 2406.01983. No public code
exists; this is an implementation from the paper (method §3, settings App. A, FKL ablation §6).

  strengthened model  theta_str = theta_ori fine-tuned further on the forget set
  unlearning teacher  l_tea = l_ori - alpha * relu(l_str - l_ori)          (alpha = 8)
  objective           min_theta  mean over forget answer tokens of
                      RKL = sum_v p_theta(v) * (log p_theta(v) - log p_tea(v))   = KL(p_theta || p_tea)
                      [+ retain_weight * (RT: retain NLL  |  KL: KL(p_ori || p_theta) on retain)]
  retain KL positions: all B x T of the retain batch padded to --pad_to (500), padding
  included, as in the KL baselines' code; --loss_reduction tokens: non-padding positions only

  python rkld.py --split forget01                      # quick CPU path (embedded SmolLM2-135M)
  accelerate launch rkld.py --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Paper settings: the defaults for a real model (AdamW lr 1e-5, wd 0.01, effective batch 32,
one warmup epoch then linear decay, alpha 8, 5 continued epochs for the strengthened model).
Table 2 ablation: --divergence fkl.  Fig. 3 variants: --retain_loss rt / kl.
Epoch of peak forget quality (Fig. 3): --epochs 10 --eval_every_epoch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


# ====================================================================
# METHOD LOGIC (the part people copy): pure functions, no globals, no I/O
# ====================================================================
def teacher_logits(ori_logits: torch.Tensor, str_logits: torch.Tensor, alpha: float = 8.0) -> torch.Tensor:
    """Unlearning teacher (RKLD Eq. 2): l_tea = l_ori - alpha * relu(l_str - l_ori), in fp32.
    Only logits that the strengthened model raised are lowered; the rest are the original's."""
    ori, strong = ori_logits.float(), str_logits.float()
    return ori - alpha * torch.relu(strong - ori)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T-1] of the positions whose next token is a scored answer token
    (logits[:, :-1] predict labels[:, 1:]; -100 marks prompt and padding)."""
    return labels[:, 1:] != -100


def divergence_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor,
                    direction: str = "rkl") -> torch.Tensor:
    """Distillation loss, averaged over forget answer tokens (a token mean over the N answer
    positions of the micro-batch; 0, not NaN, when N = 0, as in nll_loss).

    student_logits [B, T, V]; teacher_logp [N, V] = log p_tea at the N answer positions of
    the batch, in row-major order (see answer_positions).
      rkl (RKLD): KL(p_theta || p_tea) = sum_v p_theta (log p_theta - log p_tea)   mode-seeking
      fkl (Table 2 ablation): KL(p_tea || p_theta) = sum_v p_tea (log p_tea - log p_theta)
    """
    logp_s = F.log_softmax(student_logits[:, :-1][answer_positions(labels)].float(), dim=-1)
    logp_t = teacher_logp.float()
    if direction == "rkl":
        per_token = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    elif direction == "fkl":
        per_token = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {direction!r}")
    return per_token.sum() / max(per_token.numel(), 1)


def _sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
    return -_sequence_logprob(logits, labels).sum() / n_tokens.clamp(min=1)


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
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import HfArgumentParser, get_linear_schedule_with_warmup  # noqa: E402

import common  # noqa: E402
import evaluate_tofu  # noqa: E402
import finetune  # noqa: E402
from common import TofuError  # noqa: E402


@dataclasses.dataclass
class Args(common.MethodArgs):
    alpha: float = common._f(8.0, "Teacher strength: l_tea = l_ori - alpha*relu(l_str - l_ori) (RKLD App. A: 8).")
    divergence: str = common._f("rkl", "rkl = KL(p_theta||p_tea) (RKLD); fkl = KL(p_tea||p_theta) (Table 2 ablation).")
    retain_loss: str = common._f("none", "none (RKLD), rt (retain NLL, RKLD+RT) or kl (KL(p_ori||p_theta) on retain, RKLD+KL).")
    retain_weight: float = common._f(1.0, "Weight of the retain term (RKLD App. A: 1).")
    loss_reduction: str = common._f("reference", "How the retain KL (--retain_loss kl) averages over positions; RKLD has no code, so this follows the KL baselines it compares with. reference = mean over all B x T positions of the padded retain batch, question and padding included (CL trainer/losses.py, TOFU dataloader.py and open-unlearning trainer/utils.py: kl_div batchmean on [B*T, V]); tokens = mean over non-padding positions only.")
    pad_to: int = common._f(None, "Pad the batch parts that --loss_reduction reference averages over (retain, for --retain_loss kl) to this many tokens (or to the longest, if longer), so padding positions count as in the references: closer-look and TOFU pad every sequence to max_length 500 (dataset/data_module.py). Default 500 for real models; 0 (pad to the longest in the micro-batch) for --model quick, to keep the CPU path fast. Ignored with --loss_reduction tokens.")
    strengthened_model: str = common._f(None, "Reuse a strengthened model (folder) instead of building one.")
    strengthen_epochs: int = common._f(5, "Epochs of continued training on the forget set. App. A says the strengthened model 'is trained for total 10 epochs'; we read that as the 5 fine-tuning epochs + 5 more here.")
    strengthen_lr: float = common._f(None, "LR of the continued training ('same optimizer settings', App. A): 1e-5 for real models, the fine-tuning lr (2e-4) for --model quick.")
    precompute_teacher: bool = common._f(None, "Compute teacher log-probs over the forget set once (kept on CPU); only the student stays resident while distilling. Default: on for --model quick (about half the CPU step time, bench/bench_rkld_memory.py), off otherwise.")
    eval_teacher: bool = common._f(False, "Also evaluate the unlearning teacher itself (logit arithmetic at inference), as in RKLD Fig. 3.")

    def __post_init__(self):  # checked at parse time, before any model is loaded
        if self.divergence not in ("rkl", "fkl"):
            raise TofuError(f"--divergence must be rkl or fkl, not {self.divergence!r}")
        if self.retain_loss not in ("none", "rt", "kl"):
            raise TofuError(f"--retain_loss must be none, rt or kl, not {self.retain_loss!r}")
        if self.loss_reduction not in ("reference", "tokens"):
            raise TofuError(f"--loss_reduction must be reference (B x T, padding included) or tokens, "
                            f"not {self.loss_reduction!r}")
        if self.pad_to is not None and self.pad_to < 0:
            raise TofuError(f"--pad_to must be 0 (pad to the longest) or a length, not {self.pad_to}")


METHOD = "rkld"
PAPER = {"lr": 1e-5, "epochs": 5, "batch_size": 32, "strengthen_lr": 1e-5, "precompute_teacher": False,
         "pad_to": 500}  # App. A
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8, "strengthen_lr": 2e-4, "precompute_teacher": True,
         "pad_to": 0}  # quick subset


# ====================================================================
# METHOD SETUP AND STEP (RKLD-specific; the loop in main() calls these)
# ====================================================================
class Teacher(torch.nn.Module):
    """The unlearning teacher as a model: logits = teacher_logits(ori(x), str(x))."""

    def __init__(self, ori, strong, alpha):
        super().__init__()
        self.ori, self.strong, self.alpha = ori, strong, alpha
        self.config, self.device = ori.config, ori.device

    def forward(self, input_ids, attention_mask=None, **_):
        out = self.ori(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = teacher_logits(out.logits, self.strong(input_ids=input_ids, attention_mask=attention_mask).logits,
                                    self.alpha)
        return out


def setup_frozen(args, model, ds, tok, accelerator, evaluator) -> dict:
    """Frozen models, prepared apart from the trained one: the original model (teacher and KL
    retain term) and the strengthened model; with --precompute_teacher, the teacher's
    log-probs over the forget set instead, after which only what the retain term needs stays."""
    if args.retain_loss != "none" and not ds.retain:
        raise TofuError(f"--retain_loss {args.retain_loss} needs retain rows, but {common.RETAIN_OF[args.split]} "
                        f"has none for this subset (--quick_retain_authors {args.quick_retain_authors})")
    str_path = finetune.strengthen(args, accelerator)
    ori = accelerator.prepare_model(common.load_model(args.model, frozen=True)[0], evaluation_mode=True)
    strong = accelerator.prepare_model(common.load_model(str_path, frozen=True)[0], evaluation_mode=True)
    if strong.config.vocab_size != ori.config.vocab_size:
        raise TofuError(f"the strengthened model's vocabulary ({strong.config.vocab_size}) differs from the "
                        f"original's ({ori.config.vocab_size}); pass a model fine-tuned from --model")
    frozen = {"ori": ori, "teacher": Teacher(ori, strong, args.alpha), "store": None}
    if args.eval_teacher:
        frozen["eval/teacher"] = evaluator.run(frozen["teacher"], "teacher")
    if args.precompute_teacher:
        frozen.update(store=precompute_teacher(frozen["teacher"], ds, tok.pad_token_id, accelerator), teacher=None)
        if args.retain_loss != "kl":
            frozen["ori"] = None
    return frozen


def precompute_teacher(teacher, ds, pad_id, accelerator) -> dict[int, torch.Tensor]:
    """Teacher log-probs [n_answer_tokens, V] of every forget row, computed once and kept on CPU."""
    store = {}
    for i in tqdm(range(len(ds)), desc="precompute teacher", disable=not accelerator.is_main_process):
        f = common.collate([ds[i]["forget"]], pad_id)
        store[i] = live_teacher_logp(teacher, {k: v.to(accelerator.device) for k, v in f.items()}).cpu()
    return store


@torch.no_grad()
def live_teacher_logp(teacher, f: dict) -> torch.Tensor:
    """log p_tea [N, V] at the answer positions of a forget batch."""
    logits = teacher(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    return F.log_softmax(logits[:, :-1][answer_positions(f["labels"])], -1)


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': total, 'loss/forget': ..., 'loss/retain': ...} for one micro-batch."""
    f = batch["forget"]
    logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
    if frozen["store"] is not None:
        t_logp = torch.cat([frozen["store"][int(i)] for i in batch["index"]]).to(logits.device)
    else:
        t_logp = live_teacher_logp(frozen["teacher"], f)
    out = {"loss/forget": divergence_loss(logits, t_logp, f["labels"], args.divergence)}
    if args.retain_loss != "none":
        r = batch["retain"]
        r_logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        if args.retain_loss == "rt":
            out["loss/retain"] = nll_loss(r_logits, r["labels"])
        else:
            with torch.no_grad():
                ref = frozen["ori"](input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
            out["loss/retain"] = kl_retain_loss(r_logits, ref, r["attention_mask"], args.loss_reduction)
    out["loss"] = out["loss/forget"] + args.retain_weight * out.get("loss/retain", 0.0)
    return out


# ====================================================================
# MAIN (shared boilerplate: identical in every method script)
# ====================================================================
def main():
    args = common.finalize_args(HfArgumentParser(Args).parse_args_into_dataclasses()[0], METHOD, QUICK, PAPER)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    model, tok = common.load_model(args.model)
    fmt = common.prompt_format(tok, args.model, args.prompt_format)
    forget, retain = common.forget_retain_rows(args.split, common.subset_authors(args), args.forget_task)
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed, idk=common.load_idk())
    loader = torch.utils.data.DataLoader(ds, batch_size=args.per_device_batch_size, shuffle=True,
                                         collate_fn=lambda b: common.collate_pairs(b, tok.pad_token_id),
                                         generator=torch.Generator().manual_seed(args.seed))
    world = accelerator.num_processes
    ga = max(1, args.batch_size // (args.per_device_batch_size * world))
    steps_per_epoch = math.ceil(math.ceil(len(ds) / (args.per_device_batch_size * world)) / ga)
    total, warmup = steps_per_epoch * args.epochs, int(round(args.warmup_epochs * steps_per_epoch))
    total = min(total, args.max_steps) if args.max_steps else total
    derived = {"world_size": world, "grad_accum": ga, "effective_batch": args.per_device_batch_size * ga * world,
               "forget_rows": len(forget), "retain_rows": len(retain), "truncated": ds.n_truncated,
               "steps_per_epoch": steps_per_epoch, "total_steps": total, "warmup_steps": warmup,
               "prompt_format": dataclasses.asdict(fmt)}
    log = common.RunLogger(out_dir, args, derived, accelerator.is_main_process)
    evaluator = evaluate_tofu.MethodEval(args, tok, fmt, accelerator, out_dir)
    history = [("before", evaluator.run(model, "before", cache_key=args.model))]
    frozen = setup_frozen(args, model, ds, tok, accelerator, evaluator)
    history += [(k.split("/")[1], v) for k, v in frozen.items() if k.startswith("eval/")]

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.gradient_accumulation_steps = ga
    step = 0
    bar = tqdm(total=total, desc=METHOD, disable=not accelerator.is_main_process)
    for epoch in range(args.epochs):
        model.train()
        ds.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                losses = step_losses(model, batch, frozen, args)
                if not torch.isfinite(losses["loss"]):
                    raise TofuError(f"loss is {losses['loss'].item()} at step {step + 1} (epoch {epoch}); "
                                    "stopped before saving anything")
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
                log.log(step, {"epoch": epoch, **{k: v.item() for k, v in losses.items()},
                               "lr": scheduler.get_last_lr()[0]})
                if step == total:
                    break
        if step == total:
            break
        if args.eval_every_epoch:
            history.append((f"epoch{epoch + 1}", evaluator.run(accelerator.unwrap_model(model), f"epoch{epoch + 1}")))
    bar.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".model."))
        unwrapped.save_pretrained(tmp, state_dict=accelerator.get_state_dict(model))
        tok.save_pretrained(tmp)
        common.save_prompt_format(fmt, tmp)
        if (out_dir / "model").exists():
            shutil.rmtree(out_dir / "model")
        os.replace(tmp, out_dir / "model")
        print(f"[{METHOD}] saved the unlearned model to {out_dir / 'model'}")
    history.append(("after", evaluator.run(unwrapped, "after")))
    evaluator.report(history)


if __name__ == "__main__":
    common.cli(main)
