"""The repo's shape (STYLE.md): each method's loss block runs pasted into a project that has only
torch; no import circles among the repo's modules; no private helper used from another file."""
import ast
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
METHOD_SCRIPTS = ("rkld.py", "me_gd.py", "idk_ap.py", "baselines.py", "rmu.py")
BANNER = r"#\s*=+\s*\n"
LOSS_BLOCK = re.compile(BANNER + r"#\s*METHOD LOGIC.*?\n" + BANNER + r"(.*?)\n" + BANNER, re.S)


def loss_block(script: str) -> str:
    """The text between a method script's METHOD LOGIC banner and the next banner."""
    m = LOSS_BLOCK.search((REPO / script).read_text())
    assert m, f"{script} has no METHOD LOGIC block between banners"
    return m.group(1)


def pasted(block: str) -> dict:
    """The block executed in a fresh namespace that has only torch, math and torch.nn.functional,
    as it would be after pasting it into another project."""
    ns = {"__name__": "pasted", "__builtins__": __builtins__, "torch": torch, "math": math, "F": F}
    exec(compile("from __future__ import annotations\n" + block, "<loss block>", "exec"), ns)
    return ns


B, T, V = 2, 6, 11


def argument(name: str):
    """A small, valid value for a loss argument, chosen by its name (the blocks name them consistently)."""
    g = torch.Generator().manual_seed(len(name))
    if name.endswith("logits"):
        return torch.randn(B, T, V, generator=g)
    if name == "teacher_logp":  # a log-distribution at each of the N answer positions of `labels`
        n = int((argument("labels")[:, 1:] != -100).sum())
        return F.log_softmax(torch.randn(n, V, generator=g), dim=-1)
    if name == "labels":
        labels = torch.randint(V, (B, T), generator=g)
        labels[:, :2] = -100  # the prompt
        labels[1, -1] = -100  # padding
        return labels
    if name == "attention_mask":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, -1] = 0
        return mask
    if name.startswith("logp_"):
        return -torch.rand(B, generator=g) * 5
    if name == "n_tokens":
        return torch.tensor([4, 3])
    if name == "lam":
        return 0.5
    if name == "retain_loss":
        return 0.7
    if name in ("hidden", "ref_hidden"):  # one layer's activations [B, T, d], d = V here
        return torch.randn(B, T, V, generator=g)
    if name in ("target", "control"):  # a target vector [d]
        return torch.rand(V, generator=g)
    if name == "mask":
        return argument("labels") != -100
    if name == "dim":
        return V
    if name == "coeff":
        return 6.5
    if name.endswith("state_dict"):
        return {"w": torch.randn(3, 3, generator=g)}
    raise AssertionError(f"tests/test_shape.py has no value for a loss argument named {name!r}: add one to argument()")


def loss_functions(ns: dict) -> dict:
    return {k: v for k, v in ns.items() if inspect.isfunction(v) and v.__module__ == "pasted"}


@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_loss_block_runs_with_torch_alone(script):
    """Red when a loss block imports anything but torch/math or calls a name from the rest of the repo
    (e.g. common.answer_logprob_stats, or a helper defined below the block): each function is called."""
    block = loss_block(script)
    imports = [line for line in block.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert not imports, f"{script}'s loss block imports: {imports}"
    funcs = loss_functions(pasted(block))
    assert funcs, f"{script}'s loss block defines no function"
    for name, fn in funcs.items():
        params = inspect.signature(fn).parameters.values()
        args = [argument(p.name) for p in params if p.default is inspect.Parameter.empty]
        out = fn(*args)
        values = out.values() if isinstance(out, dict) else [out]
        for v in values:
            assert torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all(), f"{script}: {name} gave {v}"


def test_loss_block_check_goes_red_on_a_repo_call():
    """The check above can fail: a block whose loss calls a name from the repo raises once called."""
    block = loss_block("me_gd.py").replace("n_tokens = (labels[:, 1:] != -100).sum()",
                                           "n_tokens = common.answer_logprob_stats(logits, labels)[2].sum()")
    ns = pasted(block)
    with pytest.raises(NameError, match="common"):
        ns["nll_loss"](argument("logits"), argument("labels"))


# ---------------------------------------------------------------------------
# Import circles and private names
# ---------------------------------------------------------------------------
def repo_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the repo outside tests/ and data/."""
    mods = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] in ("tests", "data", "runs") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the repo modules it imports, anywhere in the file (deferred imports count). Scripts
    under bench/ and scripts/ import their neighbours by bare name (sys.path), so a bare name that is
    no top-level module resolves to the module of that name in the importer's folder."""
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        folder = m.rsplit(".", 1)[0] if "." in m else ""
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for x in names:
                target = x if x in mods else f"{folder}.{x}" if folder and f"{folder}.{x}" in mods else None
                if target and target != m and not m.startswith(target + "."):
                    edges[m].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_no_import_circles():
    cycle = find_cycle(import_graph(repo_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_circle_check_sees_deferred_imports_and_bench_neighbours(tmp_path):
    """Red if the check only read top-level imports, or missed bench/'s bare-name imports."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.py").write_text("import y\n")
    (tmp_path / "bench" / "y.py").write_text("def g():\n    import x\n")
    edges = import_graph(repo_modules(tmp_path))
    assert find_cycle({k: v for k, v in edges.items() if not k.startswith("bench")}) == ["a", "b", "a"]
    assert find_cycle({k: v for k, v in edges.items() if k.startswith("bench")}) == ["bench.x", "bench.y", "bench.x"]


def private_uses(mods: dict[str, Path], extra_files=()) -> list[str]:
    """`module._name` where module is another repo module, in every module and test file."""
    short = {m.rsplit(".", 1)[-1]: m for m in mods}
    found = []
    for f in [*mods.values(), *extra_files]:
        aliases = {}
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods or a.name in short:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif a.name.startswith("_") and not a.name.startswith("__") and (node.module in mods or node.module in short):
                        found.append(f"{f.name}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{f.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_helper_is_used_from_another_file():
    tests = sorted((REPO / "tests").glob("*.py"))
    uses = private_uses(repo_modules(), tests)
    assert not uses, "private names used across files (make them public or move them): " + "; ".join(uses)


def test_private_check_goes_red(tmp_path):
    (tmp_path / "a.py").write_text("def _helper():\n    return 1\n")
    (tmp_path / "b.py").write_text("import a as A\n\nA._helper()\n")
    assert private_uses(repo_modules(tmp_path)) == ["b.py:3: A._helper"]


def undefined_names(files) -> list[str]:
    """pyflakes' 'undefined name' messages over `files`: a name used but never imported or defined, which
    Python reports only when that line runs (a merge that drops an import used on a rare path)."""
    from pyflakes.api import check
    from pyflakes.reporter import Reporter
    import io
    out = io.StringIO()
    for f in files:
        check(Path(f).read_text(), str(f), Reporter(out, out))
    return [line for line in out.getvalue().splitlines() if "undefined name" in line]


def test_no_undefined_names():
    files = [*repo_modules().values(), *sorted((REPO / "tests").glob("*.py"))]
    assert undefined_names(files) == []


def test_undefined_name_check_goes_red(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\n\ndef peak():\n    return models.load_trained(os.sep)\n")
    assert len(undefined_names([f])) == 1 and "models" in undefined_names([f])[0]
