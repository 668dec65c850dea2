"""The bodies of `telltale-norm`'s commands (`cli.py` parses the command line).

Each takes the parsed arguments and returns the exit code; user mistakes raise `UserError`.
vLLM is imported inside the commands that need it, so `plot` and `--help` start fast.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from telltale_norm.demo import FULL_SIZE, QUICK_SIZE
from telltale_norm.local_engine import UserError

CALIBRATE_PROBLEMS = 64  # bundled word problems calibrate runs by default

# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from telltale_norm.demo import DemoOptions, parse_methods, run_demo

    n_problems, max_tokens = QUICK_SIZE if args.quick else FULL_SIZE
    run_demo(DemoOptions(
        model=args.model, methods=parse_methods(args.methods),
        n_problems=args.n_problems or n_problems, max_tokens=args.max_tokens or max_tokens,
        out=args.out, compile=args.compile, dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
        rerank_k=args.rerank_k, tau_q=args.tau_q, verbose=args.verbose))
    return 0


# ---------------------------------------------------------------- calibrate


def read_prompt_file(path: str) -> list[dict[str, str]]:
    """A JSON-lines file's prompts: {"prompt": text} (sent as it is) or {"question": text}
    (to be wrapped in the chat template); "prompt" wins when a line has both."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UserError(f"--prompts {path}: cannot read it ({err.strerror})") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--prompts {path}, line {number}: not JSON ({err.msg})") from None
        key = next((k for k in ("prompt", "question")
                    if isinstance(item, dict) and isinstance(item.get(k), str)), None)
        if key is None:
            raise UserError(f"--prompts {path}, line {number}: needs a \"prompt\" or "
                            "\"question\" string field")
        items.append({key: item[key]})
    if not items:
        raise UserError(f"--prompts {path}: the file holds no prompts")
    return items


def cmd_calibrate(args: argparse.Namespace) -> int:
    import telltale_norm
    from telltale_norm.local_engine import engine, progress_bar, resolve_model
    from telltale_norm.problems import chat_prompts, load_problems
    from telltale_norm.thresholds import load_calibrated_tau

    if args.prompts:
        items = read_prompt_file(args.prompts)[:args.n]
        source = f"{len(items)} prompts of {args.prompts}"
    else:
        problems, source = load_problems(args.n or CALIBRATE_PROBLEMS)
        items = [{"question": p.question} for p in problems]
    model = resolve_model(args.model)
    print(f"model: {model}\nprompts: {source}")

    from vllm import SamplingParams

    with engine(model, compile=args.compile, dtype=args.dtype,
                max_model_len=max(1024, args.max_tokens + 512),
                gpu_memory_utilization=args.gpu_memory_utilization, verbose=args.verbose,
                method="monitor", layers=args.layers) as llm:
        chat = iter(chat_prompts(llm, [i["question"] for i in items if "question" in i]))
        prompts = [i["prompt"] if "prompt" in i else next(chat) for i in items]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                     use_tqdm=progress_bar("calibrate"))
        record = telltale_norm.calibration(llm, args.layers)
    if not record["per_layer"]:
        raise UserError("no decode tokens were observed; raise --max-tokens")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    # The engine's own reader, so the printed tau is exactly what VLLM_PATCH_Q would give.
    tau = load_calibrated_tau(args.out, args.q)
    counts = sorted({entry["count"] for entry in record["per_layer"].values()})
    print(f"\nwrote {args.out}: percentiles p1..p99 of decode-token norms for layers "
          f"{','.join(map(str, tau))} ({'/'.join(map(str, counts))} tokens per layer)\n"
          f"# fixed tau at q={args.q:g}, ready to paste:\n"
          f"PATCHED_LAYERS={','.join(map(str, tau))}\n"
          f"PATCHED_TAU_JSON='{json.dumps({str(k): round(v, 4) for k, v in tau.items()})}'\n"
          f"# or let the engine read the file:\n"
          f"VLLM_PATCH_STATE_PATH={args.out} VLLM_PATCH_Q={args.q:g}")
    return 0


# ---------------------------------------------------------------- plot


def cmd_plot(args: argparse.Namespace) -> int:
    from telltale_norm.plot import figure_size_px, plot_traces
    from telltale_norm.traces import RequestTrace

    path = args.trace_file
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err.msg} at char {err.pos})") from None
    items = data.get("traces") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty list of traces, or {{\"traces\": [...]}}")
    try:
        traces = [RequestTrace.from_dict(item) for item in items]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: not a list of trace dicts "
                        f"(RequestTrace.to_dict format): {type(err).__name__} {err}") from None

    ids = list(dict.fromkeys(t.request_id for t in traces))
    request = args.request if args.request is not None else ids[0]
    chosen = [(item, t) for item, t in zip(items, traces) if t.request_id == request]
    if not chosen:
        more = ", ..." if len(ids) > 10 else ""
        raise UserError(f"--request {request}: no such request in {path}; it holds "
                        f"{', '.join(ids[:10])}{more}")
    labels = [item.get("method") or (f"{t.request_id} #{t.index}" if len(chosen) > 1
                                     else t.request_id) for item, t in chosen]
    out = args.out or Path(path).with_name(
        f"{Path(path).stem}-{re.sub(r'[^A-Za-z0-9_.-]', '_', request)}.png")
    plot_traces([t for _, t in chosen], out, labels, title=f"norm trace of request {request}")
    layers = sorted({layer for _, t in chosen for layer in t.layers})
    width, height = figure_size_px(len(layers))
    print(f"wrote {out} ({width}x{height} px): request {request}, {len(chosen)} trace(s), "
          f"layers {','.join(map(str, layers))}")
    if args.request is None and len(ids) > 1:
        print(f"({path} holds {len(ids)} requests; choose one with --request ID)")
    return 0


# ---------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from telltale_norm import doctor, doctor_engine
    from telltale_norm.local_engine import resolve_model

    checks = doctor.installation_checks(args.model, args.vllm_source)
    if args.engine is not None:
        checks += doctor_engine.engine_checks(resolve_model(args.engine or None), args)
    return doctor.print_checks(checks)
