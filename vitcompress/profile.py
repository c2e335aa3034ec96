"""Per-block latency attribution: onnxruntime's profiler on an exported model, each node's time mapped back to
its transformer block, the block's sub-module (attn / mlp / norm / other) and the recipe step that converted it.

The side-by-side latency says how much faster a converted model is; this says where its time goes, so the
gap between a MAC-ideal and a measured speed-up can be traced to blocks and op types.

How a node finds its module: torch.onnx (dynamo) records the module path of every node in its metadata
(``pkg.torch.onnx.name_scopes``); the TorchScript exporter encoded it in the node name
(``/blocks/blocks.3/attn/qkv/MatMul``). onnxruntime's optimizer then fuses and inserts nodes, so the profiled
session also saves the graph it ran: a kept node has its exported name, a fused one its first node's name
followed by ``/<fusion>``, and a node onnxruntime inserted (layout transposes, NCHWc reorders) takes the module
of the values it writes or of its neighbours. A node that still has no module is counted in an explicit
``unmapped`` row, never dropped, so the rows always add up to the profiled total.
"""

from __future__ import annotations

import ast
import bisect
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vitcompress.deploy.runtime import input_shape, open_session, session_options
from vitcompress.deploy.timing_lock import latency_lock
from vitcompress.errors import ModelError

KERNEL_SUFFIX = "_kernel_time"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: A transformer block's module path at the start of a module's: ``blocks.3`` (ViT), ``layers.1.blocks.0`` (Swin),
#: ``stages.2.blocks.1`` (PVT-v2, MViTv2); blocks are numbered in depth order across stages (:func:`block_depths`).
BLOCK = re.compile(r"(?:[^.]+\.\d+\.)*?blocks\.\d+(?=\.|$)")
PARTS = ("attn", "mlp", "norm", "other")
TOP_LEVEL, UNMAPPED = "top-level ops", "unmapped"
TOP_OPS = 3


def module_of(node: onnx.NodeProto) -> str | None:
    """The module path (``blocks.3.attn.qkv``; ``""`` for the root model) that exported ``node``, if known."""
    meta = {p.key: p.value for p in node.metadata_props}
    if SCOPES_KEY in meta:
        scopes = ast.literal_eval(meta[SCOPES_KEY])  # ['', 'blocks', 'blocks.3', …, op]; a non-module hook first
        return scopes[-2] if len(scopes) > 1 and scopes[0] == "" else ""
    if node.name.startswith("/"):  # TorchScript: /blocks/blocks.3/attn/qkv/MatMul
        path = ""
        for segment in node.name.split("/")[1:-1]:
            path = segment if path and segment.startswith(path + ".") else ".".join(filter(None, (path, segment)))
        return path
    return None


def optimized_modules(exported: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, str | None]:
    """Module path of every node of onnxruntime's optimized graph (None where nothing ties it to one)."""
    by_name = {node.name: module_of(node) for node in exported.graph.node}
    by_value = {value: by_name[node.name] for node in exported.graph.node for value in node.output}
    modules: dict[str, str | None] = {}
    for node in optimized.graph.node:
        parts = node.name.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(len(parts), 0, -1)]  # fused: "<first node>/<fusion>/"
        found = [by_name[p] for p in prefixes if by_name.get(p) is not None]
        found = found or [by_value[v] for v in node.output if by_value.get(v) is not None]
        modules[node.name] = found[0] if found else None
    producer = {value: node.name for node in optimized.graph.node for value in node.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in optimized.graph.node:
        for value in node.input:
            consumers[value].append(node.name)
    changed = True
    while changed:  # inserted nodes: the module of their first known producer, else of a consumer
        changed = False
        for node in optimized.graph.node:
            if modules[node.name] is None:
                near = [producer[v] for v in node.input if v in producer]
                near += [c for v in node.output for c in consumers[v]]
                known = [modules[n] for n in near if modules[n] is not None]
                if known:
                    modules[node.name], changed = known[0], True
    return modules


def _session(path: Path, threads: int, scratch: Path) -> ort.InferenceSession:
    """A measuring session (:func:`session_options`) that profiles and saves its optimized graph in ``scratch``."""
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / "ort")
    options.optimized_model_filepath = str(scratch / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
    return open_session(path, options=options)


def node_times(events: list[dict], warmup_runs: int) -> tuple[list[tuple[str, str, float]], list[float]]:
    """(node, op type, median µs per run) of every node over the runs after ``warmup_runs`` in a profiler trace,
    and each of those runs' wall time in µs.

    Medians, not means: on a shared CPU one preempted run would otherwise inflate whichever nodes it hit.
    """
    measured = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                      if e.get("cat") == "Session" and e["name"] == "model_run")[warmup_runs:]
    starts = [start for start, _ in measured]
    per_run: dict[str, np.ndarray] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith(KERNEL_SUFFIX):
            run = bisect.bisect_right(starts, e["ts"]) - 1
            if run >= 0 and e["ts"] <= measured[run][1]:
                name = e["name"][: -len(KERNEL_SUFFIX)]
                ops[name] = e["args"]["op_name"]
                per_run.setdefault(name, np.zeros(len(measured)))[run] += e["dur"]
    nodes = [(name, ops[name], float(np.median(us))) for name, us in per_run.items()]
    return nodes, [float(end - start) for start, end in measured]


def _input(session: ort.InferenceSession, path: Path, batch_size: int) -> np.ndarray:
    """Seeded Gaussian images of the model's one input at ``batch_size``."""
    try:
        shape = input_shape(session)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    batch = session.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch != batch_size:
        raise ModelError(f"{path} has a fixed batch of {batch}: profile it with --batch-size {batch}")
    return np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)


def block_depths(modules: Iterable[str | None]) -> dict[str, int]:
    """Each block path among ``modules``' prefixes → its number: N for a ViT's ``blocks.N``; in a hierarchical
    model, its position in depth order among the blocks seen (by the numbers in the path: ``layers.0.blocks.1``
    before ``layers.1.blocks.0``)."""
    paths = {match.group(0) for m in modules if m and (match := BLOCK.match(m))}
    if all(p.startswith("blocks.") for p in paths):
        return {p: int(p.split(".")[1]) for p in paths}
    return {p: i for i, p in enumerate(sorted(paths, key=lambda p: [int(n) for n in re.findall(r"\d+", p)]))}


def _block(module: str | None, depths: dict[str, int]) -> tuple[int, str] | None:
    """(depth position, block path) of the block ``module`` lies in, if any."""
    match = BLOCK.match(module or "")
    return (depths[match.group(0)], match.group(0)) if match else None


def _part(module: str, block: str) -> str:
    """attn / mlp / norm / other: the sub-module of ``block`` that ``module`` belongs to."""
    child = module[len(block) + 1:].split(".")[0]
    return "norm" if child.startswith("norm") else child if child in ("attn", "mlp") else "other"


def _step_of(module: str, owners: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The recipe step that converted ``module`` or its nearest converted ancestor."""
    parts = module.split(".")
    return next((owners[p] for p in (".".join(parts[:k]) for k in range(len(parts), 0, -1)) if p in owners), None)


def _ops(ms_by_op: dict[str, float], total: float, limit: int | None = None) -> list[dict]:
    ranked = sorted(ms_by_op.items(), key=lambda kv: -kv[1])[:limit]
    return [{"op": op, "ms": ms, "share": 100 * ms / total if total else 0.0} for op, ms in ranked]


def attribute(nodes: list[tuple[str, str, float]], modules: dict[str, str | None],
              steps: list[dict] | None = None) -> dict:
    """ms per run of ``nodes`` (name, op type, µs) by block (split into attn / mlp / norm / other, with its recipe
    steps and top op types), by sub-module over all blocks (with its op types), by region outside the blocks
    (``unmapped`` last), by recipe step and by op type."""
    owners = {m: (s["step"], s["transform"]) for s in steps or [] for m in s["modules"]}
    row_ms: dict[str, float] = defaultdict(float)  # "b3", or the name of a region outside the blocks
    part_ms: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PARTS, 0.0))
    row_ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    row_steps: dict[str, dict[tuple[int, str], float]] = defaultdict(lambda: defaultdict(float))
    op_ms: dict[str, float] = defaultdict(float)
    part_ops: dict[str, dict[str, float]] = {part: defaultdict(float) for part in PARTS}
    step_ms: dict[tuple[int, str], float] = dict.fromkeys(owners.values(), 0.0)
    unmapped: set[str] = set()
    depths = block_depths([*modules.values(), *owners])
    for name, op, us in nodes:
        ms = us / 1e3
        module = modules.get(name)
        block = _block(module, depths)
        if module is None:
            row = UNMAPPED
            unmapped.add(name)
        elif block:
            row, part = f"b{block[0]}", _part(module, block[1])
            part_ms[row][part] += ms
            part_ops[part][op] += ms
        else:
            row = module.split(".")[0] or TOP_LEVEL
        row_ms[row] += ms
        row_ops[row][op] += ms
        op_ms[op] += ms
        step = None if module is None else _step_of(module, owners)
        if step is not None:
            row_steps[row][step] += ms
            step_ms[step] += ms
    total = sum(row_ms.values())
    share = (lambda ms: 100 * ms / total if total else 0.0)
    owner_blocks = {m: _block(m, depths) for m in owners}
    indices = sorted({int(r[1:]) for r in row_ms if r.startswith("b")} |
                     {b[0] for b in owner_blocks.values() if b})
    blocks = []
    for i in indices:
        row = f"b{i}"
        touching = sorted({owners[m] for m, b in owner_blocks.items() if b and b[0] == i})
        blocks.append({"block": i, "ms": row_ms[row], "share": share(row_ms[row]), "parts": part_ms[row],
                       "steps": [{"step": s, "transform": t, "ms": row_steps[row][(s, t)]} for s, t in touching],
                       "top_ops": _ops(row_ops[row], row_ms[row], TOP_OPS)})
    regions = [r for r in row_ms if not r.startswith("b") and r != UNMAPPED] + [UNMAPPED]
    outside = [{"name": r, "ms": row_ms[r], "share": share(row_ms[r]), "top_ops": _ops(row_ops[r], row_ms[r], TOP_OPS)}
               for r in regions]
    parts = {part: sum(b["parts"][part] for b in blocks) for part in PARTS}
    return {"node_ms": total, "nodes": len(modules), "unmapped_nodes": len(unmapped), "parts": parts,
            "part_ops": {part: _ops(part_ops[part], parts[part]) for part in PARTS}, "blocks": blocks,
            "outside_blocks": outside,
            "steps": [{"step": s, "transform": t, "ms": ms, "share": share(ms)} for (s, t), ms in step_ms.items()],
            "op_types": _ops(op_ms, total)}


def profile_models(paths: dict[str, str | Path], steps: dict[str, list[dict]] | None = None, *, batch_size: int = 1,
                   runs: int = 20, warmup_runs: int = 3, threads: int = 2) -> dict[str, dict]:
    """Profile each ONNX file of ``paths`` in onnxruntime (the validation's session settings), their runs
    interleaved so that machine noise hits them alike, and attribute each one's node times.

    ``steps[name]`` is a report's ``steps`` list (which modules each recipe step converted) to tag that model's
    blocks with. Times are ms per run: each node's median over ``runs`` runs after ``warmup_runs``.
    ``node_ms`` is their sum (what the rows add up to), ``run_ms`` the median wall time of a profiled
    ``run()``, which adds the executor's and the profiler's overhead.
    """
    paths = {name: Path(path) for name, path in paths.items()}
    for path in paths.values():
        if not path.is_file():
            raise ModelError(f"ONNX file {path} does not exist")
    with tempfile.TemporaryDirectory(prefix="vitcompress-profile-") as tmp:
        scratch = {name: Path(tmp) / str(i) for i, name in enumerate(paths)}
        for directory in scratch.values():
            directory.mkdir()
        sessions = {name: _session(path, threads, scratch[name]) for name, path in paths.items()}
        feeds = {name: {s.get_inputs()[0].name: _input(s, paths[name], batch_size)} for name, s in sessions.items()}
        for _ in range(warmup_runs + runs):
            for name, session in sessions.items():
                session.run(None, feeds[name])
        results = {}
        for name, session in sessions.items():
            nodes, run_us = node_times(json.loads(Path(session.end_profiling()).read_text()), warmup_runs)
            modules = optimized_modules(onnx.load(str(paths[name]), load_external_data=False),
                                        onnx.load(str(scratch[name] / "optimized.onnx"), load_external_data=False))
            results[name] = {"onnx": paths[name].name, "batch_size": batch_size, "runs": runs,
                             "warmup_runs": warmup_runs, "threads": threads, "run_ms": float(np.median(run_us)) / 1e3,
                             **attribute(nodes, modules, (steps or {}).get(name))}
    return results


def profile_onnx(path: str | Path, steps: list[dict] | None = None, *, batch_size: int = 1, runs: int = 20,
                 warmup_runs: int = 3, threads: int = 2) -> dict:
    """:func:`profile_models` of one ONNX file."""
    return profile_models({"model": path}, {"model": steps or []}, batch_size=batch_size, runs=runs,
                          warmup_runs=warmup_runs, threads=threads)["model"]


def profile_bundle(bundle: str | Path, *, baseline: str | Path | None = None, batch_size: int = 1, runs: int = 20,
                   warmup_runs: int = 3, threads: int | None = None) -> dict:
    """Profile a ``vitcompress convert`` output directory's ``model.onnx``, blocks tagged with the steps of its
    ``report.json``; ``baseline`` (e.g. the original model's ONNX) is profiled alongside for comparison.

    ``threads`` defaults to the bundle's validation threads (2 without a report).
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise ModelError(f"{bundle} is not a directory: give the output directory of vitcompress convert")
    if not (bundle / "model.onnx").is_file():
        raise ModelError(f"{bundle} has no model.onnx: give the output directory of vitcompress convert")
    report_path = bundle / "report.json"
    try:
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{report_path} is not readable JSON: {exc}") from None
    paths = {"converted": bundle / "model.onnx", **({} if baseline is None else {"baseline": baseline})}
    threads = threads or report.get("validation", {}).get("threads", 2)
    with latency_lock(f"profile {bundle}"):
        profiles = profile_models(paths, {"converted": report.get("steps", [])}, batch_size=batch_size, runs=runs,
                                  warmup_runs=warmup_runs, threads=threads)
    return {"bundle": str(bundle), "converted": profiles["converted"], "baseline": profiles.get("baseline")}


def block_rows(profile: dict, reference: dict | None = None) -> list[tuple[str, ...]]:
    """Table rows for people: (block, steps, [reference ms,] ms, [speed-up,] share, attn, mlp, norm, other,
    top ops) per block, then one per region outside the blocks and the total."""
    ref_rows = {} if reference is None else {
        **{str(b["block"]): b["ms"] for b in reference["blocks"]},
        **{o["name"]: o["ms"] for o in reference["outside_blocks"]}, "total": reference["node_ms"]}

    def row(label: str, steps: str, ms: float, share: float, parts: dict | None, ops: list[dict]) -> tuple:
        cells = [label, steps]
        if reference is not None:
            ref = ref_rows.get(label)
            cells += ["—" if ref is None else f"{ref:.3f}", f"{ms:.3f}",
                      f"{ref / ms:.2f}×" if ref and ms else "—"]
        else:
            cells.append(f"{ms:.3f}")
        cells.append(f"{share:.1f} %")
        cells += [f"{parts[p]:.3f}" for p in PARTS] if parts else [""] * len(PARTS)
        cells.append(", ".join(f"{o['op']} {o['share']:.0f}%" for o in ops))
        return tuple(cells)

    rows = [row(str(b["block"]), ", ".join(f"{s['step']}:{s['transform']}" for s in b["steps"]) or "—",
                b["ms"], b["share"], b["parts"], b["top_ops"]) for b in profile["blocks"]]
    rows += [row(o["name"], "", o["ms"], o["share"], None, o["top_ops"]) for o in profile["outside_blocks"]]
    rows.append(row("total", "", profile["node_ms"], 100.0, None, profile["op_types"][:TOP_OPS]))
    return rows


def parts_line(profile: dict, reference: dict | None = None) -> str:
    """Where the blocks' time goes: "all blocks: attn 55.20 ms, mlp …" (reference → profile with a reference)."""

    def ms(part: str) -> str:
        now = f"{profile['parts'][part]:.2f} ms"
        return now if reference is None else f"{reference['parts'][part]:.2f} → {now}"

    return "all blocks: " + ", ".join(f"{part} {ms(part)}" for part in PARTS)


def block_columns(reference: str | None = None) -> list[str]:
    """Column headers of :func:`block_rows` (times in ms per run); ``reference`` names the reference model."""
    times = [f"{reference} ms", "converted ms", "speed-up"] if reference else ["ms"]
    return ["block", "recipe steps", *times, "share", *PARTS, "top op types"]
