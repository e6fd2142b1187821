"""The data path and RKLD's teacher, old against new, in alternating turns in one run.

  tokenize  an epoch of a method's batches (shuffled loader, collate_pairs): every item tokenized again at
            each draw, all four parts (the dataset before rows were tokenized once; PerDraw below) against
            rows tokenized once at start and only the method's parts (common.ForgetRetainDataset with
            the script's batch_parts). Also the new loader with 0, 1 and 2 worker processes.
  rkld      RKLD optimizer steps (forward, backward, AdamW) on the same batches with the teacher live (two
            frozen forwards a micro-batch), from the store's memory-mapped files (rows copied out of the
            files each step), and from the store read into memory (TeacherStore.place); plus the one-time
            cost of the precompute, so the break-even in steps.

Turns alternate (old, new, old, new, ...), so a load on the shared machine falls on both; it prints every
turn, the medians and the ratios. Both sides' batches are checked equal (tokenize) and the losses of the
three teachers agree (rkld).

  python bench/bench_datapath.py tokenize --split forget10 --repeats 5
  python bench/bench_datapath.py rkld --model tiny --steps 8 --repeats 3
  python bench/bench_datapath.py rkld --model smollm2-135m --steps 4 --repeats 3
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import idk_ap  # noqa: E402
import me_gd  # noqa: E402
import rkld  # noqa: E402
from harness import launch, models  # noqa: E402

CPU = SimpleNamespace(device=torch.device("cpu"))


class PerDraw(torch.utils.data.Dataset):
    """The dataset as it was: each draw tokenizes the forget pair, its retain partner and both IDK parts."""

    def __init__(self, new: common.ForgetRetainDataset):
        self.new = new

    def __len__(self):
        return len(self.new)

    def __getitem__(self, i):
        d, f = self.new, self.new.forget[i]
        r_idx, t_idx = d.pick(i)
        enc = lambda q, a: common.encode_qa(d.tok, d.fmt, q, a, d.max_length)  # noqa: E731
        item = {"index": i, "forget": enc(f["question"], f["answer"])}
        if r_idx is not None:
            item["retain"] = enc(d.retain[r_idx]["question"], d.retain[r_idx]["answer"])
        if t_idx is not None:
            item["forget_idk"] = enc(f["question"], d.idk[t_idx])
            if r_idx is not None:
                item["retain_idk"] = enc(d.retain[r_idx]["question"], d.idk[t_idx])
        return item


def epoch(ds, parts, pad_id, workers=0):
    keep = ("index", *parts)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
                                         num_workers=workers, collate_fn=lambda b: common.collate_pairs(
                                             [{k: it[k] for k in keep} for it in b], pad_id))
    t0 = time.perf_counter()
    batches = list(loader)
    return time.perf_counter() - t0, batches


def bench_tokenize(a):
    tok = models.load_tokenizer(models.resolve_model_path(a.model))
    fmt = models.prompt_format(tok, models.resolve_model_path(a.model))
    forget, retain = common.forget_retain_rows(a.split, None if a.subset == "all" else common.quick_authors(a.split))
    idk = common.load_idk()
    methods = {"rkld": rkld.batch_parts(SimpleNamespace(retain_loss="none")),
               "me_gd": me_gd.batch_parts(SimpleNamespace(retain_loss="gd")),
               "idk_ap": idk_ap.batch_parts(SimpleNamespace(retain_loss="ap"))}
    print(f"[bench] {len(forget)} forget rows of {a.split}, {len(retain)} retain rows, {a.model}'s tokenizer, "
          f"batches of 4, {torch.get_num_threads()} thread(s)", flush=True)
    res = {}
    for name, parts in methods.items():
        t0 = time.perf_counter()
        new = common.ForgetRetainDataset(forget, retain, tok, fmt, 512, 0, idk=idk, parts=parts)
        build = time.perf_counter() - t0
        old, times = PerDraw(new), {"per_draw": [], "once": []}
        for r in range(a.repeats):
            for mode, ds in (("per_draw", old), ("once", new))[:: 1 if r % 2 == 0 else -1]:
                s, batches = epoch(ds, parts, tok.pad_token_id)
                times[mode].append(s)
                if mode == "per_draw":
                    want = batches
                else:
                    got = batches
            assert all(torch.equal(g[k][f], w[k][f]) for g, w in zip(got, want) for k in parts
                       for f in ("input_ids", "attention_mask", "labels")), "the two paths gave different batches"
        med = {m: statistics.median(v) for m, v in times.items()}
        res[name] = {**med, "ratio": med["per_draw"] / med["once"], "build": build, "turns": times}
        print(f"[bench] {name} ({', '.join(parts)}): epoch per draw {med['per_draw'] * 1e3:.0f} ms, tokenized once "
              f"{med['once'] * 1e3:.1f} ms ({med['per_draw'] / med['once']:.0f}x); tokenizing at start {build:.2f} s; "
              f"turns {[round(x, 3) for x in times['per_draw']]} / {[round(x, 4) for x in times['once']]}", flush=True)
    new = common.ForgetRetainDataset(forget, retain, tok, fmt, 512, 0, idk=idk, parts=methods["idk_ap"])
    workers = {w: [] for w in (0, 1, 2)}
    for r in range(a.repeats):
        for w in workers:
            workers[w].append(epoch(new, methods["idk_ap"], tok.pad_token_id, w)[0])
    wmed = {w: statistics.median(v) for w, v in workers.items()}
    print("[bench] idk_ap epoch, tokenized once, by loader workers: "
          + ", ".join(f"{w}: {s * 1e3:.1f} ms" for w, s in wmed.items()), flush=True)
    return res, wmed


def bench_rkld(a):
    from accelerate import Accelerator
    work = Path(tempfile.mkdtemp(prefix="bench_datapath_"))
    if a.model == "tiny":  # the tests' 2-layer Llama over SmolLM2's tokenizer (a store as wide as SmolLM2's)
        from throughput import tiny_llama
        path = str(tiny_llama(models.load_tokenizer(models.resolve_model_path("smollm2-135m")), work / "tiny"))
    else:
        path = models.resolve_model_path(a.model)
    tok = models.load_tokenizer(path)
    fmt = models.prompt_format(tok, path)
    forget = common.load_split(a.split)
    ds = common.ForgetRetainDataset(forget, [], tok, fmt, 512, 0, parts=("forget",))
    ori = models.load_model(path, frozen=True)[0]
    strong = models.load_model(path, frozen=True)[0]
    torch.manual_seed(0)
    with torch.no_grad():  # a stand-in for strengthening: the teacher's cost does not depend on its weights
        for p in strong.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher = rkld.Teacher(ori, strong, 8.0)
    acc = Accelerator(cpu=True)
    t0 = time.perf_counter()
    files = rkld.precompute_teacher(teacher, ds, tok.pad_token_id, acc, work / "files.f32", a.batch)
    pre_s = time.perf_counter() - t0
    memory = rkld.precompute_teacher(teacher, ds, tok.pad_token_id, acc, work / "mem.f32", a.batch)
    print(f"[bench] {a.model}: {len(ds)} rows of {a.split}, store {files.nbytes / 2**30:.3f} GiB, read into "
          f"{memory.place(torch.device('cpu'), 1 << 40, 0)}; precompute {pre_s:.1f} s", flush=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0),
                                         collate_fn=lambda b: common.collate_pairs(b, tok.pad_token_id))
    batches = [b for _, b in zip(range(a.steps), iter(loader))]
    args = SimpleNamespace(divergence="rkl", retain_loss="none", retain_weight=1.0)
    frozen = {"live": {"teacher": teacher, "store": None, "ori": ori},
              "files": {"teacher": None, "store": files, "ori": None},
              "memory": {"teacher": None, "store": memory, "ori": None}}
    times, losses = {m: [] for m in frozen}, {m: [] for m in frozen}
    modes = list(frozen)
    for r in range(a.repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            student = models.load_model(path)[0]
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
            t0 = time.perf_counter()
            for b in batches:
                loss = rkld.step_losses(student, b, frozen[mode], args)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[mode].append(loss.item())
            times[mode].append((time.perf_counter() - t0) / len(batches))
            print(f"[bench] turn {r + 1} {mode}: {times[mode][-1]:.3f} s/step", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    diff = max(abs(x - y) for m in ("files", "memory") for x, y in zip(losses[m], losses["live"]))
    saved = med["live"] - med["memory"]
    print(f"\n[bench] rkld {a.model}, {a.split}, batch {a.batch}, {a.steps} steps x {a.repeats} turns, "
          f"{torch.get_num_threads()} thread(s): s/step live {med['live']:.3f}, store files {med['files']:.3f}, "
          f"store in memory {med['memory']:.3f}; live / memory = {med['live'] / med['memory']:.2f}, "
          f"files / memory = {med['files'] / med['memory']:.2f}; precompute {pre_s:.1f} s = "
          f"{pre_s / saved if saved > 0 else float('inf'):.1f} steps' saving; largest loss difference {diff:.1e}")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tokenize", "rkld"])
    p.add_argument("--model", default="smollm2-135m", help="preset, folder, or tiny (the tests' 2-layer Llama, "
                   "SmolLM2's tokenizer)")
    p.add_argument("--split", default="forget10", help="forget split (tokenize: default forget10; rkld: forget01)")
    p.add_argument("--subset", choices=["quick", "all"], default="all", help="retain rows: all or the quick authors")
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch (default 4, the papers')")
    p.add_argument("--steps", type=int, default=4, help="rkld: optimizer steps per turn")
    p.add_argument("--repeats", type=int, default=3, help="turns per side")
    a = p.parse_args(argv)
    if a.what == "rkld" and a.split == "forget10" and "--split" not in (argv or sys.argv):
        a.split = "forget01"
    return bench_tokenize(a) if a.what == "tokenize" else bench_rkld(a)


if __name__ == "__main__":
    common.cli(main)
