"""One UltraMemV2 layer of 227m.toml compiled under Inductor options that change how the host
launches kernels, each against the default:

- `cpp_wrapper`: Inductor's wrapper code compiled to C++ instead of Python;
- `static_launch_user_defined_triton_kernels`: user-defined Triton kernels (our ops' kernels,
  which Inductor emits in its code) launched by Inductor's static launcher, as it launches its
  own, instead of through Triton's Python launcher.

Per option set: the training forward and backward at 12,288 tokens (wall time per call back to
back, GPU time and launches under the profiler, the output and the input's gradient against the
default compile), then the eval forward at decode shapes (wall time, the output against eager),
then a plain two-layer MLP's backward, which tells Inductor's own failures from our ops'. A failure
is printed and recorded, and the next measurement runs; a set this torch does not know is skipped.
Each set compiles afresh (Dynamo's caches reset), and its outputs are compared with the default's.

    PYTHONPATH=. python -m perf.diagnostics.inductor_options [--log $OUT/log.jsonl]   # CUDA only
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch._dynamo.config
import torch._inductor.config

from perf import records
from perf.diagnostics.host_path import wall_us
from perf.gpu_e2e import build_layer_227m, kernel_times

OPTION_SETS = {
    "default": {},
    "cpp_wrapper": {"cpp_wrapper": True},
    "static user launches": {"static_launch_user_defined_triton_kernels": True},
}


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def mlp_backward(options: dict) -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    torch.compile(mlp, options=options or None)(x).square().sum().backward()
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64], help="decode token counts")
    parser.add_argument("--log", help="append the records to this results log")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("inductor_options needs a CUDA device", file=sys.stderr)
        return 2
    torch._dynamo.config.recompile_limit = 64  # one compile per option set and shape
    mcfg, layer, tables, u, grad_y = build_layer_227m()
    u = u.detach().to(torch.bfloat16).requires_grad_()
    env = records.environment()
    recs = []
    reference = None

    def rec(shape: str, name: str, us: float | None = None, **kw) -> None:
        recs.append(
            records.record(
                env, "layer", "inductor_options", shape, name, time=us, unit="us" if us is not None else None, **kw
            )
        )

    def train_step(compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = compiled(u, tables)[0]
        u.grad = None
        y.backward(grad_y)
        return y

    known = torch._inductor.config.get_config_copy()
    # the static launcher for user kernels needs the static launcher itself
    print("use_static_cuda_launcher:", known.get("use_static_cuda_launcher"))
    print(f"{'option set':22} {'shape':16} {'wall µs':>9} {'GPU µs':>9} {'launches':>8}  against the default")
    for name, options in OPTION_SETS.items():
        unknown = sorted(set(options) - set(known))
        if unknown:
            print(f"{name:22} skipped: this torch has no {', '.join(unknown)}")
            rec("all", name, error=f"unknown Inductor options: {unknown}")
            continue
        torch._dynamo.reset()
        layer.train()
        shape = "T=12288 fwd+bwd"
        try:
            compiled = torch.compile(layer, fullgraph=True, dynamic=False, options=options or None)
            step = functools.partial(train_step, compiled)
            y = step().float()
            got = (y, u.grad.float())
            if name == "default":
                reference, diff = got, 0.0
            else:
                diff = None if reference is None else max((a - b).abs().max().item() for a, b in zip(got, reference))
            us = min(wall_us(step, 20) for _ in range(3))
            ks = kernel_times(step, 5)
            gpu, launches = sum(t for _, t, _ in ks), sum(n for _, _, n in ks)
            shown = "n/a" if diff is None else f"{diff:.3g}"
            print(f"{name:22} {shape:16} {us:9.1f} {gpu:9.1f} {launches:8.1f}  max |diff| {shown}")
            rec(shape, name, us, extra={"gpu_us": gpu, "launches": launches, "max_abs_diff_default": diff})
        except Exception as exc:
            print(f"{name:22} {shape:16} failed: {first_line(exc)}")
            rec(shape, name, error=first_line(exc))
        layer.eval()
        for tokens in args.tokens:
            shape = f"T={tokens} fwd"
            x = torch.randn(1, tokens, mcfg.dim, device="cuda", dtype=torch.bfloat16)

            def forward(m, x=x):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return m(x, tables)[0].float()

            try:
                compiled = torch.compile(layer, fullgraph=True, dynamic=False, options=options or None)
                diff = (forward(compiled) - forward(layer)).abs().max().item()
                us = min(wall_us(lambda: forward(compiled), 200) for _ in range(3))
                print(f"{name:22} {shape:16} {us:9.1f} {'':9} {'':8}  max |diff| against eager {diff:.3g}")
                rec(shape, name, us, note="eval, inference mode", extra={"max_abs_diff_eager": diff})
            except Exception as exc:
                print(f"{name:22} {shape:16} failed: {first_line(exc)}")
                rec(shape, name, error=first_line(exc))
        try:
            mlp_backward(options)
            print(f"{name:22} {'MLP backward':16} compiles and runs")
            rec("MLP fwd+bwd", name, note="compiles and runs")
        except Exception as exc:
            print(f"{name:22} {'MLP backward':16} failed: {first_line(exc)}")
            rec("MLP fwd+bwd", name, error=first_line(exc))
    if args.log:
        records.append(args.log, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
