"""One plain SGD step of every forget loss on the tiny model moves the forget answer the
right way: log p(forget answer | forget question) goes down, or, for the refusal losses,
log p(IDK template | forget question) goes up. Also: the method scripts' step_losses wire the
retain KL to (retain batch, frozen model), so it is exactly 0 while theta = theta_ref, and
the value of each term that step_losses reports matches a hand computation.

Every test names the bug it catches; each was checked to fail with that bug put in by hand.
The starting model is the tiny random model after a few Adam steps on the forget, retain and
IDK answers, so that forgetting has something to undo; the frozen reference model is a copy
of it (theta = theta_ref at the step, as at step 1 of a run).
"""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import baselines
import common
from harness import models
import idk_ap
import me_gd
import rkld

STEP = 1e-2  # parameter-space length of the SGD step: small enough for the first-order change to
             # decide the sign (the summed log-prob losses have gradients 100x larger than GA's),
             # large enough to see in fp32


@pytest.fixture(scope="module")
def start(tiny_model_dir):
    """(model that learned the batch's answers, batch of 4 forget/retain/IDK pairs, tokenizer)."""
    torch.manual_seed(0)
    model, tok = models.load_model(str(tiny_model_dir), dtype=torch.float32)
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 1))
    ds = common.ForgetRetainDataset(forget[:4], retain, tok, fmt, seed=0, idk=common.load_idk())
    batch = common.collate_pairs([ds[i] for i in range(4)], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = sum(baselines.nll_loss(_logits(model, batch[k]), batch[k]["labels"])
                   for k in ("forget", "retain", "forget_idk"))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, batch


def _logits(model, part):
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits


@torch.no_grad()
def logp(model, part) -> float:
    """Summed answer log-prob over the batch, by common's helper (not the scripts' copies)."""
    return common.answer_logprob_stats(_logits(model, part), part["labels"])[0].sum().item()


def one_step(start, loss_fn):
    """(model after one plain SGD step on loss_fn(model, ref, batch), the frozen reference,
    batch). The learning rate is STEP / |gradient|, so every loss moves the weights equally far."""
    model, batch = start
    model, ref = copy.deepcopy(model), copy.deepcopy(model).eval().requires_grad_(False)
    loss_fn(model, ref, batch).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert norm > 0
    torch.optim.SGD(model.parameters(), lr=STEP / norm).step()
    return model, ref, batch


def moved(start, loss_fn, part):
    """Change of log p(answers of `part`) after one step."""
    model, ref, batch = one_step(start, loss_fn)
    return logp(model, batch[part]) - logp(ref, batch[part])


def ns(**kw):
    return types.SimpleNamespace(**kw)


BASELINE_ARGS = {"ga": ns(), "npo": ns(beta=0.1), "dpo": ns(beta=0.1), "kto": ns(beta=0.1), "idk": ns(),
                 "simnpo": ns(beta=4.5, delta=0.0), "undial": ns(beta=10.0), "wga": ns(beta=1.0),
                 "satimp": ns(beta=5.0, beta2=1.0), "ce_u": ns(ceu_skip_first=1), "pdu": ns()}


# ---------------------------------------------------------------- baselines.py
# Bugs caught (each put in by hand and seen to fail):
#   ga      ga_loss returns +NLL (sign flip)
#   npo     npo_loss's log ratio flipped: logp_theta - logp_ref instead of logp_ref - logp_theta
#   dpo     win and lose swapped at the call site in forget_term (the IDK and forget passes)
#   kto     kto_loss's sigmoid argument z + beta * log_ratio instead of z - beta * log_ratio
#   simnpo  simnpo_loss's sign: logsigmoid(-beta * (...)) (descent would lower the NLL)
#   undial  undial_loss adds +beta to the gold logit of the teacher instead of -beta
#   wga     wga_loss returns -(weight * logp) (sign flip)
#   satimp  satimp_loss returns -(weight * logp) (sign flip)
#   ce_u    ce_u_loss's sign flipped (minus CE, which pulls p_t towards its own gold-free copy's opposite)
#   pdu     pdu_loss's sign flipped (sharpening the margin instead of flattening it)
@pytest.mark.parametrize("name", ["ga", "npo", "dpo", "kto", "simnpo", "undial", "wga", "satimp", "ce_u", "pdu"])
def test_baseline_forget_step_lowers_the_forget_answer(start, name):
    def loss(model, ref, batch):
        return baselines.forget_term(name, model, batch, ref, BASELINE_ARGS[name])
    assert moved(start, loss, "forget") < -1e-3


# Bug caught: the IDK term computed on the forget pair (batch["forget"]) instead of the
# refusal (batch["forget_idk"]): log p(IDK) could still rise with it, but less than the true
# answer's, so the margin log p(IDK) - log p(answer) would fall.
@pytest.mark.parametrize("name", ["idk", "dpo"])
def test_baseline_refusal_step_raises_the_idk_answer_over_the_true_one(start, name):
    def loss(model, ref, batch):
        return baselines.forget_term(name, model, batch, ref, BASELINE_ARGS[name])
    model, ref, batch = one_step(start, loss)
    up_idk = logp(model, batch["forget_idk"]) - logp(ref, batch["forget_idk"])
    up_answer = logp(model, batch["forget"]) - logp(ref, batch["forget"])
    assert up_idk > 1e-3 and up_idk - up_answer > 1e-3


def test_baseline_dpo_value_away_from_the_reference(start):
    # Bugs caught: win and lose swapped at forget_term's call site, or the trained and the
    # frozen model swapped. At theta = theta_ref both give the same value (20 ln 2), so the
    # smoke runs cannot tell; here theta has moved.
    model, batch = start
    ref = copy.deepcopy(model).requires_grad_(False)
    theta = copy.deepcopy(model)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    win = logp_each(theta, batch["forget_idk"]) - logp_each(ref, batch["forget_idk"])
    lose = logp_each(theta, batch["forget"]) - logp_each(ref, batch["forget"])
    margins = (win - lose).tolist()
    assert max(abs(m) for m in margins) > 1.0  # far from theta = theta_ref
    expected = -(2 / 0.1) * sum(-math.log1p(math.exp(-0.1 * m)) for m in margins) / len(margins)
    got = baselines.forget_term("dpo", theta, batch, ref, ns(beta=0.1)).item()
    assert got == pytest.approx(expected, rel=1e-4)


@torch.no_grad()
def logp_each(model, part) -> torch.Tensor:
    return common.answer_logprob_stats(_logits(model, part), part["labels"])[0].double()


# ---------------------------------------------------------------- pdu: the dual variable in step_losses
def test_pdu_step_uses_lam_then_moves_it_by_the_steps_mean_retain_nll(start, monkeypatch):
    # Bugs caught: lam updated before the micro-batch's loss is formed (the first step would use
    # lam_1), updated per micro-batch instead of once per optimizer step, eps or the sign dropped,
    # the warmup ignored.
    from accelerate.state import GradientState
    model, batch = start
    args = ns(method="pdu", forget_weight=1.0, loss_reduction="reference", retain_bound=0.3)
    GradientState()  # accelerate's shared state: sync_gradients marks the last micro-batch of a step

    def last_micro_batch(on):
        monkeypatch.setitem(GradientState._shared_state, "sync_gradients", on)
    last_micro_batch(False)
    dual = baselines.DualVariable(100.0, 0.3, 5.0, warmup_steps=1)
    frozen = {"ref": None, "dual": dual}
    with torch.no_grad():
        r = batch["retain"]
        nll = -logp(model, r) / (r["labels"][:, 1:] != -100).sum().item()
        out = baselines.step_losses(model, batch, frozen, args)          # micro-batch 1 of step 1
        assert out["loss/retain"].item() == pytest.approx(nll, rel=1e-5) and out["pdu/lambda"].item() == 100.0
        assert out["loss"].item() == pytest.approx(out["loss/forget"].item() + 100.0 * (nll - 0.3), rel=1e-5)
        last_micro_batch(True)
        baselines.step_losses(model, batch, frozen, args)                # its last micro-batch: warmup, no move
        assert dual.lam == 100.0 and dual.steps == 1
        last_micro_batch(False)
        baselines.step_losses(model, batch, frozen, args)
        assert dual.lam == 100.0                                          # not inside a step
        last_micro_batch(True)
        out = baselines.step_losses(model, batch, frozen, args)
        assert out["pdu/lambda"].item() == 100.0                         # this step's loss used the old lam
    assert dual.lam == pytest.approx(100.0 + 5.0 * (nll - 0.3), rel=1e-5)


# ---------------------------------------------------------------- rmu.py
# Bugs caught: the forget target -c*u or the sign of the forget term flipped (activations move
# away from c*u); the retain term compared with the trained model's own activations (always 0,
# no pull back) or dropped: with alpha large the retain activations must stay closer to the frozen
# model's than the forget ones, which are pulled to c*u.
def test_rmu_step_moves_forget_activations_to_c_u_and_keeps_retain_ones(start):
    import rmu
    model0, batch = start
    ref = copy.deepcopy(model0).eval().requires_grad_(False)
    f, r = batch["forget"], batch["retain"]
    mf, mr = f["labels"] != -100, r["labels"] != -100
    d = model0.config.hidden_size
    u = torch.rand(d, generator=torch.Generator().manual_seed(0))
    control = 20.0 * u / u.norm()  # c * u by hand

    @torch.no_grad()
    def dist(m, part, mask, target):
        return rmu.activation_mse(rmu.hidden(m, part, 0), target, mask).item()

    def train(alpha):
        model = copy.deepcopy(model0)
        layers = rmu.decoder_layers(model)
        trained = rmu.freeze_all_but(model, layers, [0], ["all"])
        assert trained and all(n.startswith(f"{layers}.0.") for n in trained)
        args = ns(layer=0, retain_loss="activations", forget_weight=1.0, alpha=alpha)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            rmu.step_losses(model, batch, {"ref": ref, "control": control}, args)["loss"].backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            return (dist(model, f, mf, control), dist(model, f, mf, rmu.hidden(ref, f, 0)),
                    dist(model, r, mr, rmu.hidden(ref, r, 0)))
    to_c_u, drift_forget, drift_retain = train(50.0)
    assert to_c_u < dist(ref, f, mf, control) - 1e-3        # forget activations moved towards c * u
    assert drift_retain < drift_forget                        # retain ones stayed nearer the frozen model's
    assert drift_retain < 0.5 * train(0.0)[2]                 # and that is the retain term's doing


def test_rmu_control_vector_is_c_times_a_positive_unit_vector_fixed_by_the_seed():
    import rmu
    # Catches: a negated or unnormalised vector, randn instead of the reference code's rand, a seed ignored.
    v = rmu.control_vector(16, 6.5, seed=3)
    u = torch.rand(16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(v, 6.5 * u / u.norm())
    assert v.norm().item() == pytest.approx(6.5) and (v > 0).all()
    assert not torch.equal(v, rmu.control_vector(16, 6.5, seed=4))


# ---------------------------------------------------------------- me_gd.py
@torch.no_grad()
def answer_entropy(model, part) -> float:
    """Mean entropy of the next-token distribution at the answer positions, by hand."""
    logp_all = F.log_softmax(_logits(model, part)[:, :-1].double(), -1)
    h = -(logp_all.exp() * logp_all).sum(-1)
    return h[part["labels"][:, 1:] != -100].mean().item()


# Bug caught: the ME sign flipped (minimising -KL, i.e. sharpening p): the entropy at the
# forget answer positions would fall. With KL(U || p) (the default) the step also lowers
# log p(answer) on this model, whose answers are memorised (its logit gradient p - U lowers
# every token above the mean). KL(p || U)'s gradient vanishes at confident positions, so its
# effect on log p(answer) is not signed in general; only the entropy is checked there.
@pytest.mark.parametrize("divergence,reduction", [("reference", "reference"), ("reference", "tokens"),
                                                  ("paper", "reference"), ("paper", "tokens")])
def test_me_step_raises_the_entropy_on_the_forget_answer(start, divergence, reduction):
    args = ns(me_divergence=divergence, mask_question=False, loss_reduction=reduction, me_epsilon=1e-12,
              retain_loss="gd", alpha=1.0)

    def loss(model, ref, batch):
        return me_gd.step_losses(model, batch, {"ori": None}, args)["loss/forget"]
    model, ref, batch = one_step(start, loss)
    assert answer_entropy(model, batch["forget"]) - answer_entropy(ref, batch["forget"]) > 1e-4
    if divergence == "reference":
        assert logp(model, batch["forget"]) - logp(ref, batch["forget"]) < -1e-3


# ---------------------------------------------------------------- idk_ap.py
# Bugs caught: idk  the IDK loss on batch["forget"] (the true answer) instead of the refusal;
#              dpo  win and lose swapped at step_losses' call site.
@pytest.mark.parametrize("forget_loss", ["idk", "dpo"])
def test_idk_ap_forget_step_raises_the_idk_answer_over_the_true_one(start, forget_loss):
    args = ns(forget_loss=forget_loss, retain_loss="gd", beta=0.1, loss_reduction="reference")

    def loss(model, ref, batch):
        return idk_ap.step_losses(model, batch, {"ref": ref}, args)["loss/forget"]
    model, ref, batch = one_step(start, loss)
    up_idk = logp(model, batch["forget_idk"]) - logp(ref, batch["forget_idk"])
    up_answer = logp(model, batch["forget"]) - logp(ref, batch["forget"])
    assert up_idk > 1e-3 and up_idk - up_answer > 1e-3


# Bug caught: AP's sign flipped (logsigmoid(+beta * ratio)), or its two inputs swapped at the
# call site, which would teach the refusal on retain questions.
def test_ap_step_lowers_the_idk_answer_on_retain_questions_and_raises_the_true_one(start):
    args = ns(forget_loss="idk", retain_loss="ap", beta=0.1, loss_reduction="reference")

    def loss(model, ref, batch):
        return idk_ap.step_losses(model, batch, {"ref": None}, args)["loss/retain"]
    model, ref, batch = one_step(start, loss)
    down_idk = logp(model, batch["retain_idk"]) - logp(ref, batch["retain_idk"])
    up_answer = logp(model, batch["retain"]) - logp(ref, batch["retain"])
    assert down_idk < -1e-3 and up_answer > 1e-3


# ---------------------------------------------------------------- rkld.py
# Bugs caught: the teacher built as l_ori - alpha * relu(l_ori - l_str) (lowering what the
# strengthened model lowered), or l_ori + alpha * relu(...): both raise the forget answer.
@pytest.mark.parametrize("direction", ["rkl", "fkl"])
def test_rkld_step_lowers_the_forget_answer(start, direction):
    model, batch = start
    strong = copy.deepcopy(model)  # strengthen: more steps on the forget answers
    opt = torch.optim.Adam(strong.parameters(), lr=1e-2)
    for _ in range(10):
        baselines.nll_loss(_logits(strong, batch["forget"]), batch["forget"]["labels"]).backward()
        opt.step()
        opt.zero_grad()
    strong.eval().requires_grad_(False)
    args = ns(divergence=direction, retain_loss="none", retain_weight=1.0, loss_reduction="reference")

    def loss(model, ref, batch):
        frozen = {"teacher": rkld.Teacher(ref, strong, 8.0), "store": None, "ori": ref}
        return rkld.step_losses(model, batch, frozen, args)["loss/forget"]
    assert moved(start, loss, "forget") < -1e-3


# ---------------------------------------------------------------- retain KL at theta = theta_ref
# Bugs caught: the frozen model run on another part than the trained one (e.g. batch["forget"]),
# the two logits shifted differently, or the KL taken between the wrong pair; any of these
# gives a nonzero KL at step 1. The second half (theta moved) catches a KL that is always 0,
# e.g. ref_logits passed for both arguments.
def _kl_cases():
    return [
        ("baselines", lambda m, b, r, red: baselines.step_losses(
            m, b, {"ref": r}, ns(method="ga_kl", forget_weight=1.0, retain_weight=1.0, loss_reduction=red))),
        ("me_gd", lambda m, b, r, red: me_gd.step_losses(
            m, b, {"ori": r}, ns(me_divergence="reference", mask_question=False, loss_reduction=red,
                                 me_epsilon=1e-12, retain_loss="kl", alpha=0.1))),
        ("idk_ap", lambda m, b, r, red: idk_ap.step_losses(
            m, b, {"ref": r}, ns(forget_loss="idk", retain_loss="kl", beta=0.1, loss_reduction=red))),
        ("rkld", lambda m, b, r, red: rkld.step_losses(
            m, b, {"teacher": rkld.Teacher(r, r, 8.0), "store": None, "ori": r},
            ns(divergence="rkl", retain_loss="kl", retain_weight=1.0, loss_reduction=red))),
    ]


@pytest.mark.parametrize("script,step", _kl_cases(), ids=[c[0] for c in _kl_cases()])
@pytest.mark.parametrize("reduction", ["reference", "tokens"])
def test_retain_kl_is_zero_at_the_reference_and_positive_after_a_move(start, script, step, reduction):
    model, batch = start
    theta, ref = copy.deepcopy(model), copy.deepcopy(model).eval().requires_grad_(False)
    assert step(theta, batch, ref, reduction)["loss/retain"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    r = batch["retain"]
    with torch.no_grad():  # KL(p_ref || p_theta) by hand over the chosen positions
        lq, lp = F.log_softmax(_logits(theta, r), -1), F.log_softmax(_logits(ref, r), -1)
        per = (lp.exp() * (lp - lq)).sum(-1)
        mask = r["attention_mask"].bool()
        expected = per.mean().item() if reduction == "reference" else per[mask].mean().item()
    assert expected > 1e-4
    assert step(theta, batch, ref, reduction)["loss/retain"].item() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- reported values, by hand
# These replace bounds that held by construction (ME >= 0, AP > 0) in the smoke runs.
# Bugs caught: step_losses not passing --me_epsilon / --loss_reduction / --me_divergence on
# to me_loss (a default would be used instead), ME computed on the retain batch, AP's inputs
# swapped or computed on the forget question, the weights of the total wrong.
# (eps = 1e-3 makes the epsilon visible on this model, whose probabilities never reach 1e-12.)
@pytest.mark.parametrize("divergence,reduction,eps", [("reference", "reference", 1e-12), ("reference", "tokens", 0.0),
                                                      ("paper", "reference", 0.0), ("reference", "reference", 1e-3)])
def test_me_gd_step_reports_the_me_by_hand(start, divergence, reduction, eps):
    model, batch = start
    f = batch["forget"]
    args = ns(me_divergence=divergence, mask_question=False, loss_reduction=reduction, me_epsilon=eps,
              retain_loss="gd", alpha=0.1)
    with torch.no_grad():
        out = me_gd.step_losses(model, batch, {"ori": None}, args)
        p = F.softmax(_logits(model, f)[:, :-1].double(), -1)
        logp_all = torch.log(p + eps)
        v = p.size(-1)
        per = (-logp_all.mean(-1) - math.log(v)) if divergence == "reference" else ((p * logp_all).sum(-1) + math.log(v))
        m = f["attention_mask"]
        keep = torch.ones_like(per, dtype=torch.bool) if reduction == "reference" else (m[:, :-1] & m[:, 1:]).bool()
        expected = per[keep].mean().item()
        r = batch["retain"]
        nll = -common.answer_logprob_stats(_logits(model, r), r["labels"])[0].sum().item() / (r["labels"] != -100).sum().item()
    assert not f["attention_mask"].bool().all()  # the batch has padding, so the reductions differ
    assert out["loss/forget"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss/retain"].item() == pytest.approx(nll, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.1 * expected + nll, rel=1e-5)


def test_idk_ap_step_reports_ap_by_hand(start):
    model, batch = start
    args = ns(forget_loss="idk", retain_loss="ap", beta=0.1, loss_reduction="reference")
    with torch.no_grad():
        out = idk_ap.step_losses(model, batch, {"ref": None}, args)
    ratio = (logp_each(model, batch["retain_idk"]) - logp_each(model, batch["retain"])).tolist()
    assert max(abs(x) for x in ratio) > 10  # far from 0, where a swap would not show
    expected = -(1 / 0.1) * sum(-math.log1p(math.exp(0.1 * x)) for x in ratio) / len(ratio)  # log sigmoid(-beta x)
    assert out["loss/retain"].item() == pytest.approx(expected, rel=1e-5)
    fi = batch["forget_idk"]
    idk = -logp_each(model, fi).sum().item() / (fi["labels"] != -100).sum().item()
    assert out["loss/forget"].item() == pytest.approx(idk, rel=1e-5)
