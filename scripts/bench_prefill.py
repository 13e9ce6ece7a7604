"""Prefill benchmark: the MoE part of one model forward at several prompt lengths, per variant.

A stack of L MoE layers of a preset model runs as in a forward pass: per layer, routing
(softmax and top-k of random router logits, as fused_moe does) and the layer, the output of
one layer (RMS-normalized, to keep values O(1)) feeding the next. The whole stack is timed
per prompt length for the fused, unfused and dispatcher-chosen variants, with configs from
the dispatcher's tables. Attention, norms and everything else in a real forward are left out,
so the times are the MoE share of time-to-first-token, not TTFT itself.

    python scripts/bench_prefill.py [--model Qwen3-30B-A3B] [--layers 48] [--lengths 512,1024] [--out DIR]

Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "Qwen3-30B-A3B"
DEFAULT_LENGTHS = "512,1024,2048,4096,8192,16384"
VARIANTS = ("unfused", "fused", "dispatcher")
WEIGHT_MARGIN = 1.2  # per-layer weights only when they fit with 20% to spare
TIMED_RUNS = 5
SEED_CLAIM = ("SGLang PR #19672 reports TTFT 254 -> 182 ms for a full model with the fused MoE; "
              "the MoE layers are only part of TTFT")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in preset (default {DEFAULT_MODEL})")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers in the stack (default: the model's)")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"prompt lengths in tokens (default {DEFAULT_LENGTHS})")
    parser.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size: divides the intermediate size")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the JSON results (default ./out)")
    return parser.parse_args(argv)


@dataclass
class Layer:
    w1: object  # torch.Tensor [E, 2N, K]
    w2: object  # torch.Tensor [E, K, N]


@dataclass
class Timing:
    ms: float
    method: str  # "cuda graph" or "eager"


def build_layers(shape, count: int, dtype, seed: int) -> tuple[list[Layer], bool]:
    """Each layer its own weights when they fit in free memory with margin; else one set reused."""
    import torch

    from moetune.bench import make_weights

    per_layer = 3 * shape.E * shape.N * shape.K * dtype.itemsize
    free, _ = torch.cuda.mem_get_info()
    own = count * per_layer * WEIGHT_MARGIN <= free
    generator = torch.Generator(device="cuda").manual_seed(seed)
    layers: list[Layer] = []
    for _ in range(count if own else 1):
        layers.append(Layer(*make_weights(shape.E, shape.N, shape.K, dtype, "cuda", generator)))
    if not own:
        layers = layers * count
    return layers, own


def stack_forward(layers: list[Layer], x, router_logits, topk: int, renormalize: bool, selection, variant: str):
    """One forward of the MoE stack: routing, the layer, normalization, layer after layer."""
    import torch

    from moetune import fused_moe

    hidden = x
    for layer, logits in zip(layers, router_logits):
        out = fused_moe(hidden, layer.w1, layer.w2, logits, topk, renormalize=renormalize, variant=variant,
                        config=selection.gemm1, down_config=selection.gemm2, switches=selection.switches)
        hidden = torch.nn.functional.rms_norm(out, (out.shape[1],), eps=1e-6)
    return hidden


def time_stack(forward: Callable[[], object]) -> Timing:
    """Milliseconds per forward: a CUDA graph of the whole stack if it captures, else eager."""
    import torch

    from moetune.bench import cuda_graph_time_us

    try:
        ms = cuda_graph_time_us(forward, calls_per_graph=1, replays=TIMED_RUNS, warmup=1) / 1e3
        method = "cuda graph"
    except RuntimeError as error:
        torch.cuda.synchronize()
        print(f"note: the stack did not capture in a CUDA graph ({str(error).splitlines()[0][:120]}); timing eager")
        ms, method = eager_ms(forward), "eager"
    torch.cuda.empty_cache()
    return Timing(ms, method)


def eager_ms(forward: Callable[[], object]) -> float:
    """Median of TIMED_RUNS eager forwards, timed with CUDA events."""
    import torch

    forward()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_RUNS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_RUNS)]
    for start, end in zip(starts, ends):
        start.record()
        forward()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def measure(shape, layers: list[Layer], lengths: list[int], dtype, dtype_name: str, seed: int) -> list[dict]:
    results = []
    for tokens in lengths:
        row = measure_length(shape, layers, tokens, dtype, dtype_name, seed)
        results.append(row)
        print_row(row)
    return results


def measure_length(shape, layers: list[Layer], tokens: int, dtype, dtype_name: str, seed: int) -> dict:
    """Every variant's stack at one prompt length; its inputs are freed on return, before the
    next length allocates its own."""
    import torch

    from moetune.loader import get_config

    generator = torch.Generator(device="cuda").manual_seed(seed * 1_000_003 + tokens)
    x = torch.randn(tokens, shape.K, dtype=dtype, device="cuda", generator=generator)
    # Router logits in fp32, as routers compute them; one random set per layer.
    logits = torch.randn(len(layers), tokens, shape.E, device="cuda", generator=generator)
    row = {"tokens": tokens, "variants": {}}
    for name in VARIANTS:
        selection = get_config(shape.E, shape.N, shape.K, shape.topk, dtype_name, tokens,
                               variant=None if name == "dispatcher" else name)
        variant = selection.variant if name == "dispatcher" else name

        def forward(selection=selection, variant=variant):
            return stack_forward(layers, x, logits, shape.topk, shape.renormalize, selection, variant)

        finite = bool(torch.isfinite(forward()).all())
        timing = time_stack(forward)
        row["variants"][name] = {"ms": timing.ms, "timing": timing.method, "variant": variant,
                                 "source": selection.source, "table_batch_size": selection.batch_size,
                                 "gemm1": selection.gemm1.to_json(), "gemm2": selection.gemm2.to_json(),
                                 "switches": selection.switches.to_json(), "output_finite": finite}
    row["fused_speedup"] = row["variants"]["unfused"]["ms"] / row["variants"]["fused"]["ms"]
    row["fused_saves_ms"] = row["variants"]["unfused"]["ms"] - row["variants"]["fused"]["ms"]
    return row


def print_header() -> None:
    print(f"{'tokens':>7s} {'unfused ms':>11s} {'fused ms':>9s} {'dispatch ms':>12s} {'pick':>8s} "
          f"{'f speedup':>10s} {'f saves ms':>11s} {'timing':>10s}")


def print_row(row: dict) -> None:
    v = row["variants"]
    print(f"{row['tokens']:7d} {v['unfused']['ms']:11.2f} {v['fused']['ms']:9.2f} {v['dispatcher']['ms']:12.2f} "
          f"{v['dispatcher']['variant']:>8s} {row['fused_speedup']:10.3f} {row['fused_saves_ms']:11.2f} "
          f"{v['fused']['timing']:>10s}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moetune.bench import on_gpu  # imported after parsing: --help needs neither torch nor a GPU

    if not on_gpu():
        print("bench_prefill: needs a CUDA GPU (none found, or TRITON_INTERPRET=1 is set)", file=sys.stderr)
        return 2
    import torch
    import triton

    import moetune
    from moetune.device import local_device
    from moetune.errors import UsageError
    from moetune.shapes import get_preset, parse_batch_sizes
    from moetune.tables import write_atomic

    try:
        shape = get_preset(args.model, args.tp_size)
        lengths = parse_batch_sizes(args.lengths)
        count = args.layers if args.layers is not None else shape.num_layers
        if count is None or count < 1:
            raise UsageError(f"--layers must be a positive integer, got {count!r}")
    except UsageError as error:
        print(f"bench_prefill: {error}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out_dir = Path(args.out or "out")
    device = local_device()

    layers, own_weights = build_layers(shape, count, dtype, args.seed)
    weights_gb = 3 * shape.E * shape.N * shape.K * dtype.itemsize * count / 1e9
    print(f"{shape.describe()}, tp {args.tp_size}, {args.dtype}, {count} MoE layers, on {device.name}")
    if own_weights:
        print(f"each layer has its own weights ({weights_gb:.1f} GB in all)")
    else:
        print(f"per-layer weights ({weights_gb:.1f} GB) do not fit in free memory with a 20% margin: "
              f"one layer's weights are reused {count} times")
    print(f"per forward: routing (softmax/top-k of random logits) + layer + RMS norm, x {count} layers; "
          f"median of {TIMED_RUNS} runs")
    print_header()
    results = measure(shape, layers, lengths, dtype, args.dtype, args.seed)

    print(f"\nseed claim: {SEED_CLAIM}.")
    print(f"measured here: the MoE layers alone ({count} layers); 'f saves ms' is unfused minus fused per forward "
          f"at each prompt length.")
    document = {
        "metadata": {
            "device": device.name, "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                                "moetune": moetune.__version__},
            "command_line": shlex.join([sys.executable, *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": shape.name, "shape": {"E": shape.E, "N": shape.N, "K": shape.K, "topk": shape.topk},
            "tp_size": args.tp_size, "dtype": args.dtype, "layers": count, "own_weights_per_layer": own_weights,
            "timed_runs": TIMED_RUNS, "seed": args.seed, "seed_claim": SEED_CLAIM,
        },
        "results": results,
    }
    path = out_dir / f"bench_prefill_{shape.name}_tp{args.tp_size}_{args.dtype}.json"
    write_atomic(path, json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
