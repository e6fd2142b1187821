"""Baselines for LLM unlearning on TOFU: GA, NPO, DPO, KTO, IDK, SimNPO, UNDIAL, TA,
each with an optional retain term GD (retain NLL, also called RT) or KL.

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
  retain  gd: NLL_theta(y_r | x_r);  kl: mean over non-padding positions of KL(p_ref || p_theta)

Launch:
  python baselines.py --method npo_gd --split forget01
  accelerate launch baselines.py --method dpo_kl --split forget05

Reproducing the papers:
  --method {ga,ga_gd,ga_kl,npo,npo_gd,npo_kl,dpo,dpo_gd,dpo_kl,idk,idk_gd} with the defaults
  (beta=0.1, gamma=alpha=1, lr 1e-5, wd 0.01, effective batch 32, one warmup epoch then linear
  decay) is the Closer Look setup (App. D, 5 epochs) and the RKLD setup (App. A; RKLD also
  reports kto, kto_gd, kto_kl and ta, and trains up to 10 epochs).
  --method simnpo_gd: beta=4.5, delta=0, gamma=0.125, alpha=1 (open-unlearning SimNPO.yaml).
  --method undial: beta=10, alpha=0, lr 1e-4, 10 epochs (open-unlearning UNDIAL.yaml).
  --method ta: the RKLD paper does not state lam; lam=1 is the plain task-vector negation of
  Ilharco et al., with theta_str the strengthened model that rkld.py builds.
"""
import torch
import torch.nn.functional as F

# ====================================================================
# METHOD LOGIC (the part people copy): pure functions, no globals, no I/O
# ====================================================================
# Shapes: logits [B, T, V] (any dtype, upcast to fp32 here), labels [B, T] with -100 on
# prompt and padding. logits[:, t] predict labels[:, t + 1].


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


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GA forget loss = -NLL (token mean over scored answer tokens; see nll_loss).
    Minimising it raises the NLL of the forget answers."""
    return -nll_loss(logits, labels)


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


# (ARGUMENTS and MAIN sections are added by the lead)
