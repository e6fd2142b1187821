"""Baselines for LLM unlearning on TOFU: GA, NPO, DPO, KTO, IDK, SimNPO, UNDIAL, TA, WGA, SatImp,
CE-U and PDU, each with an optional retain term GD (retain NLL, also called RT) or KL.
(RMU works on hidden activations, not logits: rmu.py.)

Compared against in:
  RKLD: Reverse KL-Divergence-based Knowledge Distillation for Unlearning Personal
    Information in Large Language Models (Wang et al., 2024), arXiv:2406.01983
  A Closer Look at Machine Unlearning for Large Language Models (Yuan et al., 2024),
    arXiv:2410.08109
Method sources:
  GA, GD, KL, IDK   TOFU: A Task of Fictitious Unlearning for LLMs (Maini et al., 2024), arXiv:2401.06121
  NPO, IdkDPO       Negative Preference Optimization (Zhang et al., 2024), arXiv:2404.05868
  DPO               Direct Preference Optimization (Rafailov et al., 2023), arXiv:2305.18290
  KTO               KTO (Ethayarajh et al., 2024), arXiv:2402.01306, in the unlearning form of the
                    NPO authors' code (github.com/licong-lin/negative-preference-optimization,
                    TOFU/dataloader.py, loss_type "kto_sigmoid")
  SimNPO            Simplicity Prevails: Rethinking NPO for LLM Unlearning (Fan et al., 2024),
                    arXiv:2410.07163; defaults from open-unlearning (locuslab/open-unlearning)
  UNDIAL            Unmemorization in LLMs via Self-Distillation and Deliberate Imagination
                    (Dong et al., 2024), arXiv:2402.10052
  TA                Editing Models with Task Arithmetic (Ilharco et al., 2022), arXiv:2212.04089
  WGA               Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond
                    (Wang et al., ICLR 2025), arXiv:2502.19301
  SatImp            Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning (Yang et al.,
                    ICML 2025), arXiv:2505.11953
  CE-U              CE-U: Cross Entropy Unlearning (Yang, 2025), arXiv:2503.01224
  PDU               Constrained Entropic Unlearning: A Primal-Dual Framework for LLMs (Entesari et al.,
                    2025), arXiv:2506.05314
  Defaults of the four from open-unlearning (configs/trainer/*.yaml, community/methods/*/run.sh).

Objective (one method = one forget term + one retain term):
  L = gamma * L_forget + alpha * L_retain
  Notation: (x_f, y_f) forget pair, (x_r, y_r) retain pair, idk = a refusal template,
  log pi(y|x) = sum of answer-token log-probs, S = -log pi(y|x), NLL = token-mean answer NLL.
  ga      L_forget = -NLL_theta(y_f | x_f)
  npo     L_forget = -(2/beta) * mean log sigmoid(beta * (S_theta(y_f|x_f) - S_ref(y_f|x_f)))
  dpo     L_forget = -(2/beta) * mean log sigmoid(beta * ([log pi_theta(idk|x_f) - log pi_theta(y_f|x_f)]
                                                          - [log pi_ref(idk|x_f) - log pi_ref(y_f|x_f)]))
  kto     L_forget = 1 - (2/beta) * mean sigmoid(z - beta * [log pi_theta(y_f|x_f) - log pi_ref(y_f|x_f)]),
          z = stopgrad(batch mean of [log pi_theta(idk|x_f) - log pi_ref(idk|x_f)])
  idk     L_forget = NLL_theta(idk | x_f)
  simnpo  L_forget = -(2/beta) * mean log sigmoid(beta * (S_theta(y_f|x_f) / |y_f| - delta))
  undial  L_forget = mean over answer tokens t of CE(softmax(l_ref,t - beta * onehot(y_t)), p_theta,t)
  ta      theta = theta_ori - lam * (theta_str - theta_ori)      (no training)
  wga     L_forget = mean over answer tokens t of sg(p_t)^beta * log p_t,   p_t = p_theta(y_t | x, y_<t),
          sg = stop-gradient (the weights are constants)
  satimp  L_forget = mean over answer tokens t of sg(p_t)^beta * sg(1 - p_t)^beta2 * log p_t
  ce_u    L_forget = mean over answer tokens t (the first --ceu_skip_first of each answer left out) of
          CE(q_t, p_theta,t),  q_t = softmax of sg(logits_t) with the gold logit set to -inf
  pdu     L = gamma * L_forget + lam * (NLL_theta(y_r | x_r) - eps),
          L_forget = mean over answer tokens t of (max_v z_t,v - mean_v z_t,v)^2   (z = logits),
          lam <- max(0, lam + eta * (mean retain NLL of the step - eps)) after every optimizer step
  retain  gd: NLL_theta(y_r | x_r);  kl: mean over all B x T positions of the padded retain batch,
          padding included, of KL(p_ref || p_theta), as in CL/TOFU/open-unlearning (--pad_to 500 pads
          like CL and TOFU); --loss_reduction tokens: non-padding positions only

Launch:
  python baselines.py --method npo_gd --split forget01      # quick CPU path (embedded SmolLM2-135M)
  accelerate launch baselines.py --method dpo_kl --split forget05 --model locuslab/tofu_ft_llama2-7b --retain_logs DIR

Flags: --method (the names above, + _gd or _kl for the retain term; RKLD's "X+RT" is x_rt = x_gd;
  table METHODS), --beta, --beta2, --delta, --forget_weight (gamma), --retain_weight (alpha; pdu: the
  starting lam), --ceu_skip_first, --retain_bound (eps), --dual_step (eta), --dual_warmup_epochs,
  --ta_lambda and, for ta, rkld.py's --strengthen* flags. Runs go to runs/<method>/<split>[-<flag>_<value>...].

Reproducing the papers:
  --method {ga,ga_gd,ga_kl,npo,npo_gd,npo_kl,dpo,dpo_gd,dpo_kl,idk,idk_gd} with the defaults
  (beta=0.1, gamma=alpha=1, lr 1e-5, wd 0.01, effective batch 32, one warmup epoch then linear
  decay) is the Closer Look setup (App. D, 5 epochs) and the RKLD setup (App. A; RKLD also
  reports kto, kto_gd, kto_kl and ta; its Fig. 3 peak epoch: --epochs 10 --eval_every_epoch).
  --method simnpo_gd: beta=4.5, delta=0, gamma=0.125, alpha=1 (open-unlearning SimNPO.yaml).
  --method undial: beta=10, alpha=0, lr 1e-4, 10 epochs (open-unlearning UNDIAL.yaml; lr and
  epochs are its defaults here on a real model).
  --method ta: the RKLD paper does not state lam; lam=1 (--ta_lambda) is the plain task-vector
  negation of Ilharco et al., with theta_str the strengthened model that rkld.py builds. No
  training: the loop runs zero steps, then the edited model is saved and evaluated.
  --method wga_gd: beta=1, gamma=alpha=1 (open-unlearning WGA.yaml); --method satimp_gd: beta=5,
  beta2=1, gamma=0.1, alpha=1 (SatImp.yaml); --method ce_u: no retain term, the first answer token
  left out (CEU.yaml; the paper's footnote); --method pdu: gamma=1, lam starts at 100, eps=0.3, eta=5,
  dual updates after 5 warmup epochs of 10 (open-unlearning community/methods/PDU/run.sh; on the
  quick path the dual variable moves from the first step). docs/specs.md: each formula and its quirks.
"""
from __future__ import annotations

import dataclasses
import json
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


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GA forget loss = -NLL (token mean over scored answer tokens; see nll_loss).
    Minimising it raises the NLL of the forget answers."""
    return -nll_loss(logits, labels)


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


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO = -(2/beta) * mean_batch log sigmoid(beta * (S_theta - S_ref)), S = -log pi(y_f|x_f).

    Inputs are summed answer log-probs [B] of the forget pairs (no length normalisation);
    logp_ref comes from the frozen reference model. Mean over sequences. As beta -> 0 the
    gradient tends to that of mean(logp_theta), i.e. GA on sequence log-probs
    (Zhang et al. 2024, arXiv:2404.05868; factor 2/beta as in CL and open-unlearning).
    """
    neg_log_ratio = logp_ref.detach() - logp_theta  # = S_theta - S_ref
    return -(2.0 / beta) * F.logsigmoid(beta * neg_log_ratio).mean()


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


def kto_loss(logp_idk_theta: torch.Tensor, logp_idk_ref: torch.Tensor,
             logp_forget_theta: torch.Tensor, logp_forget_ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """KTO for unlearning, the "kto_sigmoid" variant of the NPO authors' code:
    L = 1 - (2/beta) * mean_batch sigmoid(z - beta * (logp_forget_theta - logp_forget_ref)),
    z = batch mean of (logp_idk_theta - logp_idk_ref), detached (no gradient through z).

    z is a KL estimate from the (forget question, IDK template) pairs and is NOT multiplied
    by beta, unlike the KTO paper's sigmoid(beta * (z - r)); we keep the reference code's
    form. The forget answer is KTO's "undesirable" output. All inputs are summed answer
    log-probs [B]; mean over sequences. Source: licong-lin/negative-preference-optimization
    TOFU/dataloader.py (kto_sigmoid); none of CL, TOFU, open-unlearning has KTO.
    """
    z = (logp_idk_theta - logp_idk_ref).mean().detach()
    log_ratio = logp_forget_theta - logp_forget_ref.detach()
    return 1.0 - (2.0 / beta) * torch.sigmoid(z - beta * log_ratio).mean()


def simnpo_loss(logp_sum_theta: torch.Tensor, n_tokens: torch.Tensor,
                beta: float = 4.5, delta: float = 0.0) -> torch.Tensor:
    """SimNPO = -(2/beta) * mean_batch log sigmoid(beta * (S_theta / n - delta)),
    S_theta = -logp_sum_theta the summed NLL of the forget answer, n = its scored token count.

    Length-normalised NPO without a reference model. delta is multiplied by beta, so the
    paper's gamma equals beta * delta. Defaults beta=4.5, delta=0 from open-unlearning
    (configs/trainer/SimNPO.yaml, which also sets forget weight 0.125, retain weight 1).
    Inputs [B]; mean over sequences.
    """
    mean_nll = -logp_sum_theta / n_tokens.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                beta: float = 10.0) -> torch.Tensor:
    """UNDIAL = mean over scored tokens t of -sum_v q_t(v) * log p_theta,t(v),
    q_t = softmax(l_ref,t - beta * onehot(y_t)): the frozen model's next-token distribution
    with the gold token's logit lowered by beta (soft-target cross-entropy, student vs teacher).

    Shifted: logits[:, t] and ref_logits[:, t] predict labels[:, t + 1]. Averages over scored
    positions only (labels != -100), a token mean over the micro-batch. This fixes
    open-unlearning's version, which indexes the vocabulary with label -100 (wrapping to
    token V - 100) and averages over all positions (losses.md section 8, quirk 11).
    Default beta=10 (open-unlearning UNDIAL.yaml; Dong et al. 2024, arXiv:2402.10052).
    """
    targets = labels[:, 1:]
    keep = targets != -100
    logp = F.log_softmax(logits[:, :-1].float()[keep], dim=-1)
    teacher = ref_logits[:, :-1].detach().float()[keep]
    gold = targets[keep].unsqueeze(-1)
    teacher = teacher.scatter_add(-1, gold, torch.full_like(gold, -beta, dtype=teacher.dtype))
    q = F.softmax(teacher, dim=-1)
    return -(q * logp).sum() / keep.sum().clamp(min=1)


def answer_token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p_theta(y_t | x, y_<t) of every scored answer token of the micro-batch, flattened [N]
    (fp32; logits[:, t] predicts labels[:, t + 1]; labels -100 are left out)."""
    targets = labels[:, 1:]
    keep = targets != -100
    logp = F.log_softmax(logits[:, :-1].float()[keep], dim=-1)
    return logp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """WGA = mean over scored answer tokens t of w_t * log p_t, w_t = sg(p_t)^beta (no gradient
    through the weight). Gradient ascent on the NLL, each token weighted by its own probability, so
    tokens already forgotten (p_t small) stop pulling. beta = 0 is GA (ga_loss). Token mean over the
    micro-batch, as open-unlearning's compute_wga_loss. Default beta=1 (open-unlearning WGA.yaml;
    Wang et al. 2025, arXiv:2502.19301)."""
    logp = answer_token_logprob(logits, labels)
    weight = logp.detach().exp() ** beta
    return (weight * logp).sum() / logp.numel() if logp.numel() else logp.sum()


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 5.0, beta2: float = 1.0) -> torch.Tensor:
    """SatImp = mean over scored answer tokens t of w_t * log p_t, w_t = sg(p_t)^beta * sg(1 - p_t)^beta2:
    a saturation weight p^beta1 (the paper's beta_1) times an importance weight (1 - p)^beta2, both
    constants for the gradient. Token mean over the micro-batch, as open-unlearning's
    compute_satimp_loss. Defaults beta1=5, beta2=1 (open-unlearning SatImp.yaml; Yang et al. 2025,
    arXiv:2505.11953)."""
    logp = answer_token_logprob(logits, labels)
    p = logp.detach().exp()
    weight = p ** beta * (1.0 - p) ** beta2
    return (weight * logp).sum() / logp.numel() if logp.numel() else logp.sum()


def ce_u_loss(logits: torch.Tensor, labels: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """CE-U = mean over scored answer tokens t of CE(q_t, p_theta,t) = -sum_v q_t(v) log p_theta,t(v),
    q_t = softmax(sg(logits_t)) with the gold token's logit set to -inf: the model's own distribution
    without the true token, held constant. Its logit gradient is p_t - q_t, so the gold logit is
    pushed down by p_t(gold) and no further once p_t(gold) = 0 (no GA blow-up).
    The first `skip_first` scored tokens of each answer are left out (the paper's footnote in its
    training settings; open-unlearning CEU.yaml ignore_first_n_answer_tokens=1). Token mean over the
    kept tokens of the micro-batch. (Yang 2025, arXiv:2503.01224.)"""
    targets = labels[:, 1:]
    keep = targets != -100
    keep = keep & (keep.cumsum(-1) > skip_first)
    x = logits[:, :-1].float()[keep]
    gold = targets[keep].unsqueeze(-1)
    q = F.softmax(x.detach().scatter(-1, gold, float("-inf")), dim=-1)
    return -(q * F.log_softmax(x, dim=-1)).sum() / keep.sum().clamp(min=1)


def pdu_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PDU's logit-margin flattening loss = mean over scored answer positions t of
    (max_v z_t(v) - mean_v z_t(v))^2, z_t = logits[:, t] predicting labels[:, t + 1]. Zero exactly when
    every logit of the position is equal (p_t uniform); softmax-free. Token mean over the micro-batch.
    (Entesari et al. 2025, arXiv:2506.05314.) open-unlearning pairs unshifted logits with the labels,
    one position off (docs/specs.md); we score the positions that predict answer tokens."""
    keep = labels[:, 1:] != -100
    z = logits[:, :-1].float()[keep]
    return ((z.max(-1).values - z.mean(-1)) ** 2).sum() / keep.sum().clamp(min=1)


def pdu_dual_step(lam: float, retain_loss: float, eps: float = 0.3, step_size: float = 5.0) -> float:
    """PDU's dual ascent on the constraint retain_loss <= eps: lam <- max(0, lam + step_size * (retain_loss - eps)).
    retain_loss is the step's mean retain NLL. Defaults eps=0.3, step 5 (open-unlearning
    community/methods/PDU/run.sh)."""
    return max(0.0, float(lam) + step_size * (float(retain_loss) - eps))


def task_arithmetic(original_state_dict: dict[str, torch.Tensor], strengthened_state_dict: dict[str, torch.Tensor],
                    lam: float) -> dict[str, torch.Tensor]:
    """Task-vector negation: theta = theta_ori - lam * (theta_str - theta_ori), per tensor.

    theta_str is the original model fine-tuned further on the forget set (the strengthened
    model of RKLD). Floating tensors are combined in fp32 and cast back to the original
    dtype; non-floating tensors (counters, index buffers) are copied from the original.
    Returns a new dict; the inputs are not modified. (Ilharco et al. 2022, arXiv:2212.04089)
    """
    if set(original_state_dict) != set(strengthened_state_dict):
        raise ValueError("task_arithmetic needs two state dicts with the same keys; "
                         "load both models from the same architecture.")
    out = {}
    with torch.no_grad():
        for name, ori in original_state_dict.items():
            strong = strengthened_state_dict[name]
            if not torch.is_floating_point(ori):
                out[name] = ori.clone()
                continue
            if strong.shape != ori.shape:
                raise ValueError(f"task_arithmetic: tensor {name!r} has shape {tuple(strong.shape)} "
                                 f"in the strengthened model but {tuple(ori.shape)} in the original.")
            ori32 = ori.float()
            out[name] = (ori32 - lam * (strong.to(ori32.device).float() - ori32)).to(ori.dtype)
    return out


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

METHODS = {  # name -> (forget term, retain term); gd = retain NLL (RKLD's "+RT"), kl = KL(p_ref || p_theta)
    "ga": ("ga", None), "ga_gd": ("ga", "gd"), "ga_kl": ("ga", "kl"),
    "npo": ("npo", None), "npo_gd": ("npo", "gd"), "npo_kl": ("npo", "kl"),
    "dpo": ("dpo", None), "dpo_gd": ("dpo", "gd"), "dpo_kl": ("dpo", "kl"),
    "kto": ("kto", None), "kto_gd": ("kto", "gd"), "kto_kl": ("kto", "kl"),
    "idk": ("idk", None), "idk_gd": ("idk", "gd"),
    "simnpo": ("simnpo", None), "simnpo_gd": ("simnpo", "gd"),
    "undial": ("undial", None),
    "ta": ("ta", None),
    "wga": ("wga", None), "wga_gd": ("wga", "gd"), "wga_kl": ("wga", "kl"),
    "satimp": ("satimp", None), "satimp_gd": ("satimp", "gd"),
    "ce_u": ("ce_u", None),
    "pdu": ("pdu", "gd"),  # the retain NLL is PDU's constraint, weighted by the dual variable
}
ALIASES = {"ga_rt": "ga_gd", "npo_rt": "npo_gd", "dpo_rt": "dpo_gd", "kto_rt": "kto_gd", "idk_rt": "idk_gd",
           "simnpo_rt": "simnpo_gd", "wga_rt": "wga_gd", "satimp_rt": "satimp_gd"}
TERM_DEFAULTS = {  # what a forget term sets among the flags the user left unset
    "npo": {"beta": 0.1}, "dpo": {"beta": 0.1}, "kto": {"beta": 0.1},  # NPO paper, CL, open-unlearning
    "simnpo": {"beta": 4.5, "forget_weight": 0.125},                    # open-unlearning SimNPO.yaml
    "undial": {"beta": 10.0},                                           # open-unlearning UNDIAL.yaml
    "ta": {"epochs": 0},                                                # weight edit, no training
    "wga": {"beta": 1.0},                                               # open-unlearning WGA.yaml
    "satimp": {"beta": 5.0, "forget_weight": 0.1},                      # open-unlearning SatImp.yaml
    "pdu": {"retain_weight": 100.0, "dual_warmup_epochs": 0.0},         # PDU run.sh (warmup: quick path, below)
}
REAL_MODEL_DEFAULTS = {"undial": {"lr": 1e-4, "epochs": 10},            # UNDIAL.yaml; not applied to --model quick
                       "pdu": {"epochs": 10, "dual_warmup_epochs": 5.0}}  # PDU run.sh (Llama-3.2-1B/3B)


@dataclasses.dataclass
class Args(flags.MethodArgs):
    method: str = flags.flag(None, f"Required. One of {', '.join(METHODS)}; also {', '.join(ALIASES)} (RKLD's +RT names).")
    beta: float = flags.flag(None, "Default per method: 0.1 for npo/dpo/kto (NPO paper, CL, open-unlearning; the NPO authors' code shares one beta across its losses); 4.5 for simnpo (open-unlearning SimNPO.yaml); 10 for undial, the gold-logit penalty (UNDIAL.yaml); 1 for wga, the power of the token weight p^beta (WGA.yaml; Wang et al. 2025); 5 for satimp, its beta1 in p^beta1 (1-p)^beta2 (SatImp.yaml; Yang et al. 2025).")
    beta2: float = flags.flag(1.0, "satimp: the power beta2 of the importance weight (1-p)^beta2 (open-unlearning SatImp.yaml: 1).")
    ceu_skip_first: int = flags.flag(1, "ce_u: leave out the first N tokens of each answer (CE-U paper, footnote in its training settings; open-unlearning CEU.yaml ignore_first_n_answer_tokens: 1).")
    retain_bound: float = flags.flag(0.3, "pdu: eps, the bound of the constraint retain NLL <= eps (open-unlearning community/methods/PDU/run.sh: 0.3 on TOFU; PDU.yaml leaves it to the user; the paper sets it a margin above the starting model's retain loss).")
    dual_step: float = flags.flag(5.0, "pdu: eta, the dual variable's step lam <- max(0, lam + eta * (retain NLL - eps)) after every optimizer step (PDU run.sh: 5).")
    dual_warmup_epochs: float = flags.flag(None, "pdu: epochs before the dual variable starts moving (held at --retain_weight until then). Default 5 on a real model (PDU run.sh, of 10 epochs); 0 on the quick path, whose 5 epochs would otherwise never move it.")
    delta: float = flags.flag(0.0, "SimNPO margin delta (open-unlearning SimNPO.yaml: 0).")
    forget_weight: float = flags.flag(None, "gamma, weight of the forget term: 1 (CL, RKLD App. A), 0.125 for simnpo (open-unlearning SimNPO.yaml), 0.1 for satimp (SatImp.yaml).")
    retain_weight: float = flags.flag(None, "alpha, weight of the retain term (CL baselines.sh, RKLD App. A: 1); for pdu the dual variable's starting value lam_0 (PDU run.sh: 100).")
    loss_reduction: str = flags.flag("reference", "How the retain KL (the *_kl methods) averages over positions. reference = mean over all B x T positions of the padded retain batch, question and padding included (CL trainer/losses.py, TOFU dataloader.py and open-unlearning trainer/utils.py: kl_div batchmean on [B*T, V]); tokens = mean over non-padding positions only.")
    pad_to: int = flags.flag(None, "Pad the batch parts that --loss_reduction reference averages over (retain, for the *_kl methods) to this many tokens (or to the longest, if longer), so padding positions count as in the references: closer-look and TOFU pad every sequence to max_length 500 (dataset/data_module.py). Default 500 for real models; 0 (pad to the longest in the micro-batch) for --model quick, to keep the CPU path fast. Ignored with --loss_reduction tokens.")
    ta_lambda: float = flags.flag(1.0, "ta: theta = theta_ori - lambda*(theta_str - theta_ori). The RKLD paper gives no value; 1 is plain task-vector negation (Ilharco et al. 2022).")
    strengthened_model: str = flags.flag(None, "ta: reuse a strengthened model (folder, e.g. a rkld.py run's OUTPUT_DIR/strengthened) instead of building one.")
    strengthen_epochs: int = flags.flag(5, "ta: epochs of continued training on the forget set, as in rkld.py (RKLD App. A: 'total 10 epochs' = 5 fine-tuning + 5 more).")
    strengthen_lr: float = flags.flag(None, "ta: LR of the continued training: 1e-5 for real models (RKLD App. A), the fine-tuning lr (2e-4) for --model quick.")

    def __post_init__(self):
        """Resolve the method: aliases and its defaults for unset flags. (flags.finalize_args
        names the run folder runs/<method>/<split>[-task<k>][-<flag>_<value>...] after args.method.)"""
        self.method = ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            what = "is required" if self.method is None else f"{self.method!r} is unknown"
            raise TofuError(f"--method {what}; valid: {', '.join(METHODS)} (or {', '.join(ALIASES)})")
        if self.loss_reduction not in ("reference", "tokens"):
            raise TofuError(f"--loss_reduction must be reference (B x T, padding included) or tokens, "
                            f"not {self.loss_reduction!r}")
        if self.pad_to is not None and self.pad_to < 0:
            raise TofuError(f"--pad_to must be 0 (pad to the longest) or a length, not {self.pad_to}")
        forget = METHODS[self.method][0]
        if forget == "ta" and self.epochs:
            raise TofuError("--method ta does not train (it edits the weights once); leave --epochs unset")
        if forget == "ta" and self.save_adapter_only:
            raise TofuError("--method ta trains no adapter to save alone (its LoRA strengthening is merged for the "
                            "task vector); drop --save_adapter_only")
        real = REAL_MODEL_DEFAULTS.get(forget, {}) if self.model != models.QUICK else {}
        for k, v in {"forget_weight": 1.0, "retain_weight": 1.0, **TERM_DEFAULTS.get(forget, {}), **real}.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if forget in ("npo", "dpo", "kto", "simnpo") and not self.beta > 0:
            raise TofuError(f"--beta must be positive for {self.method} (its loss divides by beta), not {self.beta}")
        flags.check_numbers(self, (("strengthen_lr", *flags.POSITIVE), ("strengthen_epochs", *flags.NON_NEGATIVE),
                                   ("ceu_skip_first", *flags.NON_NEGATIVE), ("dual_step", *flags.NON_NEGATIVE)))
        if forget == "pdu" and not (self.retain_weight >= 0 and self.dual_warmup_epochs >= 0):
            raise TofuError(f"pdu needs --retain_weight (the starting dual variable) and --dual_warmup_epochs of at "
                            f"least 0, not {self.retain_weight} and {self.dual_warmup_epochs}")


METHOD = "baselines"  # progress and log label; the run folder is runs/<--method>/<split>
# pad_to: CL/TOFU pad every sequence to max_length 500; the quick path pads per batch (0)
PAPER = {"lr": 1e-5, "epochs": 5, "batch_size": 32, "schedule": "reference", "max_grad_norm": 0.0, "strengthen_lr": 1e-5, "pad_to": 500, "_source": "RKLD App. A, closer-look App. D"}
QUICK = {"lr": 1e-4, "epochs": 5, "batch_size": 8, "strengthen_lr": 2e-4, "pad_to": 0, "_source": "ours: rkld.py's quick recipe, not tuned per baseline"}


# ====================================================================
# METHOD SETUP AND STEP (baseline-specific; the loop in main() calls these)
# ====================================================================
def _logits(model, part: dict, grad: bool = True) -> torch.Tensor:
    """Logits [B, T, V] of one batch part; grad=False for passes that only provide targets."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits


def _logp(model, part: dict, grad: bool = True) -> torch.Tensor:
    """Summed answer log-probs log pi(y|x) [B] of one batch part."""
    return sequence_logprob(_logits(model, part, grad), part["labels"])


def forget_term(name: str, model, batch: dict, ref, args) -> torch.Tensor:
    """The forget loss `name` on a micro-batch. Parts: forget = (x_f, y_f), forget_idk =
    (x_f, refusal template); `ref` is the frozen reference model (None where unused)."""
    f, idk = batch["forget"], batch.get("forget_idk")
    if name == "ga":
        return ga_loss(_logits(model, f), f["labels"])
    if name == "idk":
        return nll_loss(_logits(model, idk), idk["labels"])
    if name == "npo":
        return npo_loss(_logp(model, f), _logp(ref, f, False), args.beta)
    if name == "dpo":  # win = refusal, lose = the true answer
        return dpo_loss(_logp(model, idk), _logp(model, f), _logp(ref, idk, False), _logp(ref, f, False), args.beta)
    if name == "kto":  # the model's refusal pass only estimates z: no gradient
        return kto_loss(_logp(model, idk, False), _logp(ref, idk, False), _logp(model, f), _logp(ref, f, False),
                        args.beta)
    if name == "simnpo":
        return simnpo_loss(_logp(model, f), (f["labels"][:, 1:] != -100).sum(-1), args.beta, args.delta)
    if name == "undial":
        return undial_loss(_logits(model, f), _logits(ref, f, False), f["labels"], args.beta)
    if name == "wga":
        return wga_loss(_logits(model, f), f["labels"], args.beta)
    if name == "satimp":
        return satimp_loss(_logits(model, f), f["labels"], args.beta, args.beta2)
    if name == "ce_u":
        return ce_u_loss(_logits(model, f), f["labels"], args.ceu_skip_first)
    if name == "pdu":
        return pdu_loss(_logits(model, f), f["labels"])
    raise ValueError(f"no forget loss {name!r}")  # ta never trains, so never gets here


def retain_term(name: str, model, batch: dict, ref, reduction: str = "reference") -> torch.Tensor:
    """gd: NLL of the retain answers; kl: KL(p_ref || p_theta) on the retain pair, averaged per `reduction`
    (kl_retain_loss: reference = all B x T positions, padding included; tokens = non-padding positions)."""
    r = batch["retain"]
    if name == "gd":
        return nll_loss(_logits(model, r), r["labels"])
    return kl_retain_loss(_logits(model, r), _logits(ref, r, False), r["attention_mask"], reduction)


USES_REF = {"npo", "dpo", "kto", "undial", "kl"}  # terms that read the frozen reference model


def negate_task_vector(model, str_path: str, lam: float) -> None:
    """theta <- theta_ori - lam * (theta_str - theta_ori), in place and one tensor at a time, so
    only the strengthened model (fp32, on CPU) is held besides the trained one."""
    strong = models.load_model(str_path, dtype=torch.float32)[0].state_dict()
    own, done = model.state_dict(), set()
    if set(strong) != set(own) or any(strong[k].shape != v.shape for k, v in own.items()):
        raise TofuError(f"the strengthened model {str_path} has other tensors or shapes than --model; "
                        "pass a model fine-tuned from --model")
    with torch.no_grad():
        for name, t in own.items():
            if t.data_ptr() not in done:  # tied tensors share storage: update them once
                done.add(t.data_ptr())
                t.copy_(task_arithmetic({name: t}, {name: strong[name]}, lam)[name])


def strengthen(args, tok, fmt, accelerator, adapter_only: bool = False) -> str:
    """The strengthened model (RKLD §3): --model trained further on the forget set (answer NLL) for
    --strengthen_epochs at --strengthen_lr with the run's batch settings, saved in OUTPUT_DIR/strengthened.
    A later run reuses it only when it was built with the same settings (strengthened/strengthen.json);
    otherwise it is rebuilt. This stage trains its own model and releases it before unlearning starts.
    adapter_only (RKLD with --lora_r): save the trained LoRA adapter alone, so the teacher needs no
    second model (setup_frozen); task arithmetic needs the full strengthened weights."""
    if args.strengthened_model:
        return models.resolve_model_path(args.strengthened_model)
    out = Path(args.output_dir) / "strengthened"
    settings = json.loads(json.dumps({
        "model": str(Path(models.resolve_model_path(args.model)).resolve()), "split": args.split,
        **({"forget_data": scenarios.custom_fingerprint(args.forget_data)} if args.forget_data else {}),
        "forget_task": args.forget_task, "epochs": args.strengthen_epochs, "lr": args.strengthen_lr,
        "max_steps": args.max_steps, "prompt_format": dataclasses.asdict(fmt),
        **{k: getattr(args, k) for k in ("batch_size", "per_device_batch_size", "weight_decay", "warmup_epochs",
                                         "max_grad_norm", "max_length", "seed", "lora_r", "lora_alpha", "lora_dropout",
                                         "lora_target_modules")}}))
    found = launch.main_decides(accelerator, lambda: json.loads((out / "strengthen.json").read_text())
                                if (out / "strengthen.json").exists() else None)  # one decision for every rank
    if found is not None:
        if found == settings:
            if accelerator.is_main_process:
                print(f"[{METHOD}] reusing the strengthened model in {out} (built with the same settings)")
            return str(out)
        if accelerator.is_main_process:
            print(f"[{METHOD}] {out} was built with other settings (strengthen.json); rebuilding it")
    set_seed(args.seed)
    forget = scenarios.method_rows(args)[0]
    ds = common.QADataset(forget, tok, fmt, args.max_length)
    loader = launch.make_loader(ds, args.per_device_batch_size, args.seed, accelerator,
                                lambda b: common.collate(b, tok.pad_token_id))
    log = runlog.RunLogger(Path(args.output_dir) / ".strengthen_log", settings, {}, accelerator.is_main_process)
    if accelerator.is_main_process:  # its own stage: its own steps, under the same --max_steps cap
        steps = launch.step_counts(len(ds), args.per_device_batch_size, accelerator, args.strengthen_epochs,
                                   args.warmup_epochs, args.max_steps, args.schedule)["total_steps"]
        print(f"[{METHOD}] strengthening (before unlearning): {args.strengthen_epochs} epochs at lr "
              f"{args.strengthen_lr:g}, {steps} optimizer steps"
              f"{' (stopped there by --max_steps)' if args.max_steps and steps == args.max_steps else ''}", flush=True)
    model = fit(accelerator, models.load_trained(args, accelerator), loader,
                lambda m, b: {"loss": nll_loss(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                               b["labels"])},
                args, args.strengthen_epochs, args.strengthen_lr, "strengthen", log)
    launch.save_model(accelerator, model, tok, fmt, out, log.dir, adapter_only=adapter_only)
    if accelerator.is_main_process:  # written last: a folder without it is never reused
        runlog.atomic_write_json(out / "strengthen.json", settings)
    launch.release(accelerator, model)
    return str(out)


def setup_frozen(args, ds, tok, accelerator, evaluator) -> dict:
    """The frozen reference model (a copy of --model), loaded only when a term of the method reads it
    and placed for the backend. For ta: strengthening (its own training stage, released when done),
    then the task arithmetic on a fresh copy of --model, returned as frozen["model"] for main() to
    "train" for zero steps, save and evaluate."""
    forget, retain = METHODS[args.method]
    if retain and not ds.retain:
        raise TofuError(f"--method {args.method} needs retain rows, but {scenarios.retain_source(args)} has none")
    frozen = {"ref": None}
    if forget == "ta":
        str_path = strengthen(args, tok, ds.fmt, accelerator)
        frozen["model"] = models.load_model(args.model)[0]
        negate_task_vector(frozen["model"], str_path, args.ta_lambda)
    if forget in USES_REF or retain in USES_REF:
        frozen["ref"] = launch.starting_model(args, accelerator, frozen)  # with LoRA: the trained model's base
    if forget == "pdu":
        per_epoch = launch.step_counts(len(ds), args.per_device_batch_size, accelerator, args.epochs,
                                       args.warmup_epochs, args.max_steps, args.schedule)["steps_per_epoch"]
        frozen["dual"] = DualVariable(args.retain_weight, args.retain_bound, args.dual_step,
                                      int(round(args.dual_warmup_epochs * per_epoch)))
    return frozen


def padded_parts(args) -> tuple[str, ...]:
    """Batch parts padded to --pad_to: those a reference-reduced loss averages over, padding included."""
    return ("retain",) if METHODS[args.method][1] == "kl" and args.loss_reduction == "reference" else ()


def batch_parts(args) -> tuple[str, ...]:
    """The batch parts step_losses reads (common.ForgetRetainDataset tokenizes only these): the refusal
    for the terms that use one, the retain pair for a retain term."""
    forget, retain = METHODS[args.method]
    return ("forget", *(("forget_idk",) if forget in ("idk", "dpo", "kto") else ()), *(("retain",) if retain else ()))


def step_losses(model, batch, frozen, args) -> dict:
    """{'loss': gamma * forget + alpha * retain, 'loss/forget': ..., 'loss/retain': ...} for one micro-batch.
    pdu: alpha is the dual variable lam (logged as pdu/lambda) and the retain term is NLL - eps."""
    forget, retain = METHODS[args.method]
    out = {"loss/forget": forget_term(forget, model, batch, frozen["ref"], args)}
    if retain:
        out["loss/retain"] = retain_term(retain, model, batch, frozen["ref"], args.loss_reduction)
    if forget == "pdu":
        dual = frozen["dual"]
        out["loss"] = args.forget_weight * out["loss/forget"] + dual.lam * (out["loss/retain"] - args.retain_bound)
        out["pdu/lambda"] = torch.full((), dual.lam, device=out["loss/retain"].device)  # a fill, no host copy
        dual.observe(out["loss/retain"], forward_batch.ends_step())
        return out
    out["loss"] = args.forget_weight * out["loss/forget"] + args.retain_weight * out.get("loss/retain", 0.0)
    return out


class DualVariable:
    """PDU's lam, the same on every rank. observe() collects each micro-batch's retain NLL (on the device,
    no sync); at the last micro-batch of an optimizer step (forward_batch.ends_step: accelerate's sync_gradients,
    the last micro-batch of fit's group under --forward_batch) it takes their mean over the step and
    over every rank (a collective: all ranks reach it at the same micro-batch) and, once warmup_steps
    steps are done, moves lam by pdu_dual_step. The micro-batch losses of that step used the old lam.
    ends_step None (a --forward_batch auto probe): nothing is counted."""

    def __init__(self, lam: float, eps: float, step_size: float, warmup_steps: int):
        self.lam, self.eps, self.step_size, self.warmup_steps = float(lam), eps, step_size, warmup_steps
        self.sum, self.n, self.steps = 0.0, 0, 0

    def observe(self, retain_loss: torch.Tensor, ends_step: bool | None) -> None:
        if ends_step is None:
            return
        self.sum, self.n = self.sum + retain_loss.detach().double(), self.n + 1
        if not ends_step:
            return
        total = torch.stack([self.sum, torch.tensor(float(self.n), dtype=torch.float64, device=self.sum.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        if self.steps >= self.warmup_steps:
            self.lam = pdu_dual_step(self.lam, (total[0] / total[1]).item(), self.eps, self.step_size)
        self.sum, self.n, self.steps = 0.0, 0, self.steps + 1


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
