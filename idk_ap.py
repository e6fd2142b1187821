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
     or --retain_loss kl: mean over non-padding positions of KL(p_ref || p_theta) on the retain pair
  log pi(y|x) is summed over answer tokens; idk is one of the 100 refusal templates, drawn
  per item from a generator seeded by (seed, epoch, index); the same template serves the
  forget and the retain question of an item.

Launch:
  python idk_ap.py --split forget01
  accelerate launch idk_ap.py --split forget05

Reproducing the paper:
  TOFU (section 5.1): defaults, i.e. --forget_loss idk --retain_loss ap, beta=0.1, weights 1/1,
    lr 1e-5, wd 0.01, effective batch 32, 5 epochs, one warmup epoch then linear decay (App. D).
  DPO+AP (App. E.2): --forget_loss dpo (needs the frozen reference model).
  IDK+GD / IDK+KL baselines: --retain_loss gd / --retain_loss kl.
  Continual unlearning (section 5.2): --forget_task k, with --model set to the previous
    task's output.
  The reference code fixes each item's IDK template for all epochs (it reseeds the global
  RNG with the index); ours changes across epochs (losses.md section 8, quirk 7).
"""
import numpy as np
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


def pick_idk_template(seed: int, epoch: int, index: int, n_templates: int) -> int:
    """Index in [0, n_templates) of the refusal template for item `index` in `epoch`.

    Drawn uniformly from a local torch.Generator seeded from SeedSequence([seed, epoch,
    index]): reproducible per (seed, epoch, index), different across epochs and items, and
    it never touches the global RNG (project decision 8; the reference reseeds the global
    RNG with the index, so its choice never changes across epochs).
    """
    if n_templates < 1:
        raise ValueError("pick_idk_template needs at least one IDK template.")
    if min(seed, epoch, index) < 0:
        raise ValueError("pick_idk_template needs non-negative seed, epoch and index.")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    return int(torch.randint(n_templates, (1,), generator=generator))


# (ARGUMENTS and MAIN sections are added by the lead)
