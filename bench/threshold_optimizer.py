"""Where do the kernel paths beat packed SDPA on this GPU? Measure, decide, write the thresholds.

    python bench/threshold_optimizer.py --dry-run          # sweep and print, write nothing
    python bench/threshold_optimizer.py                    # ... and write configs/base.yaml
    python bench/threshold_optimizer.py --apply-json F     # write a saved sweep's decision
    python bench/threshold_optimizer.py --from-bench bench_selection.json   # backend order,
                                              # and the CUDA tile kernel's union crossover

Sweep: the total selected length per row L = S x 64 (S blocks of 64; default 64 .. 2048 tokens)
and the group size G (HQ = 4G, H = 4), prefill of --seqlen tokens, bf16, D = 128, the `random`
selection pattern. Each point times nsa_ext.selection_attention with backend="sdpa", "triton"
(the configured variant) and "cuda" (where built), with NSA_SEL_TRITON_MIN_L=0 and
NSA_SEL_CUDA_MIN_L=0 so the current thresholds block nothing.

Decision, per kernel path: for each G the smallest L from which the kernel is faster than packed
SDPA at that L and at every larger L of the sweep; the threshold is the largest of these over
the group sizes where the kernel wins somewhere (the dispatcher keys on L alone, so the kernel is
picked only where it won at every measured G that it can win at). Group sizes where it never wins
are printed as a warning. A path that never wins gets a threshold past the sweep (2 x max L).

The result goes into configs/base.yaml under runtime.thresholds.<arch> ("sm90" for SM 9.0) as
sel_triton_min_L and sel_cuda_min_L (nsa_ext.config.Settings.min_len reads them). Only that
arch's entry is rewritten, in the YAML text itself: every comment and every other key stays.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import Shape, environ, short_error  # noqa: E402

KERNELS = ("triton", "cuda")
KEYS = {"triton": "sel_triton_min_L", "cuda": "sel_cuda_min_L"}
SWEEP_ENV = {"NSA_SEL_TRITON_MIN_L": "0", "NSA_SEL_CUDA_MIN_L": "0"}


# ----------------------------------------------------------------------------------------------
# Measuring

def _time_point(shape: Shape, backend: str, device, dtype, timer, seed: int):
    import nsa_ext

    block_indices = common.make_block_indices(shape, "random", device=device, seed=seed)
    q, k, v = common.make_qkv(shape, dtype, device, seed=seed)
    decision = nsa_ext.explain(q, k, v, block_indices, shape.block_size, backend=backend)
    if not getattr(decision, "chosen", None):
        reasons = getattr(decision, "reasons", {}) or {}
        return None, "; ".join(reasons.get(backend, [])) or "cannot serve"

    def fn():
        return nsa_ext.selection_attention(q, k, v, block_indices, shape.block_size, backend=backend)

    fn()
    return timer(fn), ""


def sweep(lengths: Sequence[int], groups: Sequence[int], seqlen: int, device, dtype, timer,
          budget_s: float, seed: int = 0, progress=None) -> List[dict]:
    points = []
    started = time.monotonic()
    with environ(**SWEEP_ENV):
        for G in groups:
            for L in lengths:
                shape = Shape(B=1, TQ=seqlen, TK=seqlen, HQ=4 * G, H=4, Dk=128, Dv=128, S=L // 64)
                point = {"G": G, "L": L, "seqlen": seqlen}
                for backend in ("sdpa",) + KERNELS:
                    if time.monotonic() - started > budget_s:
                        point[backend], point[f"{backend}_note"] = None, "time budget spent"
                    else:
                        try:
                            point[backend], point[f"{backend}_note"] = _time_point(
                                shape, backend, device, dtype, timer, seed)
                        except Exception as err:
                            point[backend], point[f"{backend}_note"] = None, short_error(err)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    if progress:
                        progress.step(f"G={G} L={L} {backend}")
                points.append(point)
    return points


def decide(points: List[dict], lengths: Sequence[int]) -> Dict[str, dict]:
    """Per kernel: {"threshold": int or None (not measured), "per_group": {G: L or None}, "warning"}."""
    result = {}
    groups = sorted({p["G"] for p in points})
    beyond = 2 * max(lengths)
    for kernel in KERNELS:
        per_group: Dict[int, Optional[int]] = {}
        measured = False
        for G in groups:
            pts = sorted((p for p in points if p["G"] == G), key=lambda p: p["L"])
            wins = []
            for p in pts:
                if p.get(kernel) is not None:
                    measured = True
                wins.append(p.get(kernel) is not None and p.get("sdpa") is not None
                            and p[kernel] < p["sdpa"])
            threshold = None
            for i in range(len(pts) - 1, -1, -1):      # smallest L from which it wins to the end
                if not wins[i]:
                    break
                threshold = pts[i]["L"]
            per_group[G] = threshold
        if not measured:
            result[kernel] = {"threshold": None, "per_group": per_group,
                              "warning": "not measured here (cannot run): the config keeps its value"}
            continue
        winning = [t for t in per_group.values() if t is not None]
        losing = [G for G, t in per_group.items() if t is None]
        threshold = max(winning) if winning else beyond
        warning = ""
        if losing:
            warning = (f"never beat packed SDPA at the largest L for G={losing}"
                       + ("" if winning else f": threshold set past the sweep ({beyond})"))
        result[kernel] = {"threshold": threshold, "per_group": per_group, "warning": warning}
    return result


def sweep_table(points: List[dict]) -> str:
    lines = [f"{'G':>3} {'L':>6} {'sdpa ms':>10} {'triton ms':>10} {'x sdpa':>7} {'cuda ms':>10} {'x sdpa':>7}"]
    notes: Dict[str, List[str]] = {}
    for p in points:
        def cell(name):
            return f"{p[name]:10.4f}" if p.get(name) is not None else f"{'-':>10}"

        def ratio(name):
            if p.get(name) is None or p.get("sdpa") is None:
                return f"{'-':>7}"
            return f"{p[name] / p['sdpa']:7.2f}"

        for name in ("sdpa",) + KERNELS:
            note = p.get(name + "_note")
            if note and note not in notes.setdefault(name, []):
                notes[name].append(note)
        lines.append(f"{p['G']:>3} {p['L']:>6} {cell('sdpa')} {cell('triton')} {ratio('triton')} "
                     f"{cell('cuda')} {ratio('cuda')}")
    for name, texts in notes.items():
        lines += [f"  {name} not timed where '-': {text}" for text in texts]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Writing the YAML text

def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _block_end(lines: List[str], start: int, parent_indent: int) -> int:
    """Index after the last line of the block under lines[start] (its children indent deeper).
    Trailing blank and comment lines are left to whatever follows."""
    end = start + 1
    i = start + 1
    while i < len(lines):
        if _is_content(lines[i]):
            if _indent(lines[i]) <= parent_indent:
                break
            end = i + 1
        i += 1
    return end


def _split_comment(text: str):
    # Values here are plain scalars and flow mappings: a '#' after a space starts the comment.
    match = re.search(r"\s#", text)
    return (text[:match.start()], text[match.start():]) if match else (text, "")


def _entry_lines(arch: str, values: Dict[str, int], indent: int, comment: str) -> List[str]:
    pad = " " * indent
    head = f"{pad}{arch}:" + (f"  # {comment}" if comment else "")
    return [head] + [f"{pad}  {key}: {int(value)}" for key, value in values.items()]


def write_thresholds(text: str, arch: str, values: Dict[str, int], comment: str = "") -> str:
    """`text` with runtime.thresholds.<arch> set to `values` merged over that arch's old values.
    Everything else (comments, other keys, other architectures) is kept as written."""
    import yaml

    if not re.fullmatch(r"sm\d+[a-z]?", arch):
        raise ValueError(f"arch: expected a name like 'sm90', got {arch!r}")
    data = yaml.safe_load(text) or {}
    runtime = data.get("runtime") or {}
    old_all = dict(runtime.get("thresholds") or {})
    merged = dict(old_all.get(arch) or {})
    merged.update({k: int(v) for k, v in values.items()})
    lines = text.splitlines()
    trailing_newline = text.endswith("\n") or not text

    runtime_at = next((i for i, l in enumerate(lines) if re.match(r"^runtime:\s*(#.*)?$", l)), None)
    if runtime_at is None:
        lines += ["runtime:", "  thresholds:"] + _entry_lines(arch, merged, 4, comment)
        return "\n".join(lines) + "\n"
    runtime_end = _block_end(lines, runtime_at, 0)
    children = [i for i in range(runtime_at + 1, runtime_end) if _is_content(lines[i])]
    child_indent = _indent(lines[children[0]]) if children else 2
    th_at = next((i for i in children if _indent(lines[i]) == child_indent
                  and re.match(r"^\s*thresholds\s*:", lines[i])), None)
    if th_at is None:
        new = [" " * child_indent + "thresholds:"] + _entry_lines(arch, merged, child_indent + 2, comment)
        lines[runtime_end:runtime_end] = new
        return "\n".join(lines) + ("\n" if trailing_newline else "")

    value, th_comment = _split_comment(lines[th_at].split(":", 1)[1])
    if value.strip():
        # Flow style (`thresholds: {}` or `{sm89: {...}}`): rewrite as a block, old arches first.
        new = [" " * child_indent + "thresholds:" + th_comment]
        for other, entry in old_all.items():
            if str(other) != arch:
                new += _entry_lines(str(other), dict(entry or {}), child_indent + 2, "")
        new += _entry_lines(arch, merged, child_indent + 2, comment)
        lines[th_at:th_at + 1] = new
        return "\n".join(lines) + ("\n" if trailing_newline else "")

    th_end = _block_end(lines, th_at, child_indent)
    entries = [i for i in range(th_at + 1, th_end) if _is_content(lines[i])]
    arch_indent = _indent(lines[entries[0]]) if entries else child_indent + 2
    arch_at = next((i for i in entries if _indent(lines[i]) == arch_indent
                    and re.match(rf"^\s*['\"]?{arch}['\"]?\s*:", lines[i])), None)
    if arch_at is None:
        lines[th_end:th_end] = _entry_lines(arch, merged, arch_indent, comment)
    else:
        arch_end = _block_end(lines, arch_at, arch_indent)
        lines[arch_at:arch_end] = _entry_lines(arch, merged, arch_indent, comment)
    return "\n".join(lines) + ("\n" if trailing_newline else "")


def apply(config: Path, arch: str, decision: Dict[str, dict], comment: str, dry_run: bool) -> str:
    import yaml

    values = {KEYS[k]: d["threshold"] for k, d in decision.items() if d.get("threshold") is not None}
    if not values:
        return f"nothing to write: no kernel path was measured ({config} unchanged)"
    old = config.read_text()
    new = write_thresholds(old, arch, values, comment)
    written = (yaml.safe_load(new).get("runtime") or {}).get("thresholds", {}).get(arch, {})
    for key, value in values.items():
        if written.get(key) != value:
            raise RuntimeError(f"internal error: runtime.thresholds.{arch}.{key} reads back "
                               f"{written.get(key)!r}, not {value}")
    if dry_run:
        return f"--dry-run: would set runtime.thresholds.{arch} = {values} in {config}"
    config.write_text(new)
    return f"wrote runtime.thresholds.{arch} = {values} into {config}"


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the sweep and decision, write nothing")
    parser.add_argument("--config", default=str(_REPO / "configs" / "base.yaml"))
    parser.add_argument("--lengths", default="64,128,256,512,1024,2048",
                        help="selected tokens per row (multiples of 64)")
    parser.add_argument("--groups", default="1,4,16", help="group sizes G (HQ = 4G, H = 4)")
    parser.add_argument("--seqlen", type=int, default=None, help="prefill length (GPU 8192, CPU 512)")
    parser.add_argument("--arch", default=None, help="config key (default: this GPU's, e.g. sm90)")
    parser.add_argument("--json-out", default=None, help="save the sweep and decision here")
    parser.add_argument("--apply-json", default=None, help="write the decision of a saved sweep, no measuring")
    parser.add_argument("--from-bench", default=None,
                        help="a bench_selection.json: write the backend order (sel_cuda_first, "
                             "sel_cuda_first_tile, sel_cuda_first_eager_rows) and the CUDA tile "
                             "kernel's union crossover (sel_cuda_tile_max_union_pct) its rows "
                             "measured, no measuring")
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--warmup-ms", type=float, default=10)
    parser.add_argument("--rep-ms", type=float, default=40)
    args = parser.parse_args(argv)
    config = Path(args.config)

    if args.from_bench:
        bench = json.loads(Path(args.from_bench).read_text())
        gpu = (bench.get("environment") or {}).get("gpu")
        sm = str((bench.get("environment") or {}).get("sm") or "")
        arch = args.arch or ("sm" + sm.replace(".", "") if sm else None)
        order, tiles = backend_order(bench), tile_order(bench)
        for key, found in (("sel_cuda_first", order), ("sel_cuda_first_tile", tiles)):
            if found["value"] is not None:
                print(f"{key} from {args.from_bench} ({gpu}), {found['compared']}: cuda faster on "
                      f"{found['cuda_wins']} of {found['rows']} rows, geometric mean cuda/triton "
                      f"{round(found['geomean'], 3)} -> {found['value']}")
        if (order["value"] is None and tiles["value"] is None
                and cuda_tile_union_limit(bench)["value"] is None) or arch is None:
            print("nothing to write: no row with both backends" if arch is not None
                  else "nothing to write: name the architecture with --arch (e.g. sm90)")
            return 0
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        values = {key: found["value"] for key, found in (("sel_cuda_first", order),
                                                          ("sel_cuda_first_tile", tiles))
                  if found["value"] is not None}
        union = cuda_tile_union_limit(bench)
        if union["value"] is not None:
            values["sel_cuda_tile_max_union_pct"] = union["value"]
            print(f"sel_cuda_tile_max_union_pct: {union['value']} (union ratio, cuda-tile faster "
                  f"than Triton's row: {[(round(r, 3), w) for r, w in union['points']]})")
        eager = eager_order(bench)
        if eager["value"] is not None:
            values["sel_cuda_first_eager_rows"] = eager["value"]
            print(f"eager order: CUDA first up to {eager['value']} rows (rows, cuda faster: "
                  f"{eager['points']})")
        new = write_thresholds(config.read_text(), arch, values,
                               f"backend order from bench_selection.py on {gpu}, {date}")
        if args.dry_run:
            print(f"--dry-run: would set runtime.thresholds.{arch} = {values} in {config}")
        else:
            config.write_text(new)
            print(f"wrote runtime.thresholds.{arch} = {values} into {config}")
        return 0

    if args.apply_json:
        saved = json.loads(Path(args.apply_json).read_text())
        arch = args.arch or saved["arch"]
        print(sweep_table(saved["points"]))
        print(_decision_text(saved["decision"]))
        print(apply(config, arch, saved["decision"], saved.get("comment", ""), args.dry_run))
        return 0

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if any(L % 64 or L <= 0 for L in lengths):
        parser.error(f"--lengths: multiples of 64 expected, got {lengths}")
    groups = [int(x) for x in args.groups.split(",") if x.strip()]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.seqlen is None:
        args.seqlen = 8192 if cuda else 512
    if args.seqlen < max(lengths):
        parser.error(f"--seqlen {args.seqlen} is shorter than the largest L {max(lengths)}")
    dtype = torch.bfloat16 if cuda else torch.float32
    env = common.environment(device)
    from nsa_ext.device import device_facts
    from nsa_ext.config import load_settings

    facts = device_facts(device)
    arch = args.arch or facts.arch
    if arch is None:
        print("CPU run: the thresholds are per GPU architecture; the sweep is shown, nothing is "
              "written unless --arch names one", flush=True)
    print(f"threshold optimizer: {facts.describe()}; torch {env['torch']}, Triton {env.get('triton')}, "
          f"nsa_ext {env.get('nsa_ext')} (git {env['git_commit']}); {str(dtype).replace('torch.', '')}, "
          f"prefill T={args.seqlen}, H=4, D=128, random selection; Triton variant: "
          f"{'group-centric' if load_settings().sel_triton_group else 'per-head'}", flush=True)
    timer = common.Timer(device, args.warmup_ms, args.rep_ms, cpu_budget_s=0.3)
    progress = common.Progress(len(lengths) * len(groups) * 3)
    points = sweep(lengths, groups, args.seqlen, device, dtype, timer, args.budget_s, progress=progress)
    progress.close()
    decision = decide(points, lengths)
    print(sweep_table(points))
    print(_decision_text(decision))
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    comment = (f"bench/threshold_optimizer.py on {facts.name or facts.kind}, {date}, "
               f"T={args.seqlen}, G={','.join(map(str, groups))}")
    saved = {"arch": arch, "device": facts.describe(), "environment": env, "points": points,
             "decision": decision, "comment": comment, "lengths": lengths, "groups": groups}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        common.dump_json(Path(args.json_out), saved)
        print(f"saved the sweep to {args.json_out}")
    if arch is None:
        return 0
    print(apply(config, arch, decision, comment, args.dry_run))
    return 0


def _faster_first(bench: dict, cuda: str, triton: str) -> Dict[str, object]:
    """1 when the `cuda` rows are faster than the `triton` rows of the same (case, pattern, mode)
    on more than half of the pairs and not slower overall (geometric mean of cuda / triton <= 1),
    else 0; None without a pair."""
    import math

    times: Dict[tuple, Dict[str, float]] = {}
    for row in bench.get("rows", []):
        if row.get("status") == "ok" and row.get("ms") and row.get("backend") in (cuda, triton):
            times.setdefault((row["case"], row["pattern"], row.get("mode")), {})[row["backend"]] = row["ms"]
    pairs = [(t[cuda], t[triton]) for t in times.values() if len(t) == 2]
    if not pairs:
        return {"value": None, "rows": 0, "cuda_wins": 0, "geomean": None, "compared": ""}
    wins = sum(c < t for c, t in pairs)
    geomean = math.exp(sum(math.log(c / t) for c, t in pairs) / len(pairs))
    value = int(wins * 2 > len(pairs) and geomean <= 1.0)
    return {"value": value, "rows": len(pairs), "cuda_wins": wins, "geomean": geomean,
            "compared": f"{cuda} vs {triton}"}


def backend_order(bench: dict) -> Dict[str, object]:
    """Whether auto should try the CUDA extension before Triton (`sel_cuda_first`), from one
    bench run's rows (bench/bench_selection.py --json). The tile schedule has its own key
    (`tile_order`), so where the run has both backends' forced-row rows (nsa:cuda-row,
    nsa:triton-row) those decide; else the rows where both `nsa:cuda` and `nsa:triton` (each
    with its own schedule choice) have a time."""
    order = _faster_first(bench, "nsa:cuda-row", "nsa:triton-row")
    return order if order["value"] is not None else _faster_first(bench, "nsa:cuda", "nsa:triton")


def tile_order(bench: dict) -> Dict[str, object]:
    """Whether auto's tile calls run on the CUDA extension's tile kernel rather than Triton's
    (`sel_cuda_first_tile`, nsa_ext/dispatch.py), from the rows with both nsa:cuda-tile and
    nsa:triton-tile (each backend's tile schedule forced)."""
    return _faster_first(bench, "nsa:cuda-tile", "nsa:triton-tile")


_UNION_NOTE = re.compile(r"union/selections ([0-9.eE+-]+)")


def case_union_ratios(bench: dict, kv_max_g: int = 2) -> Dict[tuple, float]:
    """(case, pattern) -> the tile unions' size / the selections of that case's inputs, for the
    cases with G > kv_max_g (at G <= kv_max_g the tile crossover is kv's): the case record's
    `union_ratio` (bench_selection.py), or for older runs the number in its `auto` note
    ("...; nsa:triton's schedule: row (union/selections 0.605)")."""
    ratios = {}
    for case in bench.get("cases", []):
        shape = case.get("shape") or {}
        if not shape.get("H") or shape.get("HQ", 0) // shape["H"] <= kv_max_g:
            continue
        ratio = case.get("union_ratio")
        if ratio is None:
            found = _UNION_NOTE.search(str(case.get("auto") or ""))
            ratio = float(found.group(1)) if found else None
        if ratio is not None:
            ratios[(case["case"], case["pattern"])] = ratio
    return ratios


def cuda_tile_union_limit(bench: dict, kv_max_g: int = 2) -> Dict[str, object]:
    """`sel_cuda_tile_max_union_pct` (nsa_ext/schedules/chooser.py): the union, in % of the
    selections, up to which auto takes the tile schedule where it runs on the CUDA Hopper kernel.
    From one run's forward rows with both nsa:cuda-tile and Triton's row schedule (nsa:triton-row,
    else nsa:triton where that case's Triton schedule was row), cases ordered by union ratio: the
    midpoint between the last case of the run of wins from the smallest union and the first case
    that lost (0 for the lower end when the smallest lost); when none lost, the midpoint between
    the last win and 100 % (a union of 100 %, every token's blocks disjoint from its tile
    neighbours', is the tile kernel's worst case -- at G = 16 four times the row kernel's MMA
    rows -- and no bench pattern reaches it, so the limit does not extrapolate that far); None
    without a pair. Cases with G <= kv_max_g are left out."""
    ratios = case_union_ratios(bench, kv_max_g)
    row_schedule = {(c["case"], c["pattern"]) for c in bench.get("cases", [])
                    if "nsa:triton's schedule: row" in str(c.get("auto") or "")}
    times: Dict[tuple, Dict[str, float]] = {}
    for row in bench.get("rows", []):
        key = (row.get("case"), row.get("pattern"))
        if row.get("status") != "ok" or row.get("mode") != "fwd" or not row.get("ms") or \
                key not in ratios:
            continue
        name = row.get("backend")
        if name == "nsa:triton" and key in row_schedule:
            times.setdefault(key, {}).setdefault("row", row["ms"])
        elif name == "nsa:triton-row":
            times.setdefault(key, {})["row"] = row["ms"]       # the forced row wins over auto's
        elif name == "nsa:cuda-tile":
            times.setdefault(key, {})["tile"] = row["ms"]
    points = sorted((ratios[key], t["tile"] < t["row"]) for key, t in times.items() if len(t) == 2)
    if not points:
        return {"value": None, "points": []}
    last_win = 0.0
    for ratio, won in points:
        if not won:
            return {"value": int(50 * (last_win + ratio)), "points": points}
        last_win = ratio
    return {"value": int(50 * (last_win + 1.0)), "points": points}


def eager_order(bench: dict) -> Dict[str, object]:
    """The largest call, in rows (B * TQ * H), up to which an eager call should try the CUDA
    extension before Triton (`sel_cuda_first_eager_rows`, nsa_ext/dispatch.py), from one bench
    run: per case where both `nsa:cuda` and `nsa:triton` ran, the eager whole-call time where the
    row has one (decode and chunk rows: host and GPU together) and the GPU time otherwise
    (prefill rows, where the host's share vanishes). The value is the largest row count whose
    case and every smaller one CUDA won; 0 when it lost the smallest; None (keep the config's
    value) when no case has eager times of both (a run without decode or chunk rows)."""
    shapes = {(c["case"], c["pattern"]): c.get("shape") or {} for c in bench.get("cases", [])}
    times: Dict[tuple, Dict[str, float]] = {}
    eager_cases: Dict[tuple, int] = {}
    for row in bench.get("rows", []):
        if row.get("status") != "ok" or row.get("mode") != "fwd" or \
                row.get("backend") not in ("nsa:cuda", "nsa:triton"):
            continue
        key = (row["case"], row["pattern"])
        spent = row.get("eager_us") or (row["ms"] * 1e3 if row.get("ms") else None)
        if spent:
            times.setdefault(key, {})[row["backend"]] = spent
            eager_cases[key] = eager_cases.get(key, 0) + bool(row.get("eager_us"))
    if not any(n == 2 for n in eager_cases.values()):
        return {"value": None, "points": []}
    points = []
    for key, t in times.items():
        shape = shapes.get(key)
        if len(t) == 2 and shape and all(k in shape for k in ("B", "TQ", "H")):
            points.append((shape["B"] * shape["TQ"] * shape["H"], t["nsa:cuda"] < t["nsa:triton"]))
    if not points:
        return {"value": None, "points": []}
    value = 0
    for rows, cuda_wins in sorted(points, key=lambda p: (p[0], p[1])):
        if not cuda_wins:
            break
        value = rows
    return {"value": value, "points": sorted(points)}


def _decision_text(decision: Dict[str, dict]) -> str:
    lines = ["decision (smallest L per row from which the kernel beats packed SDPA, max over G):"]
    for kernel, d in decision.items():
        per = ", ".join(f"G={G}: {'never' if t is None else t}" for G, t in d["per_group"].items())
        value = "keep the config's value" if d["threshold"] is None else d["threshold"]
        lines.append(f"  {KEYS[kernel]} = {value}   ({per})" + (f"  WARNING: {d['warning']}" if d.get("warning") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
