"""Would an AOTInductor-compiled model serve faster than the frozen TorchScript trace a CPU
worker runs? (docs/benchmarks.md, session 18: not kept.)

Compiles the embedded MiniLM's pooled module once (`torch.export` with a dynamic batch and
width, `aoti_compile_and_package` with freezing; cached in --package), then, on one thread
and 64 of the bench's short texts:
  1. the trace against the package, interleaved half-second slices (--rounds);
  2. how much of the GIL each call leaves to a thread spinning in Python beside it: the
     trace, the package's own call, and its C entry point through ctypes (which releases
     the GIL for the call).
Run: `.venv/bin/python benchmarks/compiled_graphs.py` (nothing else running; ~1 min, and
~40 s more for the first compile). Needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import random
import statistics
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch._C._aoti as aoti
import torch._inductor

from pool.builtin import embedded_model_path
from pool.runtime import Encoder, padded
from tooling.loadgen import make_texts

Pass = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compiled_package(encoder: Encoder, example: tuple[torch.Tensor, torch.Tensor],
                     path: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    width = torch.export.Dim("width", min=2, max=encoder.max_length)
    with torch.inference_mode():
        program = torch.export.export(encoder.pooled, example, strict=False,
                                      dynamic_shapes=({0: batch, 1: width},) * 2)
    torch._inductor.aoti_compile_and_package(program, package_path=path,
                                             inductor_configs={"freezing": True})


def ctypes_call(package: str) -> Pass:
    """The package's model through its C entry point: ctypes releases the GIL for the call."""
    unpacked = tempfile.mkdtemp(prefix="zp-aoti-")
    zipfile.ZipFile(package).extractall(unpacked)
    lib = ctypes.CDLL(glob.glob(f"{unpacked}/**/*.so", recursive=True)[0])
    handle = ctypes.c_void_p()
    if lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(handle), 1, b"cpu", None):
        raise RuntimeError("AOTInductorModelContainerCreateWithDevice failed")
    pointer = ctypes.c_void_p
    lib.AOTInductorModelContainerRun.argtypes = [pointer, pointer, ctypes.c_size_t, pointer,
                                                 ctypes.c_size_t, pointer, pointer]
    api = ctypes.pythonapi
    api.PyCapsule_GetPointer.restype = pointer
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    api.PyCapsule_New.restype = ctypes.py_object
    api.PyCapsule_New.argtypes = [pointer, ctypes.c_char_p, pointer]

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        capsules = aoti.unsafe_alloc_void_ptrs_from_tensors([ids, mask])  # the call steals them
        inputs = (pointer * 2)(*[api.PyCapsule_GetPointer(c, None) for c in capsules])
        outputs = (pointer * 1)()
        if lib.AOTInductorModelContainerRun(handle, inputs, 2, outputs, 1, None, None):
            raise RuntimeError("AOTInductorModelContainerRun failed")
        return aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [api.PyCapsule_New(outputs[0], None, None)])[0]

    return run


def ms_per_call(run: Pass, ids: torch.Tensor, mask: torch.Tensor, seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(ids, mask)
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def gil_left(run: Pass, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """A spinning Python thread's progress during 10 calls, against its progress alone."""
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        run(ids, mask)
        before, start = count[0], time.perf_counter()
        for _ in range(10):
            run(ids, mask)
        took = time.perf_counter() - start
        during, before = count[0] - before, count[0]
        time.sleep(took)
        alone = count[0] - before
    finally:
        stop.set()
        spinner.join()
    return during / max(alone, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--package", default=None,
                        help="where the compiled package is kept (default: /tmp, by dtype)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder = Encoder(str(embedded_model_path()), dtype=args.dtype)
    texts = make_texts(64, 0, random.Random(1))
    ids, mask = map(torch.from_numpy, padded(encoder.token_ids(texts), 0))
    package = args.package or f"/tmp/zeropool-aoti-minilm-{args.dtype}.pt2"
    if not os.path.exists(package):
        start = time.perf_counter()
        compiled_package(encoder, (ids, mask), package)
        print(f"compiled {package} in {time.perf_counter() - start:.0f} s")
    loaded = torch._inductor.aoti_load_package(package)
    through_ctypes = ctypes_call(package)
    assert encoder._traced is not None
    traced = encoder._traced.for_width(ids.shape[1])
    with torch.inference_mode():
        want = traced(ids, mask)
        for name, run in (("package", loaded), ("ctypes", through_ctypes)):
            print(f"max |difference| of the {name} call to the trace: "
                  f"{(run(ids, mask) - want).abs().max():.2e}")
        pairs = [(ms_per_call(traced, ids, mask, 0.5), ms_per_call(loaded, ids, mask, 0.5))
                 for _ in range(args.rounds)]
        print("ms a call, trace / package:", ", ".join(f"{a:.1f}/{b:.1f}" for a, b in pairs),
              f"-> package {statistics.median(a / b for a, b in pairs):.2f}x (median)")
        for name, run in (("trace", traced), ("package", loaded), ("ctypes", through_ctypes)):
            print(f"GIL left to a Python thread during a {name} call: "
                  f"{gil_left(run, ids, mask):.0%} of its rate alone")


if __name__ == "__main__":
    main()
