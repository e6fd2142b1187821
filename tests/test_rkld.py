"""rkld.py: teacher formula, RKL vs FKL by hand, precomputed = live teacher, smoke runs."""
import math

import pytest
import torch

from harness import flags, launch, models
import rkld
from evaluation import engine


def test_teacher_lowers_only_increased_logits():
    ori = torch.tensor([[[1.0, 2.0, 3.0, 0.5]]])
    strong = torch.tensor([[[1.5, 2.0, 1.0, 0.75]]])
    # increases: +0.5, 0, -2 (ignored), +0.25  ->  l_tea = ori - 8 * relu(diff)
    assert rkld.teacher_logits(ori, strong, 8.0).tolist() == [[[1.0 - 4.0, 2.0, 3.0, 0.5 - 2.0]]]
    assert rkld.teacher_logits(ori.bfloat16(), strong.bfloat16()).dtype == torch.float32


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_rkl_and_fkl_by_hand_on_an_asymmetric_pair():
    s_logits, t_logits = [3.0, 0.0, -2.0], [0.0, 1.0, 2.0]
    # B=1, T=3: positions 0 and 1 predict labels 1 and 2; only position 1 is an answer token.
    student = torch.tensor([[[5.0, 5.0, 5.0], s_logits, [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, -100, 2]])
    teacher_logp = torch.log_softmax(torch.tensor([t_logits]), -1)
    p_s, p_t = _softmax(s_logits), _softmax(t_logits)
    rkl = rkld.divergence_loss(student, teacher_logp, labels, "rkl").item()
    fkl = rkld.divergence_loss(student, teacher_logp, labels, "fkl").item()
    assert rkl == pytest.approx(_kl(p_s, p_t), abs=1e-6)     # KL(p_theta || p_tea)
    assert fkl == pytest.approx(_kl(p_t, p_s), abs=1e-6)     # KL(p_tea || p_theta)
    assert rkl == pytest.approx(2.11948, abs=1e-4) and fkl == pytest.approx(3.28298, abs=1e-4)
    same = torch.log_softmax(torch.tensor([s_logits]), -1)
    assert rkld.divergence_loss(student, same, labels, "rkl").item() == pytest.approx(0.0, abs=1e-7)
    assert rkld.divergence_loss(student, same, labels, "fkl").item() == pytest.approx(0.0, abs=1e-7)


def test_divergence_averages_over_answer_tokens_of_the_batch():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 3, 4, -100]])
    sel = rkld.answer_positions(labels)
    assert sel.tolist() == [[False, True, True], [True, True, False]]
    teacher = torch.log_softmax(torch.randn(4, 5), -1)
    per = [torch.nn.functional.kl_div(teacher[k], torch.log_softmax(student[:, :-1][sel][k], -1),
                                      log_target=True, reduction="sum").item() for k in range(4)]
    assert rkld.divergence_loss(student, teacher, labels).item() == pytest.approx(sum(per) / 4, abs=1e-6)


def test_divergence_of_a_batch_without_answer_tokens_is_zero_not_nan():
    # Catches: a plain .mean() over zero answer positions (NaN, which stops the run), e.g. a
    # micro-batch whose answers were all truncated away.
    student = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.full((2, 3), -100)
    for direction in ("rkl", "fkl"):
        loss = rkld.divergence_loss(student, torch.empty(0, 4), labels, direction)
        assert loss.item() == 0.0
        loss.backward()  # still part of the graph, with a zero gradient
        assert torch.equal(student.grad, torch.zeros_like(student))


def test_kl_retain_direction_and_padding():
    ref = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    cur = torch.tensor([[[1.0, 0.0], [9.0, -9.0]]])
    mask = torch.tensor([[1, 0]])     # second position is padding
    expected = _kl(_softmax([0.0, 2.0]), _softmax([1.0, 0.0]))   # KL(p_ref || p_theta)
    at_pad = _kl(_softmax([1.0, 1.0]), _softmax([9.0, -9.0]))
    assert rkld.kl_retain_loss(cur, ref, mask, "tokens").item() == pytest.approx(expected, abs=1e-6)
    assert rkld.kl_retain_loss(cur, ref, mask).item() == pytest.approx((expected + at_pad) / 2, abs=1e-5)  # B*T
    assert expected != pytest.approx(_kl(_softmax([1.0, 0.0]), _softmax([0.0, 2.0])))


def test_nll_is_token_mean():
    # Catches: a mean of per-sequence means. With these logits the two reductions differ:
    # seq 0 scores 2 tokens, seq 1 scores 1.
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0] * 4],
                           [[0.0] * 4, [0.0, 0.0, 0.0, -1.0], [0.0] * 4]])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    nll = [-math.log(_softmax([2.0, 0.0, 0.0, 0.0])[1]), -math.log(_softmax([0.0, 0.0, 3.0, 0.0])[2]),
           -math.log(_softmax([0.0, 0.0, 0.0, -1.0])[3])]
    token_mean, mean_of_means = sum(nll) / 3, ((nll[0] + nll[1]) / 2 + nll[2]) / 2
    assert abs(token_mean - mean_of_means) > 0.1
    assert rkld.nll_loss(logits, labels).item() == pytest.approx(token_mean, abs=1e-6)


# ---------------------------------------------------------------- precomputed teacher
def test_precomputed_teacher_gives_the_live_loss(tiny_model_dir, tmp_path):
    import common
    from accelerate import Accelerator
    ori, tok = models.load_model(str(tiny_model_dir), frozen=True)
    strong, _ = models.load_model(str(tiny_model_dir), frozen=True)
    with torch.no_grad():
        for p in strong.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 1))
    ds = common.ForgetRetainDataset(forget[:6], retain, tok, fmt, seed=0)
    teacher = rkld.Teacher(ori, strong, 8.0)
    store = rkld.precompute_teacher(teacher, ds, tok.pad_token_id, Accelerator(cpu=True), tmp_path / "t.f32", 4)
    batch = common.collate_pairs([ds[i] for i in (4, 1, 5)], tok.pad_token_id)   # padded, shuffled
    args = type("A", (), {"divergence": "rkl", "retain_loss": "none", "retain_weight": 1.0})
    student = models.load_model(str(tiny_model_dir))[0]
    live = rkld.step_losses(student, batch, {"teacher": teacher, "store": None, "ori": ori}, args)["loss"]
    pre = rkld.step_losses(student, batch, {"teacher": None, "store": store, "ori": None}, args)["loss"]
    assert live.item() > 0.01
    assert pre.item() == pytest.approx(live.item(), abs=1e-5)
    # Catches: rows read from memory by the wrong index or offset, or a store that drops rows when placed.
    from_files = [store[i] for i in range(len(ds))]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device, budgets, where in [(d, (1 << 40, 0), ("the device" if d.type == "cuda" else "memory")) for d in devices] \
            + [(torch.device("cuda"), (0, 1 << 40), "pinned host memory")] * torch.cuda.is_available():
        placed = rkld.precompute_teacher(teacher, ds, tok.pad_token_id, Accelerator(cpu=True), tmp_path / "p.f32", 4)
        assert placed.place(device, *budgets) == where
        assert all(torch.equal(placed[i].cpu(), from_files[i]) for i in range(len(ds)))
        assert placed[4].device.type == device.type
        on = rkld.step_losses(student.to(device), {k: ({f: t.to(device) for f, t in v.items()} if isinstance(v, dict)
                                                       else v) for k, v in batch.items()},
                              {"teacher": None, "store": placed, "ori": None}, args)["loss"]
        assert on.item() == pytest.approx(live.item(), abs=1e-5)
        student.cpu()
    assert store.place(torch.device("cpu"), 0, 0) == "memory-mapped files" and store.tensors is None


def test_teacher_is_precomputed_by_default_whenever_its_store_fits(monkeypatch, capsys):
    # Catches: a default that stays off for real models (two frozen forwards every micro-batch although
    # the store fits), one that ignores the size, an explicit choice overridden, and a missing size line.
    from types import SimpleNamespace
    acc = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)
    counts, vocab = [1000, 2000, 4000], 32000  # 7,000 tokens x 32,000 x 4 bytes = 0.83 GiB
    for budgets, asked, want in [((1 << 30, 1 << 30), None, True), ((1 << 20, 1 << 30), None, True),
                                 ((1 << 20, 1 << 20), None, False), ((1 << 40, 1 << 40), False, False),
                                 ((1 << 20, 1 << 20), True, True)]:
        monkeypatch.setattr(rkld, "store_budgets", lambda device, b=budgets: b)
        assert rkld.decide_precompute(asked, counts, vocab, acc) is want
        line = capsys.readouterr().out
        assert "teacher store: 7,000 answer tokens x 32,000 x 4 bytes = 0.83 GiB" in line
        assert ("precomputed" if want else "live teacher") in line
    assert "precompute_teacher" not in rkld.PAPER and "precompute_teacher" not in rkld.QUICK


def test_teacher_generate_with_kv_caches_matches_decoding_without(tiny_model_dir):
    """Teacher.generate (both models' KV caches, left padding) gives the tokens of the cache-free loop
    (whole sequence rerun every token, right padding) on prompts of different lengths; red with one
    model's cache dropped. (RoPE makes a constant position shift harmless, so left-padded positions
    starting at the pad count would pass here; they start at 0 as HF's generate does.)"""
    ori, tok = models.load_model(str(tiny_model_dir), frozen=True)
    strong, _ = models.load_model(str(tiny_model_dir), frozen=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in strong.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = rkld.Teacher(ori, strong, 8.0)
    prompts = [[5, 9, 13, 2, 7, 11, 3], [4, 8], [6, 10, 12, 14]]
    eos = {int(tok.eos_token_id)}
    want = engine.greedy_loop(teacher, prompts, tok.pad_token_id, eos, 12, "cpu")
    got = engine.greedy_generate(teacher, prompts, tok.pad_token_id, eos, 12, 8, "cpu", False)
    assert sum(map(len, want)) > 12  # the rows generate (not an immediate EOS)
    assert got == want


# ---------------------------------------------------------------- smoke runs of the script
def run_rkld(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["rkld.py", *map(str, argv)])
    rkld.main()


@pytest.fixture(scope="module")
def strengthened(tiny_model_dir, tmp_path_factory):
    """One full run (with evaluation) whose strengthened model the other smoke runs reuse."""
    out = tmp_path_factory.mktemp("rkld_none")
    mp = pytest.MonkeyPatch()
    run_rkld(mp, "--model", tiny_model_dir, "--retain_model", tiny_model_dir, "--subset", "quick", "--max_steps", 2,
             "--batch_size", 4, "--per_device_batch_size", 2, "--strengthen_epochs", 1, "--max_eval_samples", 2,
             "--max_new_tokens", 3, "--nli_model", "none", "--cs_model", "none", "--output_dir", out)
    mp.undo()
    return out


def test_smoke_default_run_writes_model_logs_and_eval(strengthened, hand_forget_quality):
    import json
    assert (strengthened / "model" / "config.json").exists()
    assert (strengthened / "strengthened" / "config.json").exists()
    metrics = [json.loads(x) for x in (strengthened / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("loss/forget" in m for m in metrics)
    derived = json.loads((strengthened / "args.json").read_text())["derived"]
    assert derived["grad_accum"] == 2 and derived["total_steps"] == 2 and derived["forget_rows"] == 40
    after = json.loads((strengthened / "eval" / "after" / "summary.json").read_text())
    assert after["n_forget"] == 40  # quick path: the whole forget split
    # forget quality by hand. The retain model is the starting model, so "before" compares a
    # model with itself (p = 1; the retain model's forget pass is batched differently, so a
    # truth ratio may differ in the last float bits: KS statistic <= 1/40). "after" is
    # recomputed from the logs, with "before" standing in for the retain model. Catches an FQ
    # from the wrong logs or columns, which the old bound 0 <= FQ <= 1 could not.
    before = json.loads((strengthened / "eval" / "before" / "summary.json").read_text())
    assert before["ks_statistic"] <= 1 / 40 and before["forget_quality"] == pytest.approx(1.0, abs=1e-12)
    fq, tr_after, tr_before = hand_forget_quality(strengthened / "eval" / "after", strengthened / "eval" / "before")
    assert tr_after != tr_before and after["forget_quality"] == pytest.approx(fq, rel=1e-9)
    assert (strengthened / "eval" / "before" / "eval_log_forget.json").exists()


@pytest.mark.parametrize("extra,keys", [(["--retain_loss", "rt"], {"loss/retain"}),
                                        (["--retain_loss", "kl", "--precompute_teacher"], {"loss/retain"}),
                                        (["--divergence", "fkl"], set())])
def test_smoke_variants(monkeypatch, tmp_path, tiny_model_dir, strengthened, extra, keys, capsys):
    import json
    run_rkld(monkeypatch, "--model", tiny_model_dir, "--subset", "quick", "--max_steps", 2, "--batch_size", 2,
             "--per_device_batch_size", 2, "--eval", "false", "--strengthened_model", strengthened / "strengthened",
             "--output_dir", tmp_path, *extra)
    out = capsys.readouterr().out  # the store's size, and where its rows are read from (a real model's default: on)
    assert "answer tokens x" in out and "teacher store:" in out and "read from memory" in out
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and keys <= set(metrics[0]) and all(m["loss"] == m["loss"] for m in metrics)
    assert (tmp_path / "model" / "config.json").exists()


def test_bad_inputs(monkeypatch, tmp_path, tiny_model_dir, strengthened):
    import common
    from transformers import LlamaConfig, LlamaForCausalLM
    base = ["--model", tiny_model_dir, "--subset", "quick", "--max_steps", 1, "--batch_size", 2,
            "--per_device_batch_size", 2, "--eval", "false", "--output_dir", tmp_path / "run"]
    other = tmp_path / "other_vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=401, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    models.load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    with pytest.raises(common.TofuError, match="vocabulary .401. differs"):
        run_rkld(monkeypatch, *base, "--strengthened_model", other)
    with pytest.raises(common.TofuError, match="needs retain rows"):
        run_rkld(monkeypatch, *base, "--strengthened_model", strengthened / "strengthened", "--retain_loss", "rt",
                 "--quick_retain_authors", 0)
    monkeypatch.setattr(rkld, "step_losses", lambda *a: {"loss": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(common.TofuError, match="loss is nan at step 1"):
        run_rkld(monkeypatch, *base, "--strengthened_model", strengthened / "strengthened")
    assert not (tmp_path / "run" / "model").exists()


def test_eval_every_epoch_and_teacher_rows(monkeypatch, tmp_path, tiny_model_dir, strengthened):
    """Two epochs of two steps: an evaluation after epoch 1, of the teacher, and before/after."""
    run_rkld(monkeypatch, "--model", tiny_model_dir, "--retain_model", tiny_model_dir, "--subset", "quick",
             "--epochs", 2, "--batch_size", 20, "--per_device_batch_size", 20, "--eval_every_epoch", "--peak_epoch", "false",
             "--eval_teacher", "--strengthened_model", strengthened / "strengthened", "--max_eval_samples", 2,
             "--max_new_tokens", 2, "--nli_model", "none", "--cs_model", "none", "--output_dir", tmp_path)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["after", "before", "epoch1", "teacher"]
    import json
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "eval" / "epoch1" / "summary.json").read_text())["n_forget"] == 40


def test_alpha_and_strengthening_numbers_are_checked_at_parse_time():
    """Catches --alpha -1 (a teacher that amplifies what strengthening raised) or 0 (the teacher is the
    original model) reaching training, and a non-positive --strengthen_lr training nothing."""
    from transformers import HfArgumentParser
    import common
    parse = lambda *a: HfArgumentParser(rkld.Args).parse_args_into_dataclasses(list(map(str, a)))[0]  # noqa: E731
    for alpha in (-1, 0):
        with pytest.raises(common.TofuError, match=f"--alpha must be positive .*, not {float(alpha)}"):
            parse("--alpha", alpha)
    with pytest.raises(common.TofuError, match="--strengthen_lr must be positive, not 0.0"):
        parse("--strengthen_lr", 0)
    with pytest.raises(common.TofuError, match="--strengthen_epochs must be 0 or more, not -1"):
        parse("--strengthen_epochs", -1)
    assert parse("--alpha", 0.5).alpha == 0.5


def test_a_finished_run_is_kept_unless_overwrite(monkeypatch, tmp_path, tiny_model_dir, strengthened):
    """A second rkld.py with another --divergence into a finished run's folder stops before loading a model;
    --overwrite replaces it, and --system_prompt none reaches the run's prompt format (main() passes it).
    Catches the old silent overwrite, and a --system_prompt flag that main() dropped."""
    import json
    import shutil
    import common
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(strengthened / "model", run / "model")
    shutil.copy(strengthened / "args.json", run / "args.json")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    argv = ["--model", tiny_model_dir, "--subset", "quick", "--max_steps", 1, "--batch_size", 2,
             "--per_device_batch_size", 2, "--eval", "false", "--strengthened_model", strengthened / "strengthened",
             "--divergence", "fkl", "--system_prompt", "none", "--output_dir", run]
    with pytest.raises(common.TofuError, match="holds a finished run made with other arguments .*--divergence rkl "
                                               "there, fkl now.*pass --overwrite"):
        run_rkld(monkeypatch, *argv)
    monkeypatch.undo()
    run_rkld(monkeypatch, *argv, "--overwrite")
    saved = json.loads((run / "args.json").read_text())
    assert saved["args"]["divergence"] == "fkl" and saved["derived"]["prompt_format"]["system_prompt"] is None
    assert json.loads((run / "model" / common.FORMAT_FILE).read_text()) == {"kind": "chat", "system_prompt": None}


def test_strengthened_model_is_reused_only_with_the_same_settings(tiny_model_dir, tmp_path, capsys):
    """The strengthened model in the run folder is keyed on the settings it was built with: the same
    settings reuse it, another --strengthen_lr (or model, epochs, seed, split, max_length ...) rebuilds it.
    Catches the old behaviour: any strengthened/ folder reused whatever the flags."""
    import json
    from transformers import HfArgumentParser

    def strengthen(*extra):
        args = flags.finalize_args(HfArgumentParser(rkld.Args).parse_args_into_dataclasses([str(a) for a in [
            "--model", tiny_model_dir, "--subset", "quick", "--strengthen_epochs", 1, "--max_steps", 1,
            "--batch_size", 4, "--per_device_batch_size", 4, "--eval", "false", "--output_dir", tmp_path, *extra]])[0],
            "rkld", rkld.QUICK, rkld.PAPER)
        accelerator, _ = launch.make_accelerator(args.batch_size, args.per_device_batch_size)
        tok = models.load_tokenizer(args.model)
        path = rkld.strengthen(args, tok, models.prompt_format(tok, args.model), accelerator)
        return json.loads((tmp_path / "strengthened" / "strengthen.json").read_text()), capsys.readouterr().out, path

    first, _, path = strengthen("--strengthen_lr", 1e-3)
    stamp = (tmp_path / "strengthened" / "model.safetensors").stat().st_mtime_ns
    again, out, _ = strengthen("--strengthen_lr", 1e-3)
    assert again == first and "reusing the strengthened model" in out
    assert (tmp_path / "strengthened" / "model.safetensors").stat().st_mtime_ns == stamp
    other, out, _ = strengthen("--strengthen_lr", 2e-3)
    assert other["lr"] == 2e-3 and "built with other settings" in out and "rebuilding" in out
    assert (tmp_path / "strengthened" / "model.safetensors").stat().st_mtime_ns != stamp


class _EngineLike(torch.nn.Module):
    """Shaped like a DeepSpeed engine (place_frozen under ZeRO-3): the model under .module, and a
    .config that is the DeepSpeed config dict, not the model's."""

    def __init__(self, model):
        super().__init__()
        self.module, self.config, self.device = model, {"train_micro_batch_size_per_gpu": 1}, model.device

    def forward(self, **kw):
        return self.module(**kw)


def test_teacher_over_engine_like_models_reads_the_modules_config(tiny_model_dir, tmp_path):
    # Catches: teacher.config.vocab_size read from a ZeRO-3 engine (its DeepSpeed config dict), which
    # crashed --precompute_teacher after strengthening had already run.
    import common
    from accelerate import Accelerator
    ori, tok = models.load_model(str(tiny_model_dir), frozen=True)
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 1))
    ds = common.ForgetRetainDataset(forget[:3], retain, tok, fmt, seed=0)
    teacher = rkld.Teacher(_EngineLike(ori), _EngineLike(ori), 8.0)
    assert teacher.config.vocab_size == ori.config.vocab_size
    assert launch.unwrapped(teacher.ori) is ori
    store = rkld.precompute_teacher(teacher, ds, tok.pad_token_id, Accelerator(cpu=True), tmp_path / "t.f32", 2)
    assert store[0].shape[-1] == ori.config.vocab_size


def test_teacher_store_gives_each_rank_its_own_file_and_checks_what_is_read_back(tmp_path):
    # Catches: ranks writing neighbouring rows of one shared file (pages shared across nodes), and a
    # store that trains on rows the file system lost (zeros) without noticing.
    import numpy as np
    from common import TofuError
    counts, vocab, world = [3, 1, 2, 4, 2], 5, 2
    rows = [torch.log_softmax(torch.randn(n, vocab), -1) for n in counts]
    sums = {}
    for rank in range(world):  # each rank creates and writes its own file, as precompute_teacher does
        rkld.TeacherStore(tmp_path / "t", counts, vocab, world, "w+", rank).flush()
        w = rkld.TeacherStore(tmp_path / "t", counts, vocab, world, "r+", rank)
        for i in range(rank, len(counts), world):
            sums[i] = w.write(i, rows[i])
        w.flush()
        assert list(w.mm) == [rank]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.rank0-of-2.f32", "t.rank1-of-2.f32"]
    assert (tmp_path / files[0]).stat().st_size == (3 + 2 + 2) * vocab * 4  # rows 0, 2, 4 only
    store = rkld.TeacherStore(tmp_path / "t", counts, vocab, world, "r", owner=True)
    store.verify(sums)
    for i, r in enumerate(rows):
        torch.testing.assert_close(store[i], r)
    lost = np.memmap(tmp_path / files[1], np.float32, "r+", shape=(5, vocab))
    lost[1:5] = 0  # row 3 (rank 1's second row) lost
    lost.flush()
    with pytest.raises(TofuError, match="row 3 in .*t.rank1-of-2.f32"):
        store.verify(sums)
    del store, lost
    import gc
    gc.collect()
    assert not list(tmp_path.iterdir())  # the owner's files are removed with its store
