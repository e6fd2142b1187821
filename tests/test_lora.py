"""LoRA and memory options (issue 12): the adapter trains and the base does not, with and without
gradient checkpointing; the starting model is the trained model's base with the adapter off; RKLD's
one-base teacher equals the two-model teacher; a merged save is a plain model; every script runs
with LoRA and loads no frozen copy; bad input fails with one sentence."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import common
from harness import flags, launch, models, runlog, scenarios
import rkld

LORA = ["--lora_r", 8, "--lora_alpha", 32]


def lora_args(model, **kw):
    a = dict(model=str(model), lora_r=8, lora_alpha=32.0, lora_dropout=0.0, lora_target_modules="all-linear",
             save_adapter_only=False, gradient_checkpointing=False, ref_precision="match", forward_batch="auto")
    return SimpleNamespace(**{**a, **kw})


def accelerator():
    return launch.make_accelerator(2, 2)[0]


def batch(tok, n=2):
    fmt = models.prompt_format(tok)
    rows = common.load_split("forget01")[:n]
    return common.collate([common.encode_qa(tok, fmt, r["question"], r["answer"], 64) for r in rows],
                          tok.pad_token_id)


def randomize_adapter(model, name=models.TRAINED, seed=0, scale=0.5):
    """Nonzero adapter weights (peft starts lora_B at 0, where adapter on = adapter off)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".lora_B.{name}." in n or f".lora_A.{name}." in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- training: adapter moves, base stays
@pytest.mark.parametrize("checkpointing,reentrant", [(False, False), (True, False), (True, True)])
def test_adapter_trains_and_base_stays(checkpointing, reentrant, monkeypatch, tiny_model_dir, tmp_path):
    # Catches: LoRA not applied (base weights move), checkpointing not switched on, and the users' report:
    # under reentrant checkpointing without enable_input_require_grads the adapter gets no gradient.
    if reentrant:
        monkeypatch.setattr(models, "CHECKPOINT_KWARGS", {"use_reentrant": True})
    args = lora_args(tiny_model_dir, gradient_checkpointing=checkpointing, warmup_epochs=0, max_steps=3,
                     schedule="epochs", last_window="mean", weight_decay=0.0, max_grad_norm=0.0)
    acc = accelerator()
    model = models.load_trained(args, acc)
    assert models.is_peft(model) and model.is_activation_checkpointing == checkpointing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok)
    ds = common.QADataset(common.load_split("forget01")[:12], tok, fmt, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: common.collate(b, tok.pad_token_id))
    log = runlog.RunLogger(tmp_path, {}, {}, True)
    model = rkld.fit(acc, model, loader, lambda m, b: {"loss": m(**b).loss}, args, 1, 1e-2, "t", log)
    after = dict(acc.unwrap_model(model).named_parameters())
    lora = [n for n in before if ".lora_" in n]
    assert lora and all(before[n].shape == after[n].shape for n in before)
    assert all(not torch.equal(before[n], after[n]) for n in lora if ".lora_B." in n)  # every B left 0
    assert all(torch.equal(before[n], after[n]) for n in before if n not in lora)      # the base is frozen
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    launch.release(acc, model)


# ---------------------------------------------------------------- frozen models for free
def test_adapter_off_reference_equals_a_loaded_starting_model(tiny_model_dir):
    # Catches: a reference that runs with the trained adapter on, and a view that leaves the trained
    # model in eval mode or its adapter frozen after the call.
    args, frozen = lora_args(tiny_model_dir), {}
    ref = launch.starting_model(args, accelerator(), frozen)
    model = frozen["model"]
    randomize_adapter(model)
    model.train()
    tok = models.load_tokenizer(str(tiny_model_dir))
    b = batch(tok)
    plain = models.load_model(str(tiny_model_dir), frozen=True)[0]
    with torch.no_grad():
        want = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        model.eval()
        on = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        model.train()
    got = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (on - want).abs().max() > 1e-2                          # the adapter does change the model
    assert model.training and all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    assert ref.config is model.config and not list(ref.parameters())  # a view: it owns no weights


def test_scripts_with_lora_load_no_frozen_copy(monkeypatch, tiny_model_dir, tmp_path):
    # Catches: a script that still loads a second copy of the starting model for its reference.
    import baselines
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(launch, "load_frozen", lambda *a, **k: pytest.fail("a frozen copy was loaded"))
    monkeypatch.setattr("sys.argv", ["baselines.py", *map(str, [
        "--method", "npo_kl", "--model", tiny_model_dir, "--subset", "quick", "--max_steps", 2, "--batch_size", 4,
        "--per_device_batch_size", 2, "--eval", "false", *LORA, "--output_dir", tmp_path])])
    baselines.main()
    assert loads == [str(tiny_model_dir)]
    assert (tmp_path / "model" / "config.json").exists() and not (tmp_path / "model" / models.ADAPTER_CONFIG).exists()


# ---------------------------------------------------------------- RKLD with one base model
def _rkld_setup(tiny_model_dir, tmp_path, *extra):
    from transformers import HfArgumentParser
    args = flags.finalize_args(HfArgumentParser(rkld.Args).parse_args_into_dataclasses(
        [str(a) for a in ["--model", tiny_model_dir, "--subset", "quick", "--batch_size", 2, "--per_device_batch_size",
                          2, "--eval", "false", "--output_dir", tmp_path, *extra]])[0], "rkld", rkld.QUICK, rkld.PAPER)
    acc = launch.make_accelerator(args.batch_size, args.per_device_batch_size)[0]
    tok = models.load_tokenizer(args.model)
    fmt = models.prompt_format(tok, args.model)
    forget, retain = common.forget_retain_rows(args.split, scenarios.subset_authors(args))
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, args.max_length, args.seed)
    return args, acc, tok, fmt, ds


def test_one_base_teacher_equals_the_two_model_teacher(tiny_model_dir, tmp_path):
    # Catches: a strengthened view that runs the trained adapter (or none), an original view with the
    # strengthening adapter on, and a student that is not the base + its own (zero) adapter.
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok)
    acc = accelerator()
    strong = models.load_trained(lora_args(tiny_model_dir), acc)
    randomize_adapter(strong, scale=0.1)
    launch.save_model(acc, strong, tok, fmt, tmp_path / "str_adapter", adapter_only=True)
    launch.save_model(acc, strong, tok, fmt, tmp_path / "str_full")
    args, acc, tok, fmt, ds = _rkld_setup(tiny_model_dir, tmp_path / "run", *LORA, "--strengthened_model",
                                          tmp_path / "str_adapter", "--precompute_teacher", "false")
    frozen = rkld.setup_frozen(args, ds, tok, acc, None)
    student = frozen["model"]
    assert isinstance(frozen["ori"], models.AdapterView) and isinstance(frozen["teacher"].strong, models.AdapterView)
    assert set(student.peft_config) == {models.TRAINED, rkld.STRENGTHENED}
    assert student.active_adapters == [models.TRAINED]
    assert {n.split(".lora_")[1].split(".")[1] for n, p in student.named_parameters() if p.requires_grad} == {"default"}
    ori_full = models.load_model(str(tiny_model_dir), frozen=True)[0]
    str_full = models.load_model(str(tmp_path / "str_full"), frozen=True)[0]
    two = rkld.Teacher(ori_full, str_full, args.alpha)
    b = batch(tok, 4)
    with torch.no_grad():
        want = two(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = frozen["teacher"](input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        student.eval()
        s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - ori_full(input_ids=b["input_ids"]).logits).abs().max() > 0.1  # the teacher is not the original
    torch.testing.assert_close(s, ori_full(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               rtol=0, atol=1e-6)


def test_a_strengthened_adapter_on_another_base_is_loaded_beside_it(tiny_model_dir, tiny_legacy_model_dir, tmp_path):
    # Catches: an adapter trained on another model put on --model's base as if it were its own.
    tok = models.load_tokenizer(str(tiny_legacy_model_dir))
    acc = accelerator()
    other = models.load_trained(lora_args(tiny_legacy_model_dir), acc)
    launch.save_model(acc, other, tok, models.prompt_format(tok), tmp_path / "other", adapter_only=True)
    args, acc, tok, fmt, ds = _rkld_setup(tiny_model_dir, tmp_path / "run", *LORA, "--strengthened_model",
                                          tmp_path / "other", "--precompute_teacher", "false")
    frozen = rkld.setup_frozen(args, ds, tok, acc, None)
    assert not isinstance(frozen["teacher"].strong, models.AdapterView)
    assert set(frozen["model"].peft_config) == {models.TRAINED}


def test_rkld_precomputed_one_base_teacher_drops_the_strengthening_adapter(tiny_model_dir, tmp_path):
    args, acc, tok, fmt, ds = _rkld_setup(tiny_model_dir, tmp_path, *LORA, "--strengthen_epochs", 1,
                                          "--max_steps", 1, "--precompute_teacher", "true")
    frozen = rkld.setup_frozen(args, ds, tok, acc, None)
    assert models.adapter_base(tmp_path / "strengthened") == str(tiny_model_dir)  # strengthening saved an adapter
    assert frozen["teacher"] is None and frozen["ori"] is None and frozen["store"] is not None
    assert set(frozen["model"].peft_config) == {models.TRAINED}


# ---------------------------------------------------------------- saving
def test_merged_save_is_a_plain_model_with_the_adapters_logits(tiny_model_dir, tmp_path):
    # Catches: a merge without lora_alpha / r, a merge of every adapter (RKLD's strengthening one too),
    # and adapter keys left in the plain model's files.
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok)
    acc = accelerator()
    model = models.load_trained(lora_args(tiny_model_dir, lora_target_modules="q_proj,v_proj,down_proj"), acc)
    randomize_adapter(model)
    model.add_adapter("other", models.lora_config(lora_args(tiny_model_dir), model.get_base_model()))
    randomize_adapter(model, "other", seed=1)
    launch.save_model(acc, model, tok, fmt, tmp_path / "merged")
    launch.save_model(acc, model, tok, fmt, tmp_path / "adapter", adapter_only=True)
    assert not (tmp_path / "merged" / models.ADAPTER_CONFIG).exists()
    assert not any(".lora_" in k or "base_layer" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) and not (tmp_path / "adapter" / "other").exists()
    b = batch(tok)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        merged = models.load_model(str(tmp_path / "merged"), frozen=True)[0]
        from_adapter = models.load_model(str(tmp_path / "adapter"), frozen=True)[0]  # the evaluator's path
        assert not models.is_peft(merged) and not models.is_peft(from_adapter)
        for m in (merged, from_adapter):
            torch.testing.assert_close(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, want,
                                       rtol=0, atol=1e-5)
        base = models.load_model(str(tiny_model_dir), frozen=True)[0](input_ids=b["input_ids"]).logits
    assert (want - base).abs().max() > 1e-2


def test_save_adapter_only_run_is_evaluated_from_base_plus_adapter(monkeypatch, tiny_model_dir, tmp_path):
    import me_gd
    monkeypatch.setattr("sys.argv", ["me_gd.py", *map(str, [
        "--model", tiny_model_dir, "--subset", "quick", "--max_steps", 2, "--batch_size", 4, "--per_device_batch_size",
        2, "--lr", 1e-2, "--eval", "false", *LORA, "--save_adapter_only", "--gradient_checkpointing",
        "--output_dir", tmp_path])])
    me_gd.main()
    saved = tmp_path / "model"
    assert (saved / models.ADAPTER_CONFIG).exists() and not (saved / "config.json").exists()
    assert models.prompt_format(models.load_tokenizer(str(saved)), str(saved)).kind == "chat"
    assert models.load_model(str(saved), frozen=True)[0].config.vocab_size > 0


# ---------------------------------------------------------------- bad input
def test_a_target_module_that_matches_nothing_is_refused(tiny_model_dir):
    with pytest.raises(common.TofuError, match="'q_prj' matches no module of the model"):
        models.load_trained(lora_args(tiny_model_dir, lora_target_modules="q_proj,q_prj"))


def test_lora_on_a_model_that_carries_an_adapter_is_refused(tiny_model_dir, tmp_path):
    tok = models.load_tokenizer(str(tiny_model_dir))
    acc = accelerator()
    model = models.load_trained(lora_args(tiny_model_dir), acc)
    launch.save_model(acc, model, tok, models.prompt_format(tok), tmp_path / "a", adapter_only=True)
    with pytest.raises(common.TofuError, match="already carries a LoRA adapter"):
        models.load_trained(lora_args(tmp_path / "a"))
    assert not models.is_peft(models.load_trained(lora_args(tmp_path / "a", lora_r=0)))  # merged, full fine-tuning


def test_save_adapter_only_with_a_backend_that_cannot_save_adapters_is_refused(monkeypatch, tiny_model_dir):
    from accelerate.utils import DistributedType
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config={"zero_optimization": {"stage": 3}})
    fake = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(common.TofuError, match="cannot save an adapter under ZeRO-3"):
        models.load_trained(lora_args(tiny_model_dir, save_adapter_only=True), fake)
    plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    models.check_adapter_save(fake)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type="SHARDED_STATE_DICT")))
    with pytest.raises(common.TofuError, match="cannot save an adapter under FSDP"):
        models.check_adapter_save(fsdp)


@pytest.mark.parametrize("argv,match", [
    (["--save_adapter_only"], "--save_adapter_only needs a LoRA adapter"),
    (["--lora_r", "-1"], "--lora_r must be 0 or more"),
    (["--lora_r", "8", "--lora_dropout", "1"], r"--lora_dropout must be in \[0, 1\)"),
])
def test_lora_flags_are_checked_at_parse_time(argv, match, tiny_model_dir):
    from transformers import HfArgumentParser
    import finetune
    args = HfArgumentParser(rkld.Args).parse_args_into_dataclasses(["--model", str(tiny_model_dir), *argv])[0]
    with pytest.raises(common.TofuError, match=match):
        flags.finalize_args(args, "rkld", rkld.QUICK, rkld.PAPER)
    with pytest.raises(common.TofuError, match=match):
        finetune.resolve(HfArgumentParser(finetune.Args).parse_args_into_dataclasses(argv)[0])


def test_every_script_has_the_lora_flags_with_the_papers_defaults():
    import baselines
    import finetune
    import idk_ap
    import me_gd
    for m in (rkld, baselines, me_gd, idk_ap, finetune):
        fields = {f.name: f for f in __import__("dataclasses").fields(m.Args)}
        assert fields["lora_r"].default == 0 and fields["lora_alpha"].default == 32.0
        assert "App. E.8" in fields["lora_r"].metadata["help"] and "App. E.8" in fields["lora_alpha"].metadata["help"]
        assert {"lora_dropout", "lora_target_modules", "save_adapter_only", "gradient_checkpointing"} <= set(fields)


# ---------------------------------------------------------------- smoke: every script with LoRA
EVAL = ["--max_eval_samples", 2, "--max_new_tokens", 4, "--nli_model", "none", "--cs_model", "none"]


@pytest.mark.parametrize("script,argv", [
    # the live one-base teacher and the KL term, evaluated before and after (a PeftModel's generate) and
    # as the teacher (two views of the student's base, through the cache-free greedy loop)
    ("rkld.py", ["--strengthen_epochs", 1, "--retain_loss", "kl", "--precompute_teacher", "false",
                 "--gradient_checkpointing", "--eval_teacher", *EVAL]),
    ("idk_ap.py", ["--forget_loss", "dpo", "--eval", "false"]),
])
def test_scripts_run_with_lora(script, argv, monkeypatch, tiny_model_dir, tmp_path):
    import runpy
    monkeypatch.setattr("sys.argv", [script, *map(str, [
        "--model", tiny_model_dir, "--retain_model", tiny_model_dir, "--subset", "quick", "--max_steps", 2,
        "--batch_size", 4, "--per_device_batch_size", 2, *LORA, *argv, "--output_dir", tmp_path])])
    runpy.run_path(str(common.REPO / script), run_name="__main__")
    assert (tmp_path / "model" / "config.json").exists()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2
    if script == "rkld.py":
        assert all((tmp_path / "eval" / stage / "summary.json").exists() for stage in ("before", "teacher", "after"))


def test_finetune_with_lora(monkeypatch, tiny_model_dir, tmp_path):
    import finetune
    monkeypatch.setattr("sys.argv", ["finetune.py", *map(str, [
        "--model", tiny_model_dir, "--subset", "quick", "--quick_retain_authors", 1, "--build", "target", "--epochs", 1,
        "--max_steps", 2, "--batch_size", 4, "--per_device_batch_size", 2, "--report_rows", 2, *LORA,
        "--output_root", tmp_path])])
    finetune.main()
    out = models.finetuned_dir(str(tiny_model_dir), "forget01", "quick", "full", 1, tmp_path)
    assert (out / "config.json").exists() and not (out / models.ADAPTER_CONFIG).exists()


# ---------------------------------------------------------------- the GPU path, emulated on CPU
def test_lora_reference_is_exact_at_the_start_under_bf16_with_a_bf16_base(monkeypatch, tmp_path, tiny_model_dir):
    # Catches: a LoRA reference loaded as a copy at another precision than the trained model's bf16 base
    # (an fp32 copy, --ref_precision match: NPO's log-ratio is then off 0 at the first step), and a base
    # left in fp32 under mixed precision (4 bytes a parameter instead of 2).
    import math

    import distributed
    out = tmp_path / "npo_kl"
    distributed.launch("ddp", "baselines.py", "--method", "npo_kl", "--model", tiny_model_dir, "--subset", "quick",
                       "--max_steps", 1, "--batch_size", 4, "--per_device_batch_size", 4, "--pad_to", 0, "--eval",
                       "false", *LORA, "--save_adapter_only", "--output_dir", out, world=1,
                       env={"TOFU_UNLEARN_MIXED_PRECISION": "bf16"})
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert m["loss/forget"] == pytest.approx(20 * math.log(2), abs=1e-6) and m["loss/retain"] == pytest.approx(0, abs=1e-7)
    assert {v.dtype for v in load_file(out / "model" / "adapter_model.safetensors").values()} == {torch.float32}
    monkeypatch.setenv("TOFU_UNLEARN_MIXED_PRECISION", "bf16")
    model = models.load_trained(lora_args(tiny_model_dir))
    dtypes = {("lora" if ".lora_" in n else "base"): p.dtype for n, p in model.named_parameters()}
    assert dtypes == {"base": torch.bfloat16, "lora": torch.float32}


def test_rkld_teacher_views_run_after_the_base_is_placed_as_prepare_places_it(monkeypatch, tiny_model_dir, tmp_path):
    # Catches: RKLD's adapter views (one-base teacher) run by --precompute_teacher on the LoRA base where
    # it was loaded (the CPU) while their inputs are on accelerator.device: every GPU backend failed.
    # On CPU both are the CPU, so the order is what this checks: the base is placed, then the teacher runs.
    args, acc, tok, fmt, ds = _rkld_setup(tiny_model_dir, tmp_path, *LORA, "--strengthen_epochs", 1,
                                          "--max_steps", 1, "--precompute_teacher", "true")
    events, place = [], launch.place_for_views

    def spy_place(model, accelerator, why):
        events.append(("placed", model))
        place(model, accelerator, why)

    def spy_precompute(teacher, *a):
        events.append(("teacher", teacher.ori.model, {p.device for p in teacher.ori.model.parameters()}))
        return SimpleNamespace(place=lambda *a: "memory", nbytes=0)  # a store that setup_frozen places
    monkeypatch.setattr(launch, "place_for_views", spy_place)
    monkeypatch.setattr(rkld, "precompute_teacher", spy_precompute)
    frozen = rkld.setup_frozen(args, ds, tok, acc, None)
    assert [e[0] for e in events] == ["placed", "teacher"]
    assert events[0][1] is events[1][1] is frozen["model"] and events[1][2] == {acc.device}
    prepared = acc.prepare(frozen["model"])
    assert acc.unwrap_model(prepared) is events[1][1]  # prepare keeps the module the views run on


def test_rkld_views_before_training_are_refused_where_the_base_is_sharded_until_prepared(tiny_model_dir):
    from accelerate.utils import DistributedType
    model = models.load_trained(lora_args(tiny_model_dir), accelerator())
    for kind, n in ((DistributedType.FSDP, 2), (DistributedType.DEEPSPEED, 1)):
        fake = type("Acc", (), {"distributed_type": kind, "num_processes": n, "device": torch.device("cpu"),
                                "state": type("S", (), {"deepspeed_plugin": type("P", (), {"zero_stage": 3})})})
        with pytest.raises(common.TofuError, match="--precompute_teacher with --lora_r needs the teacher"):
            launch.place_for_views(model, fake, "--precompute_teacher")
    launch.place_for_views(model, accelerator(), "--precompute_teacher")  # one process, no sharding: placed
