"""The data path: rows tokenized once give the batches that tokenizing every item at each draw gave.

`per_draw_item` is the dataset as it was before rows were tokenized once: every draw encodes its four
parts with common.encode_qa and draws its retain partner and template from common.item_rng itself.
The loader's batches (common.ForgetRetainDataset through launch.make_loader and collate_pairs) must
equal that path's exactly, for every prompt format, every method's parts, two epochs, with truncation.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import common  # noqa: E402
import idk_ap  # noqa: E402
import me_gd  # noqa: E402
import rkld  # noqa: E402
import rmu  # noqa: E402
from harness import launch, models  # noqa: E402


def per_draw_item(forget, retain, idk, tok, fmt, max_length, seed, epoch, i):
    g = common.item_rng(seed, epoch, i)
    r = int(torch.randint(len(retain), (1,), generator=g)) if retain else None
    t = int(torch.randint(len(idk), (1,), generator=g)) if idk else None
    def enc(q, a):  # encode_qa as it was: prompt and answer tokenized together at every draw
        prompt = tok(fmt.prompt(tok, q), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        ids = tok(fmt.prompt(tok, q) + fmt.answer_text(a), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        assert ids[:len(prompt)] == prompt
        ids = (ids + [tok.eos_token_id])[:max_length]
        return {"input_ids": ids, "labels": [-100] * min(len(prompt), len(ids)) + ids[len(prompt):]}
    item = {"index": i, "forget": enc(forget[i]["question"], forget[i]["answer"])}
    if r is not None:
        item["retain"] = enc(retain[r]["question"], retain[r]["answer"])
    if t is not None:
        item["forget_idk"] = enc(forget[i]["question"], idk[t])
        if r is not None:
            item["retain_idk"] = enc(retain[r]["question"], idk[t])
    return item


def method_parts():
    """Every distinct batch_parts() of the method scripts, over the flags that change it."""
    ns = lambda **kw: SimpleNamespace(**kw)  # noqa: E731
    parts = {rkld.batch_parts(ns(retain_loss=r)) for r in ("none", "rt", "kl")}
    parts |= {idk_ap.batch_parts(ns(retain_loss=r)) for r in ("ap", "gd", "kl")}
    parts |= {me_gd.batch_parts(ns(retain_loss="gd")), rmu.batch_parts(ns())}
    parts |= {baselines.batch_parts(ns(method=m)) for m in baselines.METHODS}
    return sorted(parts)


def check_batches(tok, fmt, forget, retain, idk, parts, max_length=512, pad_to=0, padded=()):
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, max_length, seed=3, idk=idk, parts=parts)
    loader = launch.make_loader(ds, 4, 3, SimpleNamespace(device=torch.device("cpu")),
                                lambda b: common.collate_pairs(b, tok.pad_token_id, pad_to, padded))
    want_keys = {"index", *(p for p in parts if (retain or "retain" not in p) and (idk or "idk" not in p))}
    seen = 0
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for batch in loader:
            assert set(batch) == want_keys
            items = [per_draw_item(forget, retain, idk, tok, fmt, max_length, 3, epoch, int(i))
                     for i in batch["index"]]
            want = common.collate_pairs([{k: it[k] for k in want_keys} for it in items], tok.pad_token_id,
                                        pad_to, padded)
            for k in want_keys - {"index"}:
                for field in ("input_ids", "attention_mask", "labels"):
                    assert torch.equal(batch[k][field], want[k][field]), (epoch, k, field)
            seen += len(batch["index"])
    assert seen == 2 * len(forget)
    return ds


@pytest.fixture(scope="module")
def rows():
    forget, retain = common.forget_retain_rows("forget01", common.quick_authors("forget01", 1))
    return forget[:12], retain


@pytest.mark.parametrize("kind", ["chat", "llama2", "phi"])
def test_batches_equal_per_draw_tokenization_for_every_format_and_method(kind, rows, tiny_model_dir,
                                                                       tiny_legacy_model_dir):
    # Catches: an IDK template or retain partner fixed at the first epoch, labels shifted or unmasked
    # on the prompt, a template's tokens that depend on the question, a part a method reads left out.
    path = str(tiny_model_dir if kind == "chat" else tiny_legacy_model_dir)
    tok = models.load_tokenizer(path)
    fmt = common.PromptFormat(kind)
    forget, retain = rows
    idk = common.load_idk()
    for parts in method_parts():
        check_batches(tok, fmt, forget, retain, idk, parts)
    # truncation cuts some IDK and answer items (no EOS then); padding to pad_to on the padded parts
    ds = check_batches(tok, fmt, forget, retain, idk, common.PAIR_PARTS, max_length=120, pad_to=130,
                       padded=("retain", "forget"))
    assert ds.n_truncated > 0 and ds.idk_ids is not None  # the tokenize-once path, not the fallback


def test_batches_without_retain_rows_or_templates(rows, tiny_model_dir):
    # Catches: a dataset that needs retain rows or templates (custom forget data has neither).
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = rows
    check_batches(tok, fmt, forget, [], None, common.PAIR_PARTS)
    check_batches(tok, fmt, forget, retain, None, common.PAIR_PARTS)
    check_batches(tok, fmt, forget, [], common.load_idk(), common.PAIR_PARTS)


def test_template_tokens_cover_every_question(rows, tiny_legacy_model_dir):
    """The template tokens measured after two probe questions are those after every question, for all
    100 templates; and a tokenizer where they depend on the question falls back to encode_qa."""
    tok = models.load_tokenizer(str(tiny_legacy_model_dir))
    fmt = common.PromptFormat("llama2")
    forget, retain = rows
    idk = common.load_idk()
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, idk=idk)
    for i in range(len(forget)):
        for t in range(len(idk)):
            assert ds._idk("forget", i, t) == common.encode_qa(tok, fmt, forget[i]["question"], idk[t])

    real = common.answer_ids

    def contextual(tok_, fmt_, prompt_ids, question, answer):  # a tokenizer whose answer tokens see the question
        return real(tok_, fmt_, prompt_ids, question, answer) + [len(question) % 7]
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "answer_ids", contextual)
    fb = common.ForgetRetainDataset(forget, retain, tok, fmt, idk=idk)
    mp.undo()
    assert fb._idk("retain", 2, 5) == common.encode_qa(tok, fmt, retain[2]["question"], idk[5])
    assert fb.idk_ids is None


def test_only_the_methods_parts_are_tokenized(rows, tiny_model_dir):
    # Catches: RKLD and ME+GD items still carrying (and tokenizing) the IDK parts they never read.
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    forget, retain = rows
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, idk=common.load_idk(),
                                    parts=me_gd.batch_parts(SimpleNamespace(retain_loss="gd")))
    assert set(ds[0]) == {"index", "forget", "retain"} and ds.idk_ids is None
    assert set(ds.items) == {"forget", "retain"}
    ds = common.ForgetRetainDataset(forget, retain, tok, fmt, idk=common.load_idk(),
                                    parts=rkld.batch_parts(SimpleNamespace(retain_loss="none")))
    assert set(ds[0]) == {"index", "forget"} and set(ds.items) == {"forget"}
    with pytest.raises(ValueError):
        common.ForgetRetainDataset(forget, retain, tok, fmt, parts=("retain",))


def test_loader_pins_memory_on_cuda_only(rows, tiny_model_dir):
    # Catches: pageable batches on CUDA (non-blocking copies then block), or pinning asked on CPU.
    tok = models.load_tokenizer(str(tiny_model_dir))
    ds = common.QADataset(rows[0], tok, models.prompt_format(tok, str(tiny_model_dir)))
    collate = lambda b: common.collate(b, tok.pad_token_id)  # noqa: E731
    assert not launch.make_loader(ds, 4, 0, SimpleNamespace(device=torch.device("cpu")), collate).pin_memory
    assert launch.make_loader(ds, 4, 0, SimpleNamespace(device=torch.device("cuda", 0)), collate).pin_memory
    acc = launch.make_accelerator(4, 4)[0]  # copies to a GPU do not block; on CPU there is no copy
    assert acc.dataloader_config.non_blocking == torch.cuda.is_available()
    assert launch.LOADER_WORKERS == 0  # workers cost more than they save here (bench/bench_datapath.py)


def test_forget_rows_stay_on_the_host_through_the_prepared_loader(rows, tiny_model_dir):
    # Catches: batch["index"] collated as a tensor, which accelerate moves to the device, so that RKLD's
    # store lookup (one row per index) syncs the GPU once per row; on CPU the decision is what we can see.
    tok = models.load_tokenizer(str(tiny_model_dir))
    fmt = models.prompt_format(tok, str(tiny_model_dir))
    ds = common.ForgetRetainDataset(*rows, tok, fmt, parts=rkld.batch_parts(SimpleNamespace(retain_loss="gd")))
    acc = launch.make_accelerator(4, 4)[0]
    loader = acc.prepare(launch.make_loader(ds, 4, 0, acc, lambda b: common.collate_pairs(b, tok.pad_token_id)))
    batch = next(iter(loader))
    assert isinstance(batch["index"], list) and all(type(i) is int for i in batch["index"])
    assert isinstance(batch["forget"]["input_ids"], torch.Tensor)
