"""A compiled kernel for the slab execution (decoding on CPU, fp32): each kept expert's two weight slabs read in one
sequential stream each, about twice as fast as MKL's matrix-vector product on this machine.

Why (issue 20, measured): a decoded token is memory-bound, and MKL's fp32 ``addmv`` reads a (384, 768) slab at
12-16 GB/s whatever its form, while one core streams memory at ~28 GB/s. Reading a slab row after row with a few
vector accumulators (``up``: one dot product per row; ``down``, laid out unit-major: ``y += a_i * row_i``, ``y`` held in
L1) reaches 28-32 GB/s, so the FFN of a decoded GPT-2-small token at keep 0.5 reads its weights in about half the
time. The kernel is 60 lines of C with GCC vector extensions (AVX-512, AVX2 or NEON, whatever ``-march=native``
gives), compiled on first use by the machine's C compiler into ``$HF_HOME/hf_comet/kernels`` (keyed by the source,
the flags, the compiler and the CPU, written to a temporary name, then renamed) and loaded with ``ctypes``: no build
step at install, no torch headers, under a second to compile, nothing at import.

Where there is no C compiler, the compile fails, or ``HF_COMET_NATIVE_SLABS=0``, `slab_products` returns None and
`hf_comet.modeling.moe_kernels.slab_experts` runs its torch loop (same values to rounding; a failed compile is said
once). Only the products and biases are compiled: the activation runs in torch, between the two calls, on every kept
slot at once, so every activation a model names gives the torch path's values.

This file travels with checkpoints (``trust_remote_code=True``): it imports only the standard library and torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
typedef float vf __attribute__((vector_size(64), aligned(4), may_alias));
#define VW 16

static float dot(const float* a, const float* b, int64_t n) {
  vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t j = 0;
  for (; j + 4 * VW <= n; j += 4 * VW) {
    s0 += *(const vf*)(a + j) * *(const vf*)(b + j);
    s1 += *(const vf*)(a + j + VW) * *(const vf*)(b + j + VW);
    s2 += *(const vf*)(a + j + 2 * VW) * *(const vf*)(b + j + 2 * VW);
    s3 += *(const vf*)(a + j + 3 * VW) * *(const vf*)(b + j + 3 * VW);
  }
  for (; j + VW <= n; j += VW) s0 += *(const vf*)(a + j) * *(const vf*)(b + j);
  vf s = (s0 + s1) + (s2 + s3);
  float total = 0.0f;
  for (int i = 0; i < VW; i++) total += s[i];
  for (; j < n; j++) total += a[j] * b[j];
  return total;
}

static void axpy(float* y, float a, const float* x, int64_t n) {
  vf av = (vf){0} + a;
  int64_t j = 0;
  for (; j + VW <= n; j += VW) *(vf*)(y + j) += av * *(const vf*)(x + j);
  for (; j < n; j++) y[j] += a * x[j];
}

static int check(const int64_t* idx, int64_t count, int64_t experts) {
  for (int64_t i = 0; i < count; i++) if (idx[i] < 0 || idx[i] >= experts) return -1;
  return 0;
}

/* pre[t, s, :] = up[idx[t, s]] @ x[t] + up_bias[idx[t, s]]; up (E, n, d), a slot of weight 0 gets zeros. */
int hf_comet_slab_up(const float* x, int64_t tokens, int64_t d, const int64_t* idx, int64_t k, int64_t experts,
                     const float* w, const float* up, const float* up_bias, int64_t n, float* pre) {
  if (check(idx, tokens * k, experts)) return -1;
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t s = 0; s < k; s++) {
      float* p = pre + (t * k + s) * n;
      if (w && w[t * k + s] == 0.0f) { memset(p, 0, n * sizeof(float)); continue; }
      const float* slab = up + idx[t * k + s] * n * d;
      const float* bias = up_bias + idx[t * k + s] * n;
      for (int64_t r = 0; r < n; r++) p[r] = dot(slab + r * d, x + t * d, d) + bias[r];
    }
  return 0;
}

/* out[t] += w[t, s] * (act[t, s] @ down[idx[t, s]] + down_bias[idx[t, s]]); down (E, d, n) in memory order
   (E, n, d) when unit_major, else (E, d, n); out zeroed by the caller. */
int hf_comet_slab_down(const float* act, int64_t tokens, int64_t d, const int64_t* idx, int64_t k, int64_t experts,
                       const float* w, const float* down, int unit_major, const float* down_bias, int64_t n,
                       float* out) {
  if (check(idx, tokens * k, experts)) return -1;
  for (int64_t t = 0; t < tokens; t++) {
    float* y = out + t * d;
    for (int64_t s = 0; s < k; s++) {
      float weight = w ? w[t * k + s] : 1.0f;
      if (weight == 0.0f) continue;
      const float* a = act + (t * k + s) * n;
      const float* slab = down + idx[t * k + s] * n * d;
      if (unit_major) {
        for (int64_t i = 0; i < n; i++) axpy(y, weight * a[i], slab + i * d, d);
      } else {
        for (int64_t j = 0; j < d; j++) y[j] += weight * dot(slab + j * n, a, n);
      }
      if (down_bias) axpy(y, weight, down_bias + idx[t * k + s] * d, d);
    }
  }
  return 0;
}
"""

FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-strict-aliasing", "-std=gnu11", "-shared", "-fPIC")
"""Compiler flags: ``-march=native`` because the library is built on, and cached for, the CPU that runs it."""

ENVIRONMENT_SWITCH = "HF_COMET_NATIVE_SLABS"
"""``HF_COMET_NATIVE_SLABS=0`` keeps slabs on the torch loop (read once per process, at the first slab call)."""

_LIBRARY: list = []
"""The loaded library, or None where it is off or could not be built (at most one entry, filled on first use)."""


def kernel_cache_dir() -> str:
    """Where compiled kernels are kept: ``$HF_HOME/hf_comet/kernels`` (``HF_HOME`` defaults to
    ``~/.cache/huggingface``), beside the measured execution thresholds."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hf_comet", "kernels")


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform's words, so a
    cache shared by two machines never hands one the other's instructions."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build() -> ctypes.CDLL | None:
    """Compile (or find in the cache) and load the kernel; None, said once, where that cannot be done."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None  # no compiler: the torch loop, silently (nothing the user asked for failed)
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, version, _cpu_identity()]).encode()).hexdigest()
        directory = kernel_cache_dir()
        path = os.path.join(directory, f"slabs-{key[:20]}.so")
        if not os.path.exists(path):
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as work:
                source = os.path.join(work, "slabs.c")
                with open(source, "w", encoding="utf-8") as handle:
                    handle.write(SOURCE)
                built = os.path.join(work, "slabs.so")
                result = subprocess.run(
                    [compiler, *FLAGS, source, "-o", built], capture_output=True, text=True, timeout=300
                )
                if result.returncode != 0:
                    raise RuntimeError(f"{compiler} exited {result.returncode}: {result.stderr.strip()[-800:]}")
                os.replace(built, path)  # atomic: a concurrent process sees the old state or a whole library
        library = ctypes.CDLL(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            f"hf_comet: could not build the native slab kernel ({error}); decoding uses the torch loop instead "
            f"(same results, slower). Set {ENVIRONMENT_SWITCH}=0 to skip the attempt."
        )
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.hf_comet_slab_up.argtypes = [pointer, size, size, pointer, size, size, pointer, pointer, pointer, size,
                                         pointer]  # fmt: skip
    library.hf_comet_slab_down.argtypes = [pointer, size, size, pointer, size, size, pointer, pointer, ctypes.c_int,
                                           pointer, size, pointer]  # fmt: skip
    return library


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call of the process (None where it is off or cannot be built)."""
    if not _LIBRARY:
        off = os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")
        _LIBRARY.append(None if off else _build())
    return _LIBRARY[0]


native_library.cache_clear = _LIBRARY.clear  # the functools.lru_cache spelling: the next call decides again


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def slab_products(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    down: torch.Tensor,
    down_unit_major: bool,
    down_bias: torch.Tensor | None,
    activation,
) -> torch.Tensor | None:
    """`slab_experts`' result by the compiled kernel, or None where it does not apply (no library, not fp32 on CPU,
    or a weight in another layout than contiguous, ``down`` contiguous or unit-major). ``activation``: a callable
    ``forward_into(pre, pre)`` runs on the (T * k, I) pre-activations between the two products.

    An expert index outside ``[0, E)`` raises IndexError before anything is written."""
    library = native_library()
    tensors = (hidden, up, up_bias, down) + (() if down_bias is None else (down_bias,))
    if library is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if not (up.is_contiguous() and up_bias.is_contiguous() and (down_unit_major or down.is_contiguous())):
        return None
    if down_bias is not None and not down_bias.is_contiguous():
        return None
    hidden = hidden.contiguous()
    index = top_k_index.to(torch.int64).contiguous()
    weights = None if top_k_weights is None else top_k_weights.to(torch.float32).contiguous()
    tokens, top_k = index.shape
    experts, width, size = up.shape
    pre = hidden.new_empty(tokens * top_k, width)
    status = library.hf_comet_slab_up(hidden.data_ptr(), tokens, size, index.data_ptr(), top_k, experts,
                                      _pointer(weights), up.data_ptr(), up_bias.data_ptr(), width, pre.data_ptr())  # fmt: skip
    if status != 0:
        raise IndexError(f"expert indices must lie in [0, {experts}); got {top_k_index.tolist()}.")
    activation.forward_into(pre, pre)
    output = hidden.new_zeros(tokens, size)
    library.hf_comet_slab_down(pre.data_ptr(), tokens, size, index.data_ptr(), top_k, experts, _pointer(weights),
                               down.data_ptr(), int(down_unit_major), _pointer(down_bias), width, output.data_ptr())  # fmt: skip
    return output


__all__ = ["ENVIRONMENT_SWITCH", "kernel_cache_dir", "native_library", "slab_products"]
