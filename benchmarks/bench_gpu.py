"""GPU quantization throughput: qtool's fused kernels against bitsandbytes and the copy ceiling.

    python benchmarks/bench_gpu.py [--rows 4096] [--cols 11008] [--repeat 30] [--sweep]

On 4096 x 11008 bf16 matrices (several, rotated, so no run reads a matrix the cache still holds)
it times, with CUDA events after a warm-up, the median of ``--repeat`` calls (*per call*: from
before the call's host work to the end of its GPU work) of:

- qtool's fused kernels: NF4 + double quant, NF4, int8-sym, int4-sym (groups of 128), Q8_0,
  Q4_0, Q4_K, Q5_K, Q6_K (NF4's, int8's and int4's results stay on the GPU as bitsandbytes' do,
  and a second row adds the host sync that reads back NF4's offset or the inf/NaN flags; the GGML
  types need no sync);
- the same schemes' torch code on the GPU (``QTOOL_FUSED``-free path, for reference);
- bitsandbytes' ``quantize_4bit`` (NF4, blocks of 64) with and without ``compress_statistics``;
- a device-to-device copy of the same bytes (counting bytes read plus written).

Two more columns for bitsandbytes and the rows without a host sync:
*pipelined*, calls issued back to back with one sync at the end (throughput when the host keeps
the GPU fed: the slower of host work and GPU work per call), and *GPU*, with the stream held by a
sleep kernel while the host queues the call (GPU work alone). Per-call figures depend on the
host's speed: a Triton launch costs the host 10-30 us.

Throughput is GB/s of bf16 input (1 GB = 1e9 bytes). A table goes to stdout, and the same data as
JSON to ``$QTOOL_BENCH_JSON`` when set, else to stdout after the table. ``--sweep`` also times a
few launch configurations of the NF4 and Q4_K kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtool.kernels import kernel_for  # noqa: E402
from qtool.schemes.base import get_scheme  # noqa: E402


@dataclass
class Result:
    name: str
    median_ms: float
    gb_per_s: float
    vs_bnb_nf4_dq: float | None = None
    vs_copy: float | None = None
    note: str = ""
    pipelined_gb_per_s: float | None = None
    gpu_gb_per_s: float | None = None


@dataclass
class Report:
    device: str
    torch: str
    triton: str
    bitsandbytes: str | None
    shape: tuple[int, int]
    dtype: str
    input_bytes: int
    repeat: int
    copy_gb_per_s: float = 0.0
    results: list[Result] = field(default_factory=list)


def time_call(fn, inputs: list[torch.Tensor], repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of fn(x) over ``repeat`` calls, cycling through ``inputs``."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x = inputs[i % len(inputs)]
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_pipelined(fn, inputs: list[torch.Tensor], calls: int = 40) -> float:
    """Milliseconds per call of ``calls`` calls issued back to back, one sync at the end."""
    for i in range(3):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn(inputs[i % len(inputs)])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def time_gpu(fn, inputs: list[torch.Tensor], repeat: int) -> float:
    """Median milliseconds of GPU work per call: a sleep kernel holds the stream while the host
    queues the call, so host work overlaps it (only for calls that do not sync inside)."""
    times = []
    for i in range(repeat):
        torch.cuda.synchronize()
        torch.cuda._sleep(3_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--matrices", type=int, default=4)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-torch-path", action="store_true", help="skip the schemes' torch code on the GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    import triton

    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
        bnb_version = bitsandbytes.__version__
    except Exception as exc:  # noqa: BLE001 - report and go on without the peer
        print(f"bench_gpu: bitsandbytes unavailable ({exc})", file=sys.stderr)
        bnb_functional, bnb_version = None, None

    generator = torch.Generator(device="cuda").manual_seed(0)
    inputs = [(torch.randn(args.rows, args.cols, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
              for _ in range(args.matrices)]
    input_bytes = inputs[0].numel() * inputs[0].element_size()
    report = Report(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    bitsandbytes=bnb_version, shape=(args.rows, args.cols), dtype="bfloat16",
                    input_bytes=input_bytes, repeat=args.repeat)

    def add(name: str, ms: float, note: str = "", bytes_moved: int | None = None, fn=None) -> Result:
        result = Result(name=name, median_ms=round(ms, 4), gb_per_s=round((bytes_moved or input_bytes) / ms / 1e6, 1),
                        note=note)
        if fn is not None:
            result.pipelined_gb_per_s = round(input_bytes / time_pipelined(fn, inputs) / 1e6, 1)
            result.gpu_gb_per_s = round(input_bytes / time_gpu(fn, inputs, args.repeat) / 1e6, 1)
        report.results.append(result)
        print(f"  {name:<34} {ms:8.3f} ms  {result.gb_per_s:8.1f} GB/s", file=sys.stderr, flush=True)
        return result

    # Copy ceiling: read + write of the same bytes.
    destination = torch.empty_like(inputs[0])
    copy_ms = time_call(lambda x: destination.copy_(x), inputs, args.repeat)
    copy = add("d2d copy (read+write)", copy_ms, "bytes read + written", bytes_moved=2 * input_bytes)
    report.copy_gb_per_s = copy.gb_per_s

    if bnb_functional is not None:
        for compress in (True, False):
            def bnb_call(x, c=compress):
                return bnb_functional.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=c)

            ms = time_call(bnb_call, inputs, args.repeat)
            add(f"bitsandbytes nf4{' + dq' if compress else ''}", ms, "quantize_4bit, blocksize 64", fn=bnb_call)

    fused_cases = [("qtool nf4 + dq", "nf4", {}), ("qtool nf4", "nf4", {"double_quant": False}),
                   ("qtool int8-sym", "int8-sym", {}), ("qtool int4-sym g128", "int4-sym", {}),
                   ("qtool Q8_0", "Q8_0", {}), ("qtool Q4_0", "Q4_0", {}), ("qtool Q4_K", "Q4_K", {}),
                   ("qtool Q5_K", "Q5_K", {}), ("qtool Q6_K", "Q6_K", {})]
    from qtool.kernels import integer as int_kernels
    from qtool.kernels import nf4 as nf4_kernels

    # Like bitsandbytes' quantize_4bit, these leave their results on the GPU (the value the host
    # needs, NF4's offset or the inf/NaN flags, is read when the sink copies the tensor back); a
    # second row adds that read-back (the scheme's own call).
    results_on_gpu = {
        "qtool nf4 + dq": lambda x: nf4_kernels.quantize_4bit_async(x, "nf4", 64, True),
        "qtool nf4": lambda x: nf4_kernels.quantize_4bit_async(x, "nf4", 64, False),
        "qtool int4-sym g128": lambda x: int_kernels.quantize_int_async(x, 4, True, 128),
        "qtool int8-sym": int_kernels.quantize_int8_rows_async,
    }
    for label, name, params in fused_cases:
        kernel = kernel_for(get_scheme(name))
        if label in results_on_gpu:
            call = results_on_gpu[label]
            ms = time_call(call, inputs, args.repeat)
            add(label, ms, "fused Triton kernels, results on the GPU", fn=call)
            ms = time_call(lambda x, k=kernel, p=params: k(x, **p), inputs, args.repeat)
            add(label + ", read back", ms, "fused Triton kernels, then one host sync")
            continue
        call = lambda x, k=kernel, p=params: k(x, **p)  # noqa: E731
        ms = time_call(call, inputs, args.repeat)
        # The GGML kernels need no host sync: pipelined and GPU too.
        add(label, ms, "fused Triton kernel", fn=call)

    # The float encodings (compressed-tensors FP8 / NVFP4 / MXFP4, GGUF MXFP4): their torch code on the GPU.
    for label, name in (("qtool fp8", "fp8"), ("qtool fp8-block", "fp8-block"), ("qtool nvfp4a16", "nvfp4a16"),
                        ("qtool mxfp4a16", "mxfp4a16"), ("qtool MXFP4 (GGUF)", "MXFP4")):
        scheme = get_scheme(name)
        call = lambda x, s=scheme: s.quantize(x)  # noqa: E731
        ms = time_call(call, inputs, args.repeat)
        add(label, ms, "scheme torch code on cuda", fn=call)

    if args.sweep:
        from qtool.kernels import ggml as ggml_kernels

        nf4_default = nf4_kernels._ELEMENTS_PER_PROGRAM, nf4_kernels._NUM_WARPS, nf4_kernels._USE_CELLS
        for cells in (True, False):
            for elements, warps in ((1024, 2), (2048, 4), (4096, 4), (4096, 8), (8192, 8)):
                nf4_kernels._ELEMENTS_PER_PROGRAM, nf4_kernels._NUM_WARPS, nf4_kernels._USE_CELLS = elements, warps, cells
                ms = time_call(lambda x: nf4_kernels.quantize_4bit_async(x, "nf4", 64, True), inputs, args.repeat)
                add(f"sweep nf4+dq {'cells' if cells else 'search'} e{elements} w{warps}", ms, "launch configuration")
        nf4_kernels._ELEMENTS_PER_PROGRAM, nf4_kernels._NUM_WARPS, nf4_kernels._USE_CELLS = nf4_default

        for block, warps in ((1024, 4), (2048, 4), (4096, 8)):
            int_kernels._TWO_PASS_BLOCK, int_kernels._TWO_PASS_WARPS = block, warps
            ms = time_call(lambda x: int_kernels.quantize_int8_rows(x), inputs, args.repeat)
            add(f"sweep int8-sym b{block} w{warps}", ms, "launch configuration")
        int_kernels._TWO_PASS_BLOCK, int_kernels._TWO_PASS_WARPS = 4096, 8
        k_default = ggml_kernels._SUPER_BLOCKS, ggml_kernels._NUM_WARPS_K
        for super_blocks, warps in ((4, 1), (8, 2), (16, 4), (32, 8)):
            ggml_kernels._SUPER_BLOCKS, ggml_kernels._NUM_WARPS_K = super_blocks, warps
            ms = time_call(lambda x: ggml_kernels.quantize_ggml(x, "Q4_K"), inputs, max(5, args.repeat // 3))
            add(f"sweep Q4_K sb{super_blocks} w{warps}", ms, "launch configuration")
        ggml_kernels._SUPER_BLOCKS, ggml_kernels._NUM_WARPS_K = k_default
        q6_default = ggml_kernels._SUPER_BLOCKS_Q6, ggml_kernels._NUM_WARPS_Q6
        for super_blocks, warps in ((4, 2), (8, 4), (16, 8)):
            ggml_kernels._SUPER_BLOCKS_Q6, ggml_kernels._NUM_WARPS_Q6 = super_blocks, warps
            ms = time_call(lambda x: ggml_kernels.quantize_ggml(x, "Q6_K"), inputs, max(5, args.repeat // 3))
            add(f"sweep Q6_K sb{super_blocks} w{warps}", ms, "launch configuration")
        ggml_kernels._SUPER_BLOCKS_Q6, ggml_kernels._NUM_WARPS_Q6 = q6_default
        rows_default = ggml_kernels._ROWS_32, ggml_kernels._NUM_WARPS_32
        for rows, warps in ((64, 4), (128, 4), (256, 8)):
            ggml_kernels._ROWS_32, ggml_kernels._NUM_WARPS_32 = rows, warps
            ms = time_call(lambda x: ggml_kernels.quantize_ggml(x, "Q4_0"), inputs, args.repeat)
            add(f"sweep Q4_0 r{rows} w{warps}", ms, "launch configuration")
        ggml_kernels._ROWS_32, ggml_kernels._NUM_WARPS_32 = rows_default

    if not args.no_torch_path:
        # The schemes' own torch code on the GPU (what runs without the kernels).
        from qtool.kernels import triton_available

        os.environ["QTOOL_FUSED"] = "0"
        triton_available.cache_clear()
        for label, name in (("torch path nf4 + dq", "nf4"), ("torch path Q4_0", "Q4_0"),
                            ("torch path int8-sym", "int8-sym"), ("torch path Q6_K", "Q6_K")):
            scheme = get_scheme(name)
            ms = time_call(lambda x, s=scheme: s.quantize(x), inputs, max(5, args.repeat // 5), warmup=2)
            add(label, ms, "scheme torch code on cuda")
        os.environ.pop("QTOOL_FUSED")
        triton_available.cache_clear()

    bnb_dq = next((r for r in report.results if r.name == "bitsandbytes nf4 + dq"), None)
    for result in report.results:
        if result.name.startswith(("qtool", "sweep", "torch")):
            result.vs_copy = round(result.gb_per_s / report.copy_gb_per_s, 3)
            if bnb_dq is not None:
                result.vs_bnb_nf4_dq = round(result.gb_per_s / bnb_dq.gb_per_s, 2)

    print(f"\n{report.device}, torch {report.torch}, triton {report.triton}, bitsandbytes {report.bitsandbytes}; "
          f"{args.rows} x {args.cols} bf16 ({input_bytes / 1e6:.1f} MB), median of {args.repeat}")
    print(f"{'what':<38} {'ms':>7} {'GB/s':>7} {'x bnb dq':>9} {'/ copy':>7} {'pipelined':>10} {'GPU':>7}")
    for r in report.results:
        print(f"{r.name:<38} {r.median_ms:7.3f} {r.gb_per_s:7.1f} "
              f"{'' if r.vs_bnb_nf4_dq is None else r.vs_bnb_nf4_dq:>9} {'' if r.vs_copy is None else r.vs_copy:>7} "
              f"{'' if r.pipelined_gb_per_s is None else r.pipelined_gb_per_s:>10} "
              f"{'' if r.gpu_gb_per_s is None else r.gpu_gb_per_s:>7}")
    text = json.dumps(asdict(report), indent=2)
    target = os.environ.get("QTOOL_BENCH_JSON")
    if target:
        Path(target).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    time_start = time.time()
    status = main()
    print(f"bench_gpu: {time.time() - time_start:.0f} s", file=sys.stderr)
    sys.exit(status)
