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
  python me_gd.py --split forget01
  accelerate launch me_gd.py --split forget05

Reproducing the paper:
  TOFU (section 5.1): defaults, i.e. --alpha 0.1 --retain_loss gd, lr 1e-5, wd 0.01, effective
    batch 32, 5 epochs, one warmup epoch then linear decay (App. D).
  ME+KL (App. E.2): --retain_loss kl.
  Loss over answer tokens only (App. E.5 ablation): --mask_question.
  Continual unlearning (section 5.2): --alpha 1.0 --forget_task k, with --model set to the
    previous task's output.
  The reference code also averages ME over padding up to length 500 (losses.md section 8,
  quirk 2); we never do. The default divergence KL(U || p) is the one that produced the
  paper's numbers.
"""
import math

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


# (ARGUMENTS and MAIN sections are added by the lead)
