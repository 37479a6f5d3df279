"""Timing and memory helpers shared by ``benchmarks/bench_attention.py`` and ``python -m bsbr_ext``.

Implementations compared (names used by ``--impls``):

- ``bsbr``      our kernels, ``bsbr_ext.functional.bsbr_attention`` (torch.ops.bsbr.bsbr_attention);
- ``reference`` the eager chunked plain-PyTorch form, ``bsbr_ext.reference.bsbr_attention``;
- ``compiled``  the same reference under ``torch.compile(dynamic=False)``;
- ``sdpa``      ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``: full causal
                attention over q, k, v, the standard alternative (it computes a different function).

Modes: ``fwd`` (forward only, inputs do not require grad, so no graph is kept) and ``fwdbwd``
(forward, then ``torch.autograd.grad`` of the output with a random ``grad_out`` w.r.t. q, k, v,
meta_q, meta_k; for ``sdpa`` w.r.t. q, k, v).

How numbers are taken (see benchmarks/README.md for the reasoning):

- CUDA time: warm-up calls, then trials; each trial synchronises, records a CUDA event, runs
  ``inner`` calls back to back (cycling over several input sets when one set would fit in L2),
  records a second event and synchronises; time per call = elapsed / inner. Reported: median over
  trials, and the min and max trial.
- CUDA memory: one extra call after timing: ``synchronize; reset_peak_memory_stats;
  before = memory_allocated(); call; synchronize; max_memory_allocated() - before``. Inputs (and
  grad_out) are allocated before and are not counted; the output, saved activations, workspaces
  and the returned gradients are.
- CPU time: warm-up calls, then each call timed alone with ``time.perf_counter``; median, min, max.
- CPU memory: PyTorch's CPU allocator keeps no peak statistic, so a worker subprocess (one for all
  cases, cases one after another, started with ``MALLOC_MMAP_THRESHOLD_=131072`` so that every
  block of 128 KiB or more is its own mapping, returned to the OS when freed: resident memory then
  follows live tensors) measures peak resident-set growth: per case, build inputs,
  warm up, ``gc.collect()``, ``malloc_trim(0)`` (hand freed heap pages back to the OS), reset the
  kernel's RSS high-water mark (write ``5`` to ``/proc/self/clear_refs``), read ``VmRSS``, run one
  call holding its result, read ``VmHWM``. Peak extra = VmHWM - VmRSS-before. If the high-water
  mark cannot be reset, each case gets its own fresh subprocess with no warm-up at the measured
  size and the figure is marked as an upper bound.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

IMPLS = ("bsbr", "reference", "compiled", "sdpa")
MODES = ("fwd", "fwdbwd")
OURS = "bsbr"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}
MiB = 1024 * 1024

# Datasheet memory bandwidth (TB/s) by card name; checked in order, first match wins.
CARD_BANDWIDTH_TBS = (
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # SXM5 80 GB HBM3
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16, fp64") from None


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: an implementation, a mode and a problem shape."""

    impl: str
    mode: str
    device: str
    dtype: str
    b: int
    h: int
    n: int
    d: int
    chunk: int
    overlap: int = 0

    @property
    def num_chunks(self) -> int:
        return (self.n + self.chunk - 1) // self.chunk

    def shape_key(self) -> tuple:
        return (self.device, self.dtype, self.b, self.h, self.d, self.chunk, self.overlap, self.n,
                self.mode)

    def label(self) -> str:
        return (f"{self.impl} {self.mode} {self.device} {self.dtype} b={self.b} h={self.h} "
                f"n={self.n} d={self.d} B={self.chunk} w={self.overlap}")


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

def impl_unavailable(impl: str, device: str) -> Optional[str]:
    """None if `impl` can run on `device`, else the reason it cannot."""
    if impl not in IMPLS:
        return f"unknown impl {impl!r}"
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA not available"
    if impl == OURS:
        try:
            import bsbr_ext.functional  # noqa: F401
        except Exception as e:  # ImportError, or the extension failing to load
            return f"bsbr_ext.functional not importable: {type(e).__name__}: {e}"
        if device == "cuda":
            info = build_info()
            if isinstance(info, dict) and not _truthy_cuda(info):
                return "extension built without CUDA"
    if impl == "compiled" and not hasattr(torch, "compile"):
        return "torch.compile missing"
    return None


def _truthy_cuda(info: dict) -> bool:
    for key in ("cuda", "with_cuda", "cuda_compiled", "cuda_compiled_in", "built_with_cuda"):
        if key in info:
            return bool(info[key])
    return True  # unknown layout: let the op itself say whether it runs


def build_info() -> Any:
    """bsbr_ext.build_info(), or a string saying why it is not there."""
    try:
        import bsbr_ext
        return bsbr_ext.build_info()
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"


def _attention_fn(case: Case) -> Callable[..., torch.Tensor]:
    """fn(q, k, v, meta_q, meta_k) -> out for the case's implementation."""
    chunk, overlap = case.chunk, case.overlap
    if case.impl == OURS:
        from bsbr_ext import functional

        def ours(q, k, v, mq, mk):
            return functional.bsbr_attention(q, k, v, mq, mk, chunk, chunk_overlap=overlap)
        return ours
    if case.impl in ("reference", "compiled"):
        from bsbr_ext import reference

        def ref(q, k, v, mq, mk):
            return reference.bsbr_attention(q, k, v, mq, mk, chunk, chunk_overlap=overlap)
        if case.impl == "reference":
            return ref
        torch._dynamo.reset()  # fresh graphs per shape: no recompile limit, no dynamic shapes
        return torch.compile(ref, dynamic=False)
    if case.impl == "sdpa":
        def sdpa(q, k, v, mq, mk):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sdpa
    raise ValueError(f"unknown impl {case.impl!r}")


def make_inputs(case: Case, seed: int) -> dict:
    """Random normal q, k, v [b,h,n,d], meta_q, meta_k [b,h,C,d], grad_out [b,h,n,d]."""
    dtype = parse_dtype(case.dtype)
    g = torch.Generator(device=case.device).manual_seed(seed)
    grad = case.mode == "fwdbwd"

    def rnd(*shape, requires_grad=grad):
        t = torch.randn(*shape, generator=g, dtype=torch.float32, device=case.device).to(dtype)
        return t.requires_grad_(requires_grad)

    bhnd = (case.b, case.h, case.n, case.d)
    bhcd = (case.b, case.h, case.num_chunks, case.d)
    x = {"q": rnd(*bhnd), "k": rnd(*bhnd), "v": rnd(*bhnd),
         "meta_q": rnd(*bhcd), "meta_k": rnd(*bhcd)}
    if grad:
        x["grad_out"] = rnd(*bhnd, requires_grad=False)
    return x


def input_set_bytes(case: Case) -> int:
    es = torch.empty((), dtype=parse_dtype(case.dtype)).element_size()
    per = case.b * case.h * (case.n * case.d * (4 if case.mode == "fwdbwd" else 3)
                             + 2 * case.num_chunks * case.d)
    return per * es


def make_callable(case: Case, inputs: dict, fn: Callable) -> Callable[[], Any]:
    """Zero-argument callable running the case's mode once on one input set."""
    q, k, v, mq, mk = (inputs[n] for n in ("q", "k", "v", "meta_q", "meta_k"))
    if case.mode == "fwd":
        def run_fwd():
            return fn(q, k, v, mq, mk)
        return run_fwd
    leaves = [q, k, v] if case.impl == "sdpa" else [q, k, v, mq, mk]
    go = inputs["grad_out"]

    def run_fwdbwd():
        out = fn(q, k, v, mq, mk)
        return torch.autograd.grad(out, leaves, go)
    return run_fwdbwd


def fwd_bytes(case: Case) -> int:
    """Bytes a BSBR forward must move at least: q, k, v, out, plus fp32 chunk states once."""
    es = torch.empty((), dtype=parse_dtype(case.dtype)).element_size()
    tokens = case.b * case.h * case.n * case.d * 4 * es
    states = case.b * case.h * case.num_chunks * case.d * case.d * 4
    return tokens + states


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    trials: int
    inner: int


def time_cuda(fns: Sequence[Callable], warmup: int = 3, budget_s: float = 1.0,
              min_trials: int = 5, max_trials: int = 50, trial_ms: float = 2.0) -> Timing:
    """CUDA-event timing; `fns` are the same work on different input sets (cycled)."""
    s = len(fns)
    for i in range(max(warmup, s)):
        fns[i % s]()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in fns:
        f()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / s, 1e-4)  # ms per call
    inner = max(s, min(1000, math.ceil(trial_ms / est)))
    trials = int(min(max_trials, max(min_trials, budget_s * 1e3 / (est * inner))))
    times = []
    i = 0
    for _ in range(trials):
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fns[i % s]()
            i += 1
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return Timing(statistics.median(times), min(times), max(times), trials, inner)


def time_cpu_interleaved(fns_by: dict, warmup: int = 2, budget_s: float = 3.0,
                         min_trials: int = 3, max_trials: int = 30) -> dict:
    """CPU timing of several implementations, interleaved: warm each up, then rounds in which
    each still short of its trial count runs one call timed alone with time.perf_counter.
    Each gets clamp(budget_s / its one-call time, min_trials, max_trials) trials. Returns key ->
    Timing, or the exception its warm-up raised."""
    out: dict = {}
    est = {}
    for key, fns in fns_by.items():
        try:
            for w in range(max(warmup, 1)):
                t0 = time.perf_counter()
                r = fns[w % len(fns)]()
                est[key] = time.perf_counter() - t0  # the last warm-up call estimates one call
                del r
        except Exception as e:
            out[key] = e
            est.pop(key, None)
    want = {k: int(min(max_trials, max(min_trials, budget_s / max(e, 1e-6))))
            for k, e in est.items()}
    times: dict = {k: [] for k in est}
    rnd = 0
    while any(len(times[k]) < want[k] for k in est):
        for key in est:
            if len(times[key]) >= want[key] or key in out:
                continue
            fns = fns_by[key]
            f = fns[rnd % len(fns)]
            try:
                t0 = time.perf_counter()
                r = f()
                times[key].append((time.perf_counter() - t0) * 1e3)
                del r
            except Exception as e:
                out[key] = e
                times[key] = [float("nan")] * want[key]  # ends its rounds
        rnd += 1
    for key, ts in times.items():
        if key not in out:
            out[key] = Timing(statistics.median(ts), min(ts), max(ts), len(ts), 1)
    return out


def cuda_peak_extra(fn: Callable) -> int:
    """Peak bytes allocated by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    r = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del r
    return peak


def _oom_types() -> tuple:
    types = [torch.cuda.OutOfMemoryError] if hasattr(torch.cuda, "OutOfMemoryError") else []
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(types) or (RuntimeError,)


# --------------------------------------------------------------------------------------------
# CPU peak memory (subprocess worker)
# --------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_cpu_case(case: Case, seed: int, warm: bool) -> dict:
    """Runs inside the worker: peak RSS growth of one call of `case`."""
    try:
        inputs = make_inputs(case, seed)
        fn = make_callable(case, inputs, _attention_fn(case))
        if warm:
            fn()
            fn()
        gc.collect()
        _malloc_trim()
        exact = _reset_hwm()
        rss0 = _proc_status_kib("VmRSS")
        r = fn()
        hwm = _proc_status_kib("VmHWM")
        del r
        return {"peak_bytes": (hwm - rss0) * 1024, "exact": exact}
    except MemoryError:
        return {"error": "oom"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}


def _mem_worker_main() -> None:
    """Entry point of the worker: reads a JSON job from stdin, prints one JSON line per case."""
    job = json.load(sys.stdin)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    warm = bool(job.get("warm", True))
    for c in job["cases"]:
        res = _measure_cpu_case(Case(**c), job.get("seed", 0), warm)
        print(json.dumps(res), flush=True)
        gc.collect()


def _package_root() -> str:
    import bsbr_ext
    return os.path.dirname(os.path.dirname(os.path.abspath(bsbr_ext.__file__)))


def _run_worker(cases: list[Case], seed: int, threads: Optional[int], warm: bool,
                timeout: float) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_package_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # Fixed mmap threshold: every block >= 128 KiB gets its own mapping and goes back to the OS
    # when freed, so resident memory follows live tensors (like CUDA's memory_allocated) instead
    # of glibc's history-dependent heap reuse (which made repeats differ by up to 20%).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    job = {"cases": [dataclasses.asdict(c) for c in cases], "seed": seed, "threads": threads,
           "warm": warm}
    cmd = [sys.executable, "-c", "import bsbr_ext._bench as b; b._mem_worker_main()"]
    try:
        p = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": "memory worker timed out"}] * len(cases)
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if len(lines) < len(cases):  # crashed part way (e.g. killed for memory)
        why = f"memory worker exited {p.returncode}"
        tail = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
        if tail:
            why += f": {tail[0][:160]}"
        lines += [{"error": why}] * (len(cases) - len(lines))
    return lines


def hwm_resettable() -> bool:
    return _reset_hwm()


def cpu_peak_extra(cases: list[Case], seed: int = 0, threads: Optional[int] = None,
                   timeout: float = 1800.0) -> list[dict]:
    """Peak RSS growth of one call per case, measured in a worker subprocess."""
    if not cases:
        return []
    if hwm_resettable():
        return _run_worker(cases, seed, threads, warm=True, timeout=timeout)
    # No way to reset the high-water mark: one fresh process per case, no warm-up at this size.
    out = []
    for c in cases:
        r = _run_worker([c], seed, threads, warm=False, timeout=timeout)[0]
        r["exact"] = False
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------

def card_bandwidth() -> tuple[Optional[float], str]:
    """(bytes/s, source) of the current CUDA card: datasheet by name, else from clock * bus."""
    name = torch.cuda.get_device_name()
    for key, tbs in CARD_BANDWIDTH_TBS:
        if key in name:
            return tbs * 1e12, f"datasheet {tbs} TB/s ({key})"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clk, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clk and bus:
        bw = 2 * clk * 1e3 * bus / 8
        return bw, f"from memory clock x bus width {bw / 1e12:.2f} TB/s"
    return None, "unknown"


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda([lambda: dst.copy_(src)], warmup=3, budget_s=0.2, min_trials=10, max_trials=10,
                  trial_ms=0)
    bw = 2 * nbytes / (t.median_ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def environment() -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "build_info": build_info(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name")), platform.processor())
    except OSError:
        env["cpu"] = platform.processor()
    # The vector ISAs the CPU numbers depend on (ATen's: AVX2, AVX512, ...; our kernels' level:
    # avx512, avx2 or base, see BSBR_CPU_ISA), named with the CPU so that tables from different
    # VMs can be told apart.
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["cpu"] += f" ({env['cpu_capability']}; bsbr kernels: {env['build_info']['cpu_isa']})"
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda_runtime"] = torch.version.cuda
    return env


def _result(case: Case, status: str, note: str = "", **kw) -> dict:
    r = dataclasses.asdict(case)
    r.update(status=status, note=note, median_ms=None, min_ms=None, max_ms=None, trials=None,
             inner=None, peak_mib=None, peak_exact=None)
    r.update(kw)
    return r


def _input_sets(case: Case, max_input_sets: int) -> int:
    """CUDA: enough input sets to cycle through 4x the L2 cache (capped); CPU: one."""
    if case.device != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(max_input_sets, math.ceil(4 * l2 / input_set_bytes(case))))


def _failure(case: Case, e: BaseException) -> dict:
    if isinstance(e, _oom_types()):
        return _result(case, "oom", f"out of memory: {str(e).splitlines()[0][:120]}")
    if isinstance(e, MemoryError):
        return _result(case, "oom", "out of memory (host)")
    if os.environ.get("BSBR_BENCH_TRACEBACK"):
        traceback.print_exception(e)
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return _result(case, "error", f"{type(e).__name__}: {msg}" if msg else type(e).__name__)


def _log_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['impl']}: {r['status']} {r.get('note') or ''}"
    mem = "" if r.get("peak_mib") is None else f", peak extra {r['peak_mib']:.1f} MiB"
    return (f"{r['impl']}: median {r['median_ms']:.4g} ms (min {r['min_ms']:.4g}, max "
            f"{r['max_ms']:.4g}, {r['trials']}x{r['inner']} calls){mem}")


def run_cases(cases: list[Case], *, seed: int = 0, budget_s: Optional[float] = None,
              threads: Optional[int] = None, measure_memory: bool = True,
              max_input_sets: int = 64, peak_bw: Optional[float] = None,
              copy_bw: Optional[float] = None,
              log: Callable[[str], None] = print,
              progress: Optional[Callable[[list], None]] = None) -> list[dict]:
    """Times every case (and measures its peak memory); never raises for a failing case.

    Cases of the same shape and mode share their input sets. On CPU their timed calls are
    interleaved (impl A, B, C, A, B, C, ...) so that load from other processes hits all alike.
    `progress(results so far)` is called after each shape (e.g. to save partial results).
    """
    groups: dict = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.shape_key(), []).append((i, case))
    results: list = [None] * len(cases)
    cpu_mem_cases = []
    for group in groups.values():
        first = group[0][1]
        log(f"  {first.mode} {first.device} {first.dtype} b={first.b} h={first.h} n={first.n} "
            f"d={first.d} B={first.chunk} w={first.overlap}: "
            + ", ".join(c.impl for _, c in group))
        runnable = []
        for i, case in group:
            why = impl_unavailable(case.impl, case.device)
            if why:
                results[i] = _result(case, "unavailable", why)
            else:
                runnable.append((i, case))
        if not runnable:
            continue
        sets = _input_sets(first, max_input_sets)
        try:
            inputs = [make_inputs(first, seed + s) for s in range(sets)]
        except BaseException as e:  # noqa: BLE001  (inputs alone do not fit)
            if isinstance(e, KeyboardInterrupt):
                raise
            for i, case in runnable:
                results[i] = _failure(case, e)
            continue
        if first.device == "cuda":
            for i, case in runnable:
                try:
                    fn = _attention_fn(case)
                    fns = [make_callable(case, x, fn) for x in inputs]
                    t = time_cuda(fns, budget_s=1.0 if budget_s is None else budget_s)
                    peak = cuda_peak_extra(fns[0]) if measure_memory else None
                    results[i] = _result(
                        case, "ok", median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms,
                        trials=t.trials, inner=t.inner, input_sets=sets,
                        peak_mib=None if peak is None else peak / MiB, peak_exact=True)
                    del fns, fn
                except Exception as e:
                    results[i] = _failure(case, e)
                log(f"    {_log_line(results[i])}")
                gc.collect()
                torch.cuda.empty_cache()
        else:
            fns_by = {}
            for i, case in runnable:
                try:
                    fn = _attention_fn(case)
                    fns_by[i] = [make_callable(case, x, fn) for x in inputs]
                except Exception as e:
                    results[i] = _failure(case, e)
            timings = time_cpu_interleaved(fns_by, budget_s=3.0 if budget_s is None else budget_s)
            for i, case in runnable:
                if i not in timings:
                    continue
                t = timings[i]
                if isinstance(t, BaseException):
                    results[i] = _failure(case, t)
                    continue
                results[i] = _result(case, "ok", median_ms=t.median_ms, min_ms=t.min_ms,
                                     max_ms=t.max_ms, trials=t.trials, inner=1, input_sets=sets)
                if measure_memory:
                    cpu_mem_cases.append((i, case))
            for i, _ in runnable:
                log(f"    {_log_line(results[i])}")
            del fns_by
        del inputs
        gc.collect()
        if progress is not None:
            progress([r for r in results if r is not None])
    if cpu_mem_cases:
        log(f"  CPU peak memory: {len(cpu_mem_cases)} cases in a worker subprocess ...")
        mems = cpu_peak_extra([c for _, c in cpu_mem_cases], seed=seed, threads=threads)
        for (i, _), m in zip(cpu_mem_cases, mems):
            if "error" in m:
                results[i]["note"] = (results[i]["note"] + "; " if results[i]["note"] else "") + \
                    f"memory: {m['error']}"
            else:
                results[i]["peak_mib"] = m["peak_bytes"] / MiB
                results[i]["peak_exact"] = m["exact"]
    add_ratios(results, peak_bw=peak_bw, copy_bw=copy_bw)
    return results


def add_ratios(results: list[dict], peak_bw: Optional[float] = None,
               copy_bw: Optional[float] = None) -> None:
    """ratio_vs_ours = impl time / our time at the same shape and mode (> 1: ours is faster).
    For our CUDA forward also the achieved bandwidth, fwd_bytes / median time, as a fraction of
    the card's bandwidth (`peak_bw` bytes/s, default card_bandwidth()) and of `copy_bw`."""
    ours = {}
    for r in results:
        if r["impl"] == OURS and r["status"] == "ok":
            ours[Case(**_case_fields(r)).shape_key()] = r
    for r in results:
        o = ours.get(Case(**_case_fields(r)).shape_key())
        r["ratio_vs_ours"] = (r["median_ms"] / o["median_ms"]
                              if o and r["status"] == "ok" else None)
        if r["impl"] == OURS and r["status"] == "ok" and r["device"] == "cuda" \
                and r["mode"] == "fwd":
            if peak_bw is None:
                peak_bw = card_bandwidth()[0]
            nbytes = fwd_bytes(Case(**_case_fields(r)))
            r["fwd_bytes"] = nbytes
            r["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
            r["bw_frac"] = r["gbps"] * 1e9 / peak_bw if peak_bw else None
            r["bw_frac_copy"] = r["gbps"] * 1e9 / copy_bw if copy_bw else None


def _case_fields(r: dict) -> dict:
    return {f.name: r[f.name] for f in dataclasses.fields(Case)}


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _mib(r: dict) -> str:
    if r.get("peak_mib") is None:
        return "-"
    s = f"{r['peak_mib']:.1f}" if r["peak_mib"] < 100 else f"{r['peak_mib']:.0f}"
    return s if r.get("peak_exact", True) else f"<= {s}"


def _status_cell(r: dict) -> str:
    return {"unavailable": "n/a", "oom": "OOM", "error": "error", "skipped": "skipped"}.get(
        r["status"], r["status"])


def markdown_tables(results: list[dict], impls: Sequence[str]) -> str:
    """A summary table (one row per shape and mode) and a detail table (one row per impl)."""
    shapes: dict = {}
    for r in results:
        shapes.setdefault(Case(**_case_fields(r)).shape_key(), {})[r["impl"]] = r
    others = [i for i in impls if i != OURS]
    lines = []
    head = ["device", "dtype", "d", "n", "mode", f"{OURS} ms", f"{OURS} MiB"]
    for i in others:
        head += [f"{i} ms", f"{i} MiB", f"{i}/{OURS}"]
    show_bw = any(r.get("gbps") for r in results)
    if show_bw:
        head += [f"{OURS} fwd GB/s (% of peak)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for key, by in shapes.items():
        any_r = next(iter(by.values()))
        row = [any_r["device"], any_r["dtype"], str(any_r["d"]), _n(any_r["n"]), any_r["mode"]]
        for i in [OURS] + others:
            r = by.get(i)
            if r is None:
                row += ["-", "-"] + (["-"] if i != OURS else [])
                continue
            if r["status"] == "ok":
                row += [_ms(r["median_ms"]), _mib(r)]
            else:
                row += [_status_cell(r), "-"]
            if i != OURS:
                row.append(f"{r['ratio_vs_ours']:.2f}x" if r.get("ratio_vs_ours") else "-")
        if show_bw:
            o = by.get(OURS)
            if o and o.get("gbps"):
                pct = f" ({100 * o['bw_frac']:.0f}%)" if o.get("bw_frac") else ""
                row.append(f"{_gbps(o['gbps'])}{pct}")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("| device | dtype | d | n | mode | impl | median ms | min-max ms | runs | "
                 "peak extra MiB | impl/ours | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        runs = f"{r['trials']}x{r['inner']}" if r.get("trials") else "-"
        spread = f"{_ms(r['min_ms'])}-{_ms(r['max_ms'])}" if r["status"] == "ok" else "-"
        med = _ms(r["median_ms"]) if r["status"] == "ok" else _status_cell(r)
        ratio = f"{r['ratio_vs_ours']:.2f}x" if r.get("ratio_vs_ours") else "-"
        note = r.get("note") or ""
        if r.get("gbps"):
            note = (note + "; " if note else "") + f"{_gbps(r['gbps'])} GB/s" + (
                f" = {100 * r['bw_frac']:.0f}% of card peak" if r.get("bw_frac") else "") + (
                f", {100 * r['bw_frac_copy']:.0f}% of measured copy" if r.get("bw_frac_copy")
                else "")
        lines.append(f"| {r['device']} | {r['dtype']} | {r['d']} | {_n(r['n'])} | {r['mode']} | "
                     f"{r['impl']} | {med} | {spread} | {runs} | {_mib(r)} | {ratio} | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines)


def _gbps(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def _n(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def text_table(results: list[dict], impls: Sequence[str]) -> str:
    """Short plain-text table: one row per shape and mode, time (ms) and peak extra memory (MiB)
    per impl, and impl/ours time ratios."""
    shapes: dict = {}
    for r in results:
        shapes.setdefault(Case(**_case_fields(r)).shape_key(), {})[r["impl"]] = r
    show_bw = any(r.get("gbps") for r in results)
    cols = ["device", "dtype", "d", "n", "mode"] + [f"{i} ms|MiB" for i in impls] + \
        [f"{i}/{OURS}" for i in impls if i != OURS] + ([f"{OURS} GB/s (%peak)"] if show_bw else [])
    rows = [cols]
    for by in shapes.values():
        a = next(iter(by.values()))
        row = [a["device"], a["dtype"], str(a["d"]), _n(a["n"]), a["mode"]]
        for i in impls:
            r = by.get(i)
            if r is None:
                row.append("-")
            elif r["status"] == "ok":
                row.append(f"{_ms(r['median_ms'])} | {_mib(r)}")
            else:
                row.append(_status_cell(r))
        for i in impls:
            if i != OURS:
                r = by.get(i)
                row.append(f"{r['ratio_vs_ours']:.2f}x" if r and r.get("ratio_vs_ours") else "-")
        if show_bw:
            o = by.get(OURS)
            row.append(f"{_gbps(o['gbps'])}" + (f" ({100 * o['bw_frac']:.0f}%)" if o.get("bw_frac")
                                                 else "") if o and o.get("gbps") else "-")
        rows.append(row)
    widths = [max(len(r[j]) for r in rows) for j in range(len(cols))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r['impl']} {r['mode']} n={r['n']} d={r['d']} {r['device']}: {r['note']}"
             for r in results if r["status"] != "ok" and r.get("note")]
    return "\n".join(out + (["notes:"] + notes if notes else []))
