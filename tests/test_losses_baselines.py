"""Hand-computed checks of the pure loss functions in baselines.py.

Expected values are written out with `math` on plain floats, never by calling the code
under test. Shapes are tiny (V = 3, T = 3) so every number can be checked on paper.
"""
import math

import pytest
import torch
from torch import nn

import baselines


def log_softmax(row):
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def kl(p_logits, q_logits):
    """KL(p || q) for two logit rows."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


# Two sequences, T = 3, V = 3. logits[:, t] predict labels[:, t + 1].
LOGITS = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]],
          [[0.3, -0.2, 1.1], [1.5, 0.5, -0.5], [-1.0, 0.0, 1.0]]]
LABELS = [[-100, 2, 0], [-100, -100, 1]]
# Scored: seq 0, position 0 -> token 2 and position 1 -> token 0; seq 1, position 1 -> token 1.
LP_00 = log_softmax(LOGITS[0][0])[2]
LP_01 = log_softmax(LOGITS[0][1])[0]
LP_11 = log_softmax(LOGITS[1][1])[1]


def tensors():
    return torch.tensor(LOGITS), torch.tensor(LABELS)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ---------------------------------------------------------------- NLL / GA


def test_sequence_logprob_sums_scored_tokens():
    logits, labels = tensors()
    got = baselines.sequence_logprob(logits, labels)
    assert torch.allclose(got, t([LP_00 + LP_01, LP_11]), atol=1e-6)


def test_nll_is_token_mean_over_the_micro_batch():
    logits, labels = tensors()
    expected = -(LP_00 + LP_01 + LP_11) / 3
    mean_of_means = -((LP_00 + LP_01) / 2 + LP_11) / 2
    assert abs(expected - mean_of_means) > 1e-3  # the two reductions are distinguishable here
    assert baselines.nll_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert baselines.ga_loss(logits, labels).item() == pytest.approx(-expected, abs=1e-6)


def test_nll_ignores_masked_positions():
    logits, labels = tensors()
    base = baselines.nll_loss(logits, labels)
    changed = logits.clone()
    changed[0, 2] = torch.tensor([9.0, -9.0, 4.0])  # last position predicts nothing
    changed[1, 0] = torch.tensor([-7.0, 3.0, 8.0])  # predicts a -100 label
    assert torch.allclose(baselines.nll_loss(changed, labels), base)
    changed[1, 1] = torch.tensor([-7.0, 3.0, 8.0])  # a scored position: the loss must move
    assert not torch.allclose(baselines.nll_loss(changed, labels), base)


def test_nll_upcasts_and_handles_empty_batch():
    logits, labels = tensors()
    out = baselines.nll_loss(logits.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-(LP_00 + LP_01 + LP_11) / 3, abs=2e-2)
    empty = torch.full_like(labels, -100)
    assert baselines.nll_loss(logits, empty).item() == 0.0


# ---------------------------------------------------------------- retain KL


KL_THETA = [[4.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, -9.0, 0.0]]
KL_REF = [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
KL_MASK = [1, 1, 0]


def test_kl_retain_is_kl_ref_to_theta_over_non_padding():
    logits, ref, mask = t([KL_THETA]), t([KL_REF]), torch.tensor([KL_MASK])
    forward = (kl(KL_REF[0], KL_THETA[0]) + kl(KL_REF[1], KL_THETA[1])) / 2  # KL(p_ref || p_theta)
    reverse = (kl(KL_THETA[0], KL_REF[0]) + kl(KL_THETA[1], KL_REF[1])) / 2  # KL(p_theta || p_ref)
    assert abs(forward - reverse) > 0.5  # an asymmetric pair
    got = baselines.kl_retain_loss(logits, ref, mask, reduction="tokens").item()
    assert got == pytest.approx(forward, abs=1e-5)
    assert got != pytest.approx(reverse, abs=1e-2)


# A padded retain batch, B = 2, T = 3: seq 0 has 2 real tokens, seq 1 has 1.
KL_THETA_B = [KL_THETA, [[1.0, -1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, -4.0]]]
KL_REF_B = [KL_REF, [[0.0, 2.0, 0.0], [-2.0, 1.0, 1.0], [2.0, 2.0, 0.0]]]
KL_MASK_B = [KL_MASK, [1, 0, 0]]


def test_kl_retain_both_reductions_by_hand_on_a_padded_batch():
    # Catches: the reference reduction dropping padding (the retain weight then means something
    # else than in CL/TOFU), dividing by the real-token count or by B instead of B*T, or the
    # tokens reduction letting padding in.
    logits, ref, mask = t(KL_THETA_B), t(KL_REF_B), torch.tensor(KL_MASK_B)
    per = [[kl(r, q) for r, q in zip(rs, qs)] for rs, qs in zip(KL_REF_B, KL_THETA_B)]
    reference = sum(sum(row) for row in per) / 6                      # batchmean over B*T = 6 positions
    tokens = (per[0][0] + per[0][1] + per[1][0]) / 3                   # the 3 real positions
    assert abs(reference - tokens) > 0.5
    assert baselines.kl_retain_loss(logits, ref, mask).item() == pytest.approx(reference, rel=1e-5)
    assert baselines.kl_retain_loss(logits, ref, mask, reduction="reference").item() == pytest.approx(reference,
                                                                                                       rel=1e-5)
    assert baselines.kl_retain_loss(logits, ref, mask, reduction="tokens").item() == pytest.approx(tokens, rel=1e-5)
    with pytest.raises(ValueError):
        baselines.kl_retain_loss(logits, ref, mask, reduction="batchmean")


@pytest.mark.parametrize("reduction", ["reference", "tokens"])
def test_kl_retain_padding_counts_only_under_reference_and_zero_at_equal_inputs(reduction):
    logits, ref, mask = t([KL_THETA]), t([KL_REF]), torch.tensor([KL_MASK])
    base = baselines.kl_retain_loss(logits, ref, mask, reduction)
    logits2, ref2 = logits.clone(), ref.clone()
    logits2[0, 2] = t([-3.0, 0.0, 3.0])  # a padding position
    ref2[0, 2] = t([5.0, 0.0, 0.0])
    moved = not torch.allclose(baselines.kl_retain_loss(logits2, ref2, mask, reduction), base)
    assert moved == (reduction == "reference")
    assert baselines.kl_retain_loss(logits, logits.clone(), mask, reduction).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_retain_sends_no_gradient_to_the_reference():
    logits = t([KL_THETA], requires_grad=True)
    ref = t([KL_REF], requires_grad=True)
    baselines.kl_retain_loss(logits, ref, torch.tensor([KL_MASK])).backward()
    assert logits.grad is not None and ref.grad is None


# ---------------------------------------------------------------- NPO


def test_npo_value():
    logp_theta, logp_ref = t([-5.0, -20.0]), t([-6.0, -3.0])
    # S_theta - S_ref = (5 - 6, 20 - 3) = (-1, 17)
    expected = -(2 / 0.1) * (logsigmoid(0.1 * -1) + logsigmoid(0.1 * 17)) / 2
    assert baselines.npo_loss(logp_theta, logp_ref, beta=0.1).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_two_over_beta_factor(beta):
    # At theta == ref the ratio is 0, so the loss is -(2/beta) log sigmoid(0) = (2/beta) log 2.
    logp = t([-4.0, -9.0, -1.5])
    got = baselines.npo_loss(logp, logp.clone(), beta=beta).item()
    assert got == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_gradient_weights_and_ga_limit():
    values, ref = [-5.0, -20.0, -1.0], t([-6.0, -3.0, -4.0])
    # beta = 0.1: d/d logp_theta_i = 2 * (1 - sigmoid(beta * r_i)) / B with r = logp_ref - logp_theta
    logp = t(values, requires_grad=True)
    baselines.npo_loss(logp, ref, beta=0.1).backward()
    expected = [2 * (1 - sigmoid(0.1 * (r - v))) / 3 for v, r in zip(values, ref.tolist())]
    assert torch.allclose(logp.grad, t(expected), atol=1e-6)
    # beta -> 0: the same gradient as GA on sequence log-probs, mean(logp_theta).
    logp = t(values, requires_grad=True)
    baselines.npo_loss(logp, ref, beta=1e-4).backward()
    ga = t(values, requires_grad=True)
    ga.mean().backward()
    assert torch.allclose(ga.grad, t([1 / 3] * 3))
    assert torch.allclose(logp.grad, ga.grad, rtol=1e-3)


# ---------------------------------------------------------------- DPO


def test_dpo_value_and_orientation():
    win_t, lose_t, win_r, lose_r = t([-10.0, -4.0]), t([-30.0, -5.0]), t([-12.0, -4.0]), t([-25.0, -6.0])
    # margins: (-10 + 30) - (-12 + 25) = 7 ; (-4 + 5) - (-4 + 6) = -1
    expected = -(2 / 0.1) * (logsigmoid(0.1 * 7) + logsigmoid(0.1 * -1)) / 2
    got = baselines.dpo_loss(win_t, lose_t, win_r, lose_r, beta=0.1).item()
    assert got == pytest.approx(expected, rel=1e-6)
    swapped = baselines.dpo_loss(lose_t, win_t, lose_r, win_r, beta=0.1).item()
    expected_swapped = -(2 / 0.1) * (logsigmoid(0.1 * -7) + logsigmoid(0.1 * 1)) / 2
    assert swapped == pytest.approx(expected_swapped, rel=1e-6)
    assert swapped > got  # the model already prefers the IDK (win) answer more than ref does


def test_dpo_gradient_raises_win_and_lowers_lose():
    win, lose = t([-10.0], requires_grad=True), t([-30.0], requires_grad=True)
    baselines.dpo_loss(win, lose, t([-12.0]), t([-25.0]), beta=0.1).backward()
    w = 2 * (1 - sigmoid(0.1 * 7))  # -(2/beta) d/dm log sigmoid(beta m) * beta
    assert win.grad.item() == pytest.approx(-w, rel=1e-5)
    assert lose.grad.item() == pytest.approx(w, rel=1e-5)


# ---------------------------------------------------------------- KTO


def test_kto_value_and_detached_reference_point():
    idk_t = t([-10.0, -11.5], requires_grad=True)
    idk_r = t([-11.0, -11.0])
    f_t = t([-30.0, -25.0], requires_grad=True)
    f_r = t([-28.0, -26.0])
    z = ((-10.0 + 11.0) + (-11.5 + 11.0)) / 2  # 0.25, not multiplied by beta
    ell = [-2.0, 1.0]
    u = [z - 0.1 * e for e in ell]
    expected = 1 - (2 / 0.1) * (sigmoid(u[0]) + sigmoid(u[1])) / 2
    loss = baselines.kto_loss(idk_t, idk_r, f_t, f_r, beta=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # with z scaled by beta (the KTO paper's form) the value would differ
    assert expected != pytest.approx(1 - 20 * (sigmoid(0.1 * z + 0.2) + sigmoid(0.1 * z - 0.1)) / 2, abs=1e-3)
    loss.backward()
    assert idk_t.grad is None  # z is a no-grad KL estimate
    expected_grad = [2 * sigmoid(x) * (1 - sigmoid(x)) / 2 for x in u]  # > 0: descent lowers log pi(y_f|x_f)
    assert torch.allclose(f_t.grad, t(expected_grad), atol=1e-6)


# ---------------------------------------------------------------- SimNPO


def test_simnpo_value():
    logp_sum, n = t([-12.0, -3.0]), torch.tensor([4, 2])
    # S / n = (3, 1.5)
    expected = -(2 / 4.5) * (logsigmoid(4.5 * 3) + logsigmoid(4.5 * 1.5)) / 2
    assert baselines.simnpo_loss(logp_sum, n).item() == pytest.approx(expected, rel=1e-5)
    expected_delta = -(2 / 2.0) * (logsigmoid(2.0 * (3 - 1)) + logsigmoid(2.0 * (1.5 - 1))) / 2
    got = baselines.simnpo_loss(logp_sum, n, beta=2.0, delta=1.0).item()
    assert got == pytest.approx(expected_delta, rel=1e-6)


def test_simnpo_pushes_nll_up():
    logp_sum = t([-12.0, -3.0], requires_grad=True)
    baselines.simnpo_loss(logp_sum, torch.tensor([4, 2])).backward()
    assert (logp_sum.grad > 0).all()  # descent lowers log pi, i.e. raises the NLL


# ---------------------------------------------------------------- UNDIAL


UD_STUDENT = [[0.2, -0.3, 1.0], [1.0, 0.0, -1.0], [5.0, 5.0, 5.0]]
UD_REF = [[1.0, 2.0, 0.0], [0.5, -0.5, 2.5], [0.0, 0.0, 0.0]]


def soft_ce(teacher_logits, student_logits):
    q = [math.exp(x) for x in log_softmax(teacher_logits)]
    return -sum(a * b for a, b in zip(q, log_softmax(student_logits)))


@pytest.mark.parametrize("beta", [10.0, 2.0])
def test_undial_value(beta):
    labels = torch.tensor([[-100, 1, 2]])
    ce0 = soft_ce([1.0, 2.0 - beta, 0.0], UD_STUDENT[0])   # position 0 predicts token 1
    ce1 = soft_ce([0.5, -0.5, 2.5 - beta], UD_STUDENT[1])  # position 1 predicts token 2
    got = baselines.undial_loss(t([UD_STUDENT]), t([UD_REF]), labels, beta=beta).item()
    assert got == pytest.approx((ce0 + ce1) / 2, rel=1e-5)


def test_undial_ignores_minus_100_positions():
    labels = torch.tensor([[-100, -100, 2]])
    student, ref = t([UD_STUDENT]), t([UD_REF])
    expected = soft_ce([0.5, -0.5, 2.5 - 10.0], UD_STUDENT[1])
    assert baselines.undial_loss(student, ref, labels).item() == pytest.approx(expected, rel=1e-5)
    student[0, 0], ref[0, 0] = t([4.0, -4.0, 0.0]), t([-2.0, 0.0, 7.0])
    student[0, 2], ref[0, 2] = t([1.0, 2.0, 3.0]), t([3.0, 2.0, 1.0])
    assert baselines.undial_loss(student, ref, labels).item() == pytest.approx(expected, rel=1e-5)


def test_undial_sends_no_gradient_to_the_reference():
    student, ref = t([UD_STUDENT], requires_grad=True), t([UD_REF], requires_grad=True)
    baselines.undial_loss(student, ref, torch.tensor([[-100, 1, 2]])).backward()
    assert student.grad is not None and ref.grad is None


# ---------------------------------------------------------------- task arithmetic


def tiny_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(t([[1.0, 2.0], [3.0, 4.0]]))
        model[0].bias.copy_(t([0.5, -0.5]))
    return model


def test_task_arithmetic_on_a_tiny_model():
    ori = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    ori["1.num_batches_tracked"] = torch.tensor(3)
    strong = {k: v.clone() for k, v in ori.items()}
    strong["0.weight"] = t([[2.0, 2.0], [3.0, 6.0]])
    strong["0.bias"] = t([0.5, 0.5])
    strong["1.num_batches_tracked"] = torch.tensor(7)
    ori_before = {k: v.clone() for k, v in ori.items()}

    new = baselines.task_arithmetic(ori, strong, lam=0.5)
    # theta = ori - 0.5 * (str - ori)
    assert torch.equal(new["0.weight"], t([[0.5, 2.0], [3.0, 3.0]]))
    assert torch.equal(new["0.bias"], t([0.5, -1.0]))
    assert new["1.num_batches_tracked"].item() == 3  # non-floating: copied from the original
    assert torch.equal(new["1.running_var"], ori["1.running_var"])  # unchanged tensors stay put
    for k in ori:
        assert torch.equal(ori[k], ori_before[k])  # inputs untouched
    model = tiny_model()
    model.load_state_dict(new)
    assert torch.equal(model[0].weight.detach(), t([[0.5, 2.0], [3.0, 3.0]]))

    twice = baselines.task_arithmetic(ori, strong, lam=1.0)
    assert torch.equal(twice["0.weight"], t([[0.0, 2.0], [3.0, 2.0]]))


def test_task_arithmetic_keeps_dtype_and_checks_keys():
    ori = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    strong = {"w": torch.tensor([2.0, 2.0], dtype=torch.bfloat16)}
    new = baselines.task_arithmetic(ori, strong, lam=1.0)
    assert new["w"].dtype == torch.bfloat16 and new["w"].tolist() == [0.0, 2.0]
    with pytest.raises(ValueError):
        baselines.task_arithmetic(ori, {"v": strong["w"]}, lam=1.0)


# ---------------------------------------------------------------- WGA, SatImp, CE-U, PDU
# Scored tokens of LOGITS/LABELS: LP_00 (seq 0, pos 0 -> 2), LP_01 (seq 0, pos 1 -> 0), LP_11 (seq 1, pos 1 -> 1).
SCORED = [(0, 0, 2), (0, 1, 0), (1, 1, 1)]  # (sequence, position, gold token)


def test_answer_token_logprob_lists_the_scored_tokens():
    logits, labels = tensors()
    assert baselines.answer_token_logprob(logits, labels).tolist() == pytest.approx([LP_00, LP_01, LP_11], abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.0])
def test_wga_is_the_probability_weighted_log_likelihood(beta):
    # Catches: the weight's power (p instead of p^beta), the sign (+NLL), a mean per sequence.
    logits, labels = tensors()
    lps = [LP_00, LP_01, LP_11]
    expected = sum(math.exp(lp) ** beta * lp for lp in lps) / 3
    assert baselines.wga_loss(logits, labels, beta).item() == pytest.approx(expected, rel=1e-5)
    if beta == 0.0:  # no weight: GA
        assert baselines.wga_loss(logits, labels, 0.0).item() == pytest.approx(baselines.ga_loss(logits, labels).item())


@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (1.0, 2.0)])
def test_satimp_weights_are_p_to_beta1_times_one_minus_p_to_beta2(beta1, beta2):
    # Catches: the two powers swapped, (1 - p) dropped, the sign.
    logits, labels = tensors()
    lps = [LP_00, LP_01, LP_11]
    expected = sum(math.exp(lp) ** beta1 * (1 - math.exp(lp)) ** beta2 * lp for lp in lps) / 3
    swapped = sum(math.exp(lp) ** beta2 * (1 - math.exp(lp)) ** beta1 * lp for lp in lps) / 3
    assert abs(expected - swapped) > 1e-3
    assert baselines.satimp_loss(logits, labels, beta1, beta2).item() == pytest.approx(expected, rel=1e-5)


def _grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("name", ["wga", "satimp"])
def test_token_weights_are_held_constant_in_the_gradient(name):
    # The gradient must be that of sum_t w_t log p_t / N with w_t numbers (computed here by hand from
    # the logits): catches a weight that is not detached (its own derivative would be added).
    logits, labels = tensors()
    w = []
    for b, t_, y in SCORED:
        p = math.exp(log_softmax(LOGITS[b][t_])[y])
        w.append(p ** 2.0 if name == "wga" else p ** 2.0 * (1 - p) ** 1.5)

    def weighted_nll(x):  # the weights as constants
        lp = torch.stack([torch.log_softmax(x[b, t_], -1)[y] for b, t_, y in SCORED])
        return (torch.tensor(w) * lp).sum() / 3
    loss = {"wga": lambda x: baselines.wga_loss(x, labels, 2.0),
            "satimp": lambda x: baselines.satimp_loss(x, labels, 2.0, 1.5)}[name]
    assert loss(logits).item() == pytest.approx(weighted_nll(logits).item(), rel=1e-5)
    torch.testing.assert_close(_grad(loss, logits), _grad(weighted_nll, logits), rtol=1e-5, atol=1e-7)


def _ce_u_by_hand(row, gold):
    """(loss, gradient wrt the row) of CE(q, p) with q = softmax of the row without the gold token."""
    others = [x for v, x in enumerate(row) if v != gold]
    lse = math.log(sum(math.exp(x) for x in others))
    q = [0.0 if v == gold else math.exp(x - lse) for v, x in enumerate(row)]
    lp = log_softmax(row)
    return -sum(qv * lv for qv, lv in zip(q, lp)), [math.exp(lv) - qv for qv, lv in zip(q, lp)]


@pytest.mark.parametrize("skip", [0, 1])
def test_ce_u_by_hand_with_its_target_held_constant(skip):
    # Catches: the gold logit kept in the target (q = p: loss = entropy), the target not detached
    # (gradient differs from p - q), the first answer token not skipped, the wrong shift.
    logits, labels = tensors()
    kept = SCORED if skip == 0 else [(0, 1, 0)]  # skip 1: each answer's first scored token goes
    parts = [_ce_u_by_hand(LOGITS[b][t_], y) for b, t_, y in kept]
    expected = sum(v for v, _ in parts) / len(kept)
    assert baselines.ce_u_loss(logits, labels, skip).item() == pytest.approx(expected, rel=1e-5)
    want = torch.zeros_like(logits)
    for (b, t_, _), (_, g) in zip(kept, parts):
        want[b, t_] = torch.tensor(g) / len(kept)
    torch.testing.assert_close(_grad(lambda x: baselines.ce_u_loss(x, labels, skip), logits), want,
                               rtol=1e-5, atol=1e-7)


def test_pdu_flattening_loss_by_hand_at_the_positions_that_predict_answers():
    # Catches: max and mean swapped in sign (the square hides a sign, not a swap to min), the square
    # dropped, the unshifted positions of open-unlearning (rows 0,1 of seq 0 -> rows 1,2; seq 1 row 2).
    logits, labels = tensors()

    def margin(row):
        return (max(row) - sum(row) / len(row)) ** 2
    expected = sum(margin(LOGITS[b][t_]) for b, t_, _ in SCORED) / 3
    unshifted = (margin(LOGITS[0][1]) + margin(LOGITS[0][2]) + margin(LOGITS[1][2])) / 3
    assert abs(expected - unshifted) > 1e-2
    assert baselines.pdu_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    flat = torch.zeros_like(logits) + 3.0
    assert baselines.pdu_loss(flat, labels).item() == 0.0


def test_pdu_dual_step_by_hand():
    # Catches: the sign of (retain - eps), the projection onto lam >= 0, the step size ignored.
    assert baselines.pdu_dual_step(100.0, 0.5, 0.3, 5.0) == pytest.approx(101.0)
    assert baselines.pdu_dual_step(100.0, 0.1, 0.3, 5.0) == pytest.approx(99.0)
    assert baselines.pdu_dual_step(0.5, 0.1, 0.3, 5.0) == 0.0
