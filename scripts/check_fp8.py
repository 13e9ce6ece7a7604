"""The fp8 layer on the GPU, checked against its float64 reference and timed beside bf16.

The reference is moetune.quant.fp8_moe_reference (emulated quantization); the bf16 layer
runs the same weights with the same launch configs.

First the quantization kernels against moetune.quant, bit for bit, on the GPU. Then per
shape, M, GEMM 2 variant and switch set: the fp8 layer (hidden states quantized inside the
timed region) checked against moetune.quant.fp8_moe_reference with quant.FP8_TOLERANCE, its
error against the unquantized float64 layer reported, and its time next to the bf16 layer
of the same weights and configs. Configs: Qwen3-30B-A3B from the packaged tuned bf16 table;
DeepSeek-V3 at TP8 (N 256) from the packaged anchor files of DeepSeek-V3 at TP4 (N 512, the
nearest shipped shape); BLOCK_SIZE_K is cut to the block's block_k where it does not divide
it (for both layers). Alignment is outside the timed region; CUDA graph of 5 calls, median
of 10 replays.

    python scripts/check_fp8.py [--shapes deepseek-tp8,qwen3] [--m 1,16,256,4096]
                                [--modes block,per-tensor] [--switches off,sorted+tma]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from moetune.bench import cuda_graph_time_us, make_layer_inputs, make_weights
from moetune.kernels import KernelSwitches, align_tokens, quantize_per_tensor, quantize_per_token_group, run_experts
from moetune.quant import fp8_moe_reference, fp8_tolerance, quantize_activations, quantize_weights
from moetune.reference import TOLERANCE, moe_reference, relative_error
from probe_switches import configs_for  # scripts/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent.parent
ANCHOR = ROOT / "moetune/baselines/sglang-vllm-h200"
SHAPES = {  # name -> (E, topk, K, N, tuned table or (GEMM 1 file, GEMM 2 file))
    "deepseek-tp8": (256, 8, 7168, 256, (ANCHOR / "E=256,N=512,device_name=NVIDIA_H200.json",
                                         ANCHOR / "E=256,N=512,device_name=NVIDIA_H200_down.json")),
    "qwen3": (128, 8, 2048, 768, ROOT / "tuned_configs/NVIDIA_H200/E=128,N=768,K=2048,topk=8,dtype=bf16.json"),
}
MODES = {"block": [128, 128], "per-tensor": None}
SWITCHES = {
    "off": KernelSwitches(),
    "sorted": KernelSwitches(sorted_rows=True),
    "sorted+tma": KernelSwitches(sorted_rows=True, tma_activations=True, tma_weights=True),
    "silu": KernelSwitches(fuse_activation=True),
    "persistent": KernelSwitches(persistent=True),
    "split_k2": KernelSwitches(split_k=2),
}
def fit_block_k(config: dict, block_k: int) -> dict:
    return config if block_k % config["BLOCK_SIZE_K"] == 0 else dict(config, BLOCK_SIZE_K=block_k)


def check_quantization(device: torch.device) -> list[str]:
    """The quantization kernels against moetune.quant on this GPU: names of those that differ."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(257, 7168, generator=generator, device=device) *
         torch.logspace(-6, 3, 7168, device=device)).to(torch.bfloat16)
    failures = []
    for name, ours, theirs in (("per token group", quantize_per_token_group(x, 128), quantize_activations(x, 128)),
                               ("per tensor", quantize_per_tensor(x), quantize_activations(x))):
        same = torch.equal(ours[0].view(torch.uint8), theirs[0].view(torch.uint8)) and torch.equal(ours[1], theirs[1])
        print(f"quantization {name}: {'bit-exact' if same else 'DIFFERS'} against moetune.quant", flush=True)
        if not same:
            failures.append(name)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="deepseek-tp8,qwen3", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--m", default="1,16,256,4096", help="batch sizes, comma-separated")
    parser.add_argument("--modes", default="block,per-tensor", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--switches", default="off,sorted+tma", help=f"comma-separated, of {', '.join(SWITCHES)}")
    parser.add_argument("--out", default="out", help="folder for check_fp8.json")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no new batch size after this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_fp8.py needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    device = torch.device("cuda")
    failures: list = [("quantization", name) for name in check_quantization(device)]
    rows = []
    for key in args.shapes.split(","):
        E, topk, K, N, source = SHAPES[key]
        generator = torch.Generator(device=device).manual_seed(0)
        w1, w2 = make_weights(E, N, K, torch.bfloat16, device, generator)
        quantized = {mode: (quantize_weights(w1, MODES[mode]), quantize_weights(w2, MODES[mode]))
                     for mode in args.modes.split(",")}
        for M in [int(v) for v in args.m.split(",")]:
            if time.monotonic() - started > args.budget_s:
                print(f"budget spent: skipping {key} M={M}", flush=True)
                continue
            inputs = make_layer_inputs(M, w1, w2, topk, seed=M)
            x, weights, ids = inputs.x, inputs.topk_weights, inputs.topk_ids
            exact = moe_reference(x, w1, w2, weights, ids)
            references = {mode: fp8_moe_reference(x, w1q, w2q, s1, s2, weights, ids, MODES[mode])
                          for mode, ((w1q, s1), (w2q, s2)) in quantized.items()}
            for variant in ("unfused", "fused"):
                base1, base2 = configs_for(source, M, variant)
                gemm1, gemm2 = fit_block_k(base1, 128), fit_block_k(base2, 128)
                out = torch.empty_like(x)
                for name in args.switches.split(","):
                    switches = SWITCHES[name]
                    g2 = dict(gemm2, BLOCK_SIZE_M=gemm1["BLOCK_SIZE_M"]) if switches.sorted_rows else gemm2
                    a1 = align_tokens(ids, E, gemm1["BLOCK_SIZE_M"])
                    a2 = a1 if g2["BLOCK_SIZE_M"] == gemm1["BLOCK_SIZE_M"] else align_tokens(ids, E, g2["BLOCK_SIZE_M"])
                    run = functools.partial(run_experts, topk_weights=weights, topk_ids=ids, aligned1=a1,
                                            aligned2=a2, gemm1_config=gemm1, gemm2_config=g2, switches=switches,
                                            atomic_add=variant == "fused", out=out)
                    layers = {"bf16": functools.partial(run, x, w1, w2)}
                    for mode, ((w1q, s1), (w2q, s2)) in quantized.items():
                        layers[mode] = functools.partial(run, x, w1q, w2q, w1_scale=s1, w2_scale=s2,
                                                         block_shape=MODES[mode])
                    times = {}
                    for layer_name, layer in layers.items():
                        label = f"{key} M={M} {variant} {name} {layer_name}"
                        try:
                            out.fill_(float("nan"))
                            result = layer()
                            loss = relative_error(result, exact)
                            error = loss if layer_name == "bf16" else relative_error(result, references[layer_name])
                            tolerance = TOLERANCE[torch.bfloat16] if layer_name == "bf16" else fp8_tolerance(MODES[layer_name])
                            if not error <= tolerance:
                                failures.append((label, error))
                                print(f"FAIL {label}: rel err {error:.2e} > {tolerance:.0e}", flush=True)
                                continue
                            times[layer_name] = cuda_graph_time_us(layer, calls_per_graph=5, replays=10)
                        except Exception as exc:  # noqa: BLE001 - reported, not fatal
                            failures.append((label, repr(exc)[:200]))
                            print(f"ERROR {label}: {exc!r}"[:300], flush=True)
                            continue
                        ratio = times[layer_name] / times["bf16"] if "bf16" in times else float("nan")
                        rows.append({"shape": key, "M": M, "variant": variant, "switches": name, "layer": layer_name,
                                     "us": times[layer_name], "vs_bf16": ratio, "rel_error": error,
                                     "rel_error_unquantized": loss, "gemm1": gemm1, "gemm2": g2})
                        print(f"{key:12s} M={M:<5d} {variant:8s} {name:11s} {layer_name:10s} {times[layer_name]:9.1f} us"
                              f"  x{ratio:5.3f} vs bf16  err {error:.1e}  vs unquantized {loss:.1e}", flush=True)
        del w1, w2, quantized
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_fp8.json").write_text(json.dumps({"rows": rows, "failures": failures}, indent=1,
                                                              default=str))
    print(f"checks failed or errored: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
