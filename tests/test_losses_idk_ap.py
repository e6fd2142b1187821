"""Hand-computed checks of the pure functions in idk_ap.py (IDK, AP, DPO), of the IDK
template choice it relies on (common.ForgetRetainDataset.pick), and a guard that the loss
helpers duplicated across method files stay identical.

Expected values are written out with `math` on plain floats, never by calling the code
under test.
"""
import inspect
import math

import pytest
import torch

import baselines
import common
from harness import models
import finetune
import idk_ap
import me_gd
import rkld
import rmu


def log_softmax(row):
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ---------------------------------------------------------------- IDK


def test_idk_loss_is_token_mean_nll_of_the_template():
    rows = [[[0.0, 1.0, 2.0], [1.0, 1.0, -1.0], [0.0, 0.0, 5.0]],
            [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 1.0]]]
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 2]])
    expected = -(log_softmax(rows[0][0])[0] + log_softmax(rows[0][1])[1] + log_softmax(rows[1][1])[2]) / 3
    assert idk_ap.idk_loss(t(rows), labels).item() == pytest.approx(expected, abs=1e-6)
    changed = t(rows)
    changed[1, 0] = t([-5.0, 5.0, 0.0])  # predicts a masked (question) token
    assert idk_ap.idk_loss(changed, labels).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- AP


def test_ap_value():
    logp_idk, logp_ans = t([-8.0, -20.0]), t([-15.0, -10.0])
    # log pi(idk) - log pi(ans) = (7, -10)
    expected = -(1 / 0.1) * (logsigmoid(-0.1 * 7) + logsigmoid(-0.1 * -10)) / 2
    assert idk_ap.ap_loss(logp_idk, logp_ans, beta=0.1).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ap_has_one_over_beta_factor(beta):
    logp = t([-3.0, -7.0])
    assert idk_ap.ap_loss(logp, logp.clone(), beta=beta).item() == pytest.approx(math.log(2) / beta, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ap_gradient_weight_matches_eq9(beta):
    idk_values, ans_values = [-8.0, -20.0, -50.0], [-15.0, -10.0, -5.0]
    logp_idk, logp_ans = t(idk_values, requires_grad=True), t(ans_values, requires_grad=True)
    idk_ap.ap_loss(logp_idk, logp_ans, beta=beta).backward()
    # Eq. 9: grad L = mean W * grad(log p(y'|x) - log p(y|x)),
    # W = 1 / (1 + (p(y|x) / p(y'|x))^beta), y' = IDK template, y = true answer.
    w = [1 / (1 + (math.exp(a) / math.exp(i)) ** beta) for i, a in zip(idk_values, ans_values)]
    assert torch.allclose(logp_idk.grad, t([x / 3 for x in w]), atol=1e-7)
    assert torch.allclose(logp_ans.grad, t([-x / 3 for x in w]), atol=1e-7)
    # W << 1 while p(y) >> p(y') (early unlearning) and grows as p(y') catches up with p(y)
    assert w[2] < w[1] < 0.5 < w[0]


# ---------------------------------------------------------------- DPO (DPO+AP)


def test_dpo_value_and_orientation():
    win_t, lose_t, win_r, lose_r = t([-10.0]), t([-30.0]), t([-12.0]), t([-25.0])
    expected = -(2 / 0.1) * logsigmoid(0.1 * 7)  # margin (20) - (13) = 7
    got = idk_ap.dpo_loss(win_t, lose_t, win_r, lose_r).item()
    assert got == pytest.approx(expected, rel=1e-6)
    swapped = idk_ap.dpo_loss(lose_t, win_t, lose_r, win_r).item()
    assert swapped == pytest.approx(-(2 / 0.1) * logsigmoid(-0.7), rel=1e-6)
    assert swapped > got


def test_kl_retain_direction():
    theta, ref = [4.0, 0.0, -1.0], [0.0, 1.0, 1.0]
    lt, lr = log_softmax(theta), log_softmax(ref)
    forward = sum(math.exp(b) * (b - a) for a, b in zip(lt, lr))  # KL(p_ref || p_theta)
    assert abs(forward - sum(math.exp(a) * (a - b) for a, b in zip(lt, lr))) > 0.5
    got = idk_ap.kl_retain_loss(t([[theta]]), t([[ref]]), torch.tensor([[1]])).item()
    assert got == pytest.approx(forward, abs=1e-5)


# ---------------------------------------------------------------- IDK template choice
# idk_ap.py takes its templates from common.ForgetRetainDataset, which draws them with
# common.item_rng(seed, epoch, index); these tests pin that mechanism down.


def _dataset(tiny_model_dir, seed):
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 1))
    return common.ForgetRetainDataset(forget, retain, tok, fmt, seed=seed, idk=common.load_idk()), tok, fmt


def test_idk_template_is_reproducible_per_seed_epoch_index_and_local(tiny_model_dir):
    a, _, _ = _dataset(tiny_model_dir, 42)
    b, _, _ = _dataset(tiny_model_dir, 42)
    state = torch.random.get_rng_state()
    first = {}
    for e in range(3):
        a.set_epoch(e)
        first[e] = [a.pick(i)[1] for i in range(40)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    torch.manual_seed(123)  # and has no influence
    for e in (2, 0, 1):  # any order of (epoch, index) gives the same choice
        b.set_epoch(e)
        assert [b.pick(i)[1] for i in reversed(range(40))] == first[e][::-1]
    assert len(set(first[0])) >= 20 and first[0] != first[1] != first[2]
    c, _, _ = _dataset(tiny_model_dir, 43)
    assert [c.pick(i)[1] for i in range(40)] != first[0]


def test_item_uses_the_picked_template_for_forget_and_retain(tiny_model_dir):
    ds, tok, fmt = _dataset(tiny_model_dir, 0)
    ds.set_epoch(1)
    for i in (0, 7, 39):
        r, k = ds.pick(i)
        item = ds[i]
        template = common.load_idk()[k]
        want_f = common.encode_qa(tok, fmt, ds.forget[i]["question"], template)["input_ids"]
        want_r = common.encode_qa(tok, fmt, ds.retain[r]["question"], template)["input_ids"]
        assert item["forget_idk"]["input_ids"] == want_f and item["retain_idk"]["input_ids"] == want_r


# ---------------------------------------------------------------- deliberate duplication


@pytest.mark.parametrize("name,modules", [
    ("sequence_logprob", (baselines, me_gd, idk_ap, rkld, rmu)),
    ("nll_loss", (baselines, me_gd, idk_ap, rkld, rmu)),
    ("kl_retain_loss", (baselines, me_gd, idk_ap, rkld)),
    ("dpo_loss", (baselines, idk_ap)),
    ("fit", (baselines, me_gd, idk_ap, rkld, rmu, finetune)),  # the training loop of every stage
    ("strengthen", (baselines, rkld)),                    # task arithmetic and RKLD build the same model
])
def test_duplicated_helpers_stay_identical(name, modules):
    sources = {inspect.getsource(getattr(m, name)) for m in modules}
    assert len(sources) == 1, f"{name} differs between {[m.__name__ for m in modules]}"


# ---------------------------------------------------------------- reduction flags (all four scripts)


@pytest.mark.parametrize("module", [baselines, me_gd, idk_ap, rkld])
def test_reduction_flags_default_to_the_reference_and_reject_unknown_values(module):
    # Catches: a script whose paper default is the clean reduction (the retain weight and ME's
    # alpha would then mean something else than in the references), or a typo accepted silently.
    from transformers import HfArgumentParser
    extra = ["--method", "ga_kl"] if module is baselines else []
    parse = lambda *a: HfArgumentParser(module.Args).parse_args_into_dataclasses([*extra, *a])[0]  # noqa: E731
    assert parse().loss_reduction == "reference" and parse("--loss_reduction", "tokens").loss_reduction == "tokens"
    assert module.PAPER["pad_to"] == 500 and module.QUICK["pad_to"] == 0  # CL/TOFU max_length; quick: dynamic
    with pytest.raises(common.TofuError, match="--loss_reduction must be reference"):
        parse("--loss_reduction", "mean")
    with pytest.raises(common.TofuError, match="--pad_to must be"):
        parse("--pad_to", "-1")
    if module is me_gd:
        assert parse().me_epsilon == 1e-12
        with pytest.raises(common.TofuError, match="--me_epsilon must be"):
            parse("--me_epsilon", "-1")
