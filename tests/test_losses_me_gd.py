"""Hand-computed checks of the pure loss functions in me_gd.py (maximum entropy, GD, KL).

Expected values are written out with `math` on plain floats, never by calling the code
under test. V = 4 so that log K = log 4.
"""
import math

import pytest
import torch

import me_gd

K = 4


def log_softmax(row):
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def kl_u_p(row):
    """KL(U || p) = sum_v (1/K) * (log(1/K) - log p(v)), written from the definition."""
    return sum((1 / K) * (math.log(1 / K) - lp) for lp in log_softmax(row))


def ce_u_p(row):
    """CE(U, p) = -(1/K) * sum_v log p(v)."""
    return -sum(log_softmax(row)) / K


def kl_p_u(row):
    """KL(p || U) = sum_v p(v) * log(p(v) * K)."""
    return sum(math.exp(lp) * (lp + math.log(K)) for lp in log_softmax(row))


def entropy(row):
    return -sum(math.exp(lp) * lp for lp in log_softmax(row))


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# Two sequences, T = 4, V = 4. Sequence 0 has 3 real tokens, sequence 1 has 2.
ROWS = [[[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 0.0, -1.0], [3.0, -2.0, 0.0, 1.0], [9.0, 9.0, -9.0, 0.0]],
        [[0.5, -1.5, 2.0, 0.0], [4.0, 4.0, 4.0, -4.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]
# Kept positions (input and target real): seq 0 t = 0, 1; seq 1 t = 0.
KEPT = [ROWS[0][0], ROWS[0][1], ROWS[1][0]]
# Answer targets: seq 0 token 2, seq 1 token 1 -> with mask_question only seq 0 t = 1 and seq 1 t = 0.
LABELS = [[-100, -100, 2, -100], [-100, 3, -100, -100]]


def test_kl_u_p_is_ce_minus_log_k():
    for row in KEPT:
        assert kl_u_p(row) == pytest.approx(ce_u_p(row) - math.log(K), abs=1e-12)
        assert kl_p_u(row) == pytest.approx(math.log(K) - entropy(row), abs=1e-12)


def ref_log(p_row, eps):
    """log(softmax + eps): the reference code's log-probabilities."""
    return [math.log(math.exp(lp) + eps) for lp in p_row]


def me_reference(rows, eps=1e-12):
    """The reference code's ME (closer-look trainer/losses.py, mask=false), written out: the mean
    over every shifted position (b, t < T-1) of the padded batch, padding included, of
    sum_v (1/K) * (log(1/K) - log(softmax_v + eps))."""
    vals = [sum((1 / K) * (math.log(1 / K) - lp) for lp in ref_log(log_softmax(r), eps))
            for seq in rows for r in seq[:-1]]
    return sum(vals) / len(vals)


# A padded batch whose padding positions hold large logits, so that both the padding and
# the epsilon change the reference value: at [30, -30, 0, 0], p(0) = e^-30 < 1e-12.
PAD_ROWS = [[[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 0.0, -1.0], [30.0, -30.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]],
            [[0.5, -1.5, 2.0, 0.0], [25.0, 0.0, -3.0, 1.0], [3.0, -2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]]
PAD_MASK = [[1, 1, 0, 0], [1, 0, 0, 0]]  # seq 0 has 2 real tokens, seq 1 has 1


def test_me_reference_reduction_is_the_reference_formula_on_a_padded_batch():
    # Catches: dropping padding from the mean (the old clean-only loss, which changes what
    # alpha = 0.1 means), dividing by B*T instead of B*(T-1), or losing the epsilon.
    logits, mask = t(PAD_ROWS), torch.tensor(PAD_MASK)
    expected = me_reference(PAD_ROWS)
    got = me_gd.me_loss(logits, mask)  # the defaults are the reference's choices
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert me_gd.me_loss(logits, mask, reduction="reference", eps=1e-12).item() == pytest.approx(expected, rel=1e-5)
    # the three alternatives differ from it by a lot on this batch, so the check has teeth
    clean = kl_u_p(PAD_ROWS[0][0])  # tokens: only seq 0, t = 0 has its input and target real
    no_eps = me_reference(PAD_ROWS, eps=0.0)
    over_bt = expected * 6 / 8
    for other in (clean, no_eps, over_bt):
        assert abs(other - expected) > 0.1
    assert me_gd.me_loss(logits, mask, reduction="reference", eps=0.0).item() == pytest.approx(no_eps, rel=1e-5)


def test_me_tokens_reduction_is_the_clean_mean_over_real_tokens():
    # Catches: padding leaking into the clean loss, or the epsilon applied when eps=0.
    logits, mask = t(PAD_ROWS), torch.tensor(PAD_MASK)
    got = me_gd.me_loss(logits, mask, reduction="tokens", eps=0.0)
    assert got.item() == pytest.approx(kl_u_p(PAD_ROWS[0][0]), rel=1e-5)
    with pytest.raises(ValueError):
        me_gd.me_loss(logits, mask, reduction="batch")


@pytest.mark.parametrize("name,alias,fn", [("kl_u_p", "reference", kl_u_p), ("kl_p_u", "paper", kl_p_u)])
def test_me_value_over_question_and_answer_tokens(name, alias, fn):
    logits, mask = t(ROWS), torch.tensor(MASK)
    expected = sum(fn(r) for r in KEPT) / 3  # token mean over the micro-batch
    for d in (name, alias):
        got = me_gd.me_loss(logits, mask, divergence=d, reduction="tokens", eps=0.0)
        assert got.item() == pytest.approx(expected, abs=1e-5)


def test_me_default_divergence_is_kl_u_p_and_differs_from_kl_p_u():
    logits, mask = t(ROWS), torch.tensor(MASK)
    forward = sum(kl_u_p(r) for r in KEPT) / 3
    backward = sum(kl_p_u(r) for r in KEPT) / 3
    assert abs(forward - backward) > 0.05
    assert me_gd.me_loss(logits, mask, reduction="tokens", eps=0.0).item() == pytest.approx(forward, abs=1e-5)


@pytest.mark.parametrize("reduction", ["reference", "tokens"])
def test_me_padding_counts_only_under_the_reference_reduction(reduction):
    logits, mask = t(ROWS), torch.tensor(MASK)
    base = me_gd.me_loss(logits, mask, reduction=reduction)
    changed = logits.clone()
    changed[0, 2] = t([7.0, -7.0, 0.0, 0.0])  # input real but target is padding
    changed[1, 1:] = t([-6.0, 0.0, 6.0, 1.0])  # padding
    moved = not torch.allclose(me_gd.me_loss(changed, mask, reduction=reduction), base)
    assert moved == (reduction == "reference")
    changed[0, 3] = t([0.0, 5.0, 0.0, 0.0])   # the last position predicts nothing: never counts
    changed2 = me_gd.me_loss(changed, mask, reduction=reduction)
    changed[0, 3] = t([0.0, -5.0, 9.0, 0.0])
    assert torch.allclose(me_gd.me_loss(changed, mask, reduction=reduction), changed2)
    changed[0, 1] = t([7.0, -7.0, 0.0, 0.0])  # a question/answer position: the loss must move
    assert not torch.allclose(me_gd.me_loss(changed, mask, reduction=reduction), changed2)


@pytest.mark.parametrize("reduction", ["reference", "tokens"])
@pytest.mark.parametrize("name,fn", [("kl_u_p", kl_u_p), ("kl_p_u", kl_p_u)])
def test_me_mask_question_keeps_answer_tokens_only(name, fn, reduction):
    # the reference code with mask=true also averages over answer targets only
    logits, mask, labels = t(ROWS), torch.tensor(MASK), torch.tensor(LABELS)
    expected = (fn(ROWS[0][1]) + fn(ROWS[1][0])) / 2
    got = me_gd.me_loss(logits, mask, labels=labels, divergence=name, mask_question=True, reduction=reduction,
                        eps=0.0)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError):
        me_gd.me_loss(logits, mask, mask_question=True)
    with pytest.raises(ValueError):
        me_gd.me_loss(logits, mask, divergence="kl")


@pytest.mark.parametrize("name", ["kl_u_p", "kl_p_u"])
def test_me_is_zero_at_uniform(name):
    logits = torch.full((2, 5, K), 0.7)
    logits[1] = -3.0
    mask = torch.ones(2, 5, dtype=torch.long)
    assert me_gd.me_loss(logits, mask, divergence=name).item() == pytest.approx(0.0, abs=1e-6)
    assert me_gd.me_loss(logits, mask, divergence=name, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_me_kl_u_p_gradient_is_p_minus_u():
    logits = t([ROWS[0][:3]], requires_grad=True)
    me_gd.me_loss(logits, torch.tensor([[1, 1, 1]]), reduction="tokens", eps=0.0).backward()  # kept: t = 0, 1
    for pos in range(2):
        p = [math.exp(lp) for lp in log_softmax(ROWS[0][pos])]
        assert torch.allclose(logits.grad[0, pos], t([(pv - 1 / K) / 2 for pv in p]), atol=1e-6)
    assert torch.equal(logits.grad[0, 2], torch.zeros(K))


def test_me_epsilon_form_and_exact_form():
    # softmax of 100 vs -100 underflows to 0 in fp32: the reference's log(softmax + 1e-12)
    # caps -log p there; eps=0 keeps the exact log_softmax value.
    row = [100.0, -100.0, 0.0, 0.0]
    lse = 100.0 + math.log1p(math.exp(-200.0) + 2 * math.exp(-100.0))
    exact = -math.log(K) + lse - sum(row) / K
    with_epsilon = -math.log(K) - sum(math.log(math.exp(x - lse) + 1e-12) for x in row) / K
    assert abs(with_epsilon - exact) > 10
    logits, mask = t([[row, row]]), torch.tensor([[1, 1]])
    got = me_gd.me_loss(logits, mask, eps=0.0)
    assert torch.isfinite(got) and got.item() == pytest.approx(exact, rel=1e-6)
    assert me_gd.me_loss(logits, mask).item() == pytest.approx(with_epsilon, rel=1e-6)


# ---------------------------------------------------------------- retain terms (copies of baselines')


def test_nll_loss_value():
    logits = t([[[1.0, 2.0, 0.5, 0.0], [0.0, -1.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]])
    labels = torch.tensor([[-100, 2, 0]])
    expected = -(log_softmax([1.0, 2.0, 0.5, 0.0])[2] + log_softmax([0.0, -1.0, 3.0, 0.0])[0]) / 2
    assert me_gd.nll_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_kl_retain_direction_and_reductions():
    theta, ref, ref_pad = [4.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [9.0, 0.0, 0.0, 0.0]
    lt, lr, lp = log_softmax(theta), log_softmax(ref), log_softmax(ref_pad)
    forward = sum(math.exp(b) * (b - a) for a, b in zip(lt, lr))  # KL(p_ref || p_theta)
    reverse = sum(math.exp(a) * (a - b) for a, b in zip(lt, lr))
    at_pad = sum(math.exp(b) * (b - a) for a, b in zip(lt, lp))
    assert abs(forward - reverse) > 0.5
    args = t([[theta, theta]]), t([[ref, ref_pad]]), torch.tensor([[1, 0]])
    assert me_gd.kl_retain_loss(*args, reduction="tokens").item() == pytest.approx(forward, abs=1e-5)
    assert me_gd.kl_retain_loss(*args).item() == pytest.approx((forward + at_pad) / 2, abs=1e-5)
