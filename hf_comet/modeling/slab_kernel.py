"""A compiled kernel for the slab execution (decoding on CPU, fp32): each kept expert's two weight slabs read as one
sequential stream each, about twice as fast as MKL's matrix-vector product on this machine.

Why (issue 20, measured; `docs/decisions.md#the-compiled-slab-kernel`): a decoded token is memory-bound, and MKL's
fp32 ``addmv`` reads a (384, 768) slab at 12-16 GB/s whatever its memory order, while one core streams memory at
~28 GB/s. Reading a slab row after row with a few vector accumulators (``up``: one dot product per row; ``down``,
laid out unit-major: ``y += a_i * row_i``, ``y`` held in L1) reaches 28-32 GB/s. The routed (token, expert) pairs
are grouped by expert, so each kept expert's slabs are read once for all the tokens routed to it.

The C (GCC vector extensions: AVX-512, AVX2 or NEON, whatever ``-march=native`` gives) is compiled on first use by
the machine's C compiler into ``$HF_HOME/hf_comet/kernels`` (keyed by the source, the flags, the compiler and the
CPU; written to a temporary name, then renamed) and loaded with ``ctypes``: no build step at install, no torch
headers, a fraction of a second once per machine, nothing at import.

Where there is no C compiler, the build fails, or ``HF_COMET_NATIVE_SLABS=0``, `native_library` is None and
`hf_comet.modeling.moe_kernels.slab_experts` runs its torch loop (same values up to summation order; a failed build
is said once). Only the products and biases are compiled: the activation runs in torch, between the two calls, on
every kept slot at once, so every activation a model names gives the torch loop's values.

This file travels with checkpoints (``trust_remote_code=True``): it imports only the standard library and torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

import torch

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef float vf __attribute__((vector_size(64), aligned(4), may_alias));
#define VW 16
#define ROWS 8

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

/* The routed (token, slot) pairs grouped by expert (counting sort, slot order kept within an expert); pairs of
   weight 0 are left out. Returns -1 for an index outside [0, experts), -2 when out of memory; else 0. */
static int group(const int64_t* idx, const float* w, int64_t pairs, int64_t experts, int64_t** start,
                 int64_t** order) {
  for (int64_t p = 0; p < pairs; p++) if (idx[p] < 0 || idx[p] >= experts) return -1;
  *start = calloc(experts + 1, sizeof(int64_t));
  *order = malloc((pairs ? pairs : 1) * sizeof(int64_t));
  if (!*start || !*order) { free(*start); free(*order); return -2; }
  for (int64_t p = 0; p < pairs; p++) if (!w || w[p] != 0.0f) (*start)[idx[p] + 1]++;
  for (int64_t e = 0; e < experts; e++) (*start)[e + 1] += (*start)[e];
  int64_t* fill = malloc((experts ? experts : 1) * sizeof(int64_t));
  if (!fill) { free(*start); free(*order); return -2; }
  memcpy(fill, *start, experts * sizeof(int64_t));
  for (int64_t p = 0; p < pairs; p++) if (!w || w[p] != 0.0f) (*order)[fill[idx[p]]++] = p;
  free(fill);
  return 0;
}

/* pre[p, :] = up[idx[p]] @ x[p / k] + up_bias[idx[p]] for every pair p = (token, slot); up (E, n, d). Each kept
   expert's slab is read once, row by row, for all its tokens; a pair of weight 0 gets zeros. */
int hf_comet_slab_up(const float* x, int64_t tokens, int64_t d, const int64_t* idx, int64_t k, int64_t experts,
                     const float* w, const float* up, const float* up_bias, int64_t n, float* pre) {
  int64_t *start, *order;
  int status = group(idx, w, tokens * k, experts, &start, &order);
  if (status) return status;
  if (w) for (int64_t p = 0; p < tokens * k; p++) if (w[p] == 0.0f) memset(pre + p * n, 0, n * sizeof(float));
  for (int64_t e = 0; e < experts; e++) {
    if (start[e] == start[e + 1]) continue;
    const float* slab = up + e * n * d;
    const float* bias = up_bias + e * n;
    for (int64_t chunk = 0; chunk < n; chunk += ROWS)  /* a few rows stay in L1 while every pair reads them */
      for (int64_t q = start[e]; q < start[e + 1]; q++) {
        int64_t p = order[q];
        const float* xp = x + (p / k) * d;
        float* out = pre + p * n;
        int64_t end = chunk + ROWS < n ? chunk + ROWS : n;
        for (int64_t r = chunk; r < end; r++) out[r] = dot(slab + r * d, xp, d) + bias[r];
      }
  }
  free(start);
  free(order);
  return 0;
}

/* out[t] += w[p] * (act[p] @ down[idx[p]] + down_bias[idx[p]]) over the pairs p of token t; down (E, d, n) in
   memory order (E, n, d) when unit_major, else (E, d, n); out zeroed by the caller. Experts in index order. */
int hf_comet_slab_down(const float* act, int64_t tokens, int64_t d, const int64_t* idx, int64_t k, int64_t experts,
                       const float* w, const float* down, int unit_major, const float* down_bias, int64_t n,
                       float* out) {
  int64_t *start, *order;
  int status = group(idx, w, tokens * k, experts, &start, &order);
  if (status) return status;
  for (int64_t e = 0; e < experts; e++) {
    if (start[e] == start[e + 1]) continue;
    const float* slab = down + e * n * d;
    if (unit_major) {  /* one row at a time: a single sequential stream (several at once read slower here) */
      for (int64_t i = 0; i < n; i++)
        for (int64_t q = start[e]; q < start[e + 1]; q++) {
          int64_t p = order[q];
          axpy(out + (p / k) * d, (w ? w[p] : 1.0f) * act[p * n + i], slab + i * d, d);
        }
    } else {
      for (int64_t j = 0; j < d; j++)
        for (int64_t q = start[e]; q < start[e + 1]; q++) {
          int64_t p = order[q];
          out[(p / k) * d + j] += (w ? w[p] : 1.0f) * dot(slab + j * n, act + p * n, n);
        }
    }
    if (down_bias)
      for (int64_t q = start[e]; q < start[e + 1]; q++) {
        int64_t p = order[q];
        axpy(out + (p / k) * d, w ? w[p] : 1.0f, down_bias + e * d, d);
      }
  }
  free(start);
  free(order);
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
    """What ``-march=native`` depends on: the CPU's model and feature flags on Linux (``/proc/cpuinfo``), elsewhere
    the platform's description, which does not tell every CPU of one architecture apart (a cache shared between
    such machines should not be)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.platform()} {platform.machine()} {platform.processor()}"


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (split like a shell: ``ccache gcc`` works), else ``cc``, ``gcc`` or
    ``clang`` on the PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _build() -> ctypes.CDLL | None:
    """Compile (or find in the cache) and load the kernel; None where that cannot be done. A failed build is said
    once and recorded beside where the library would be (``.failed``), so later processes on the machine skip it
    quietly until the compiler, the source or the CPU changes (delete the file to try again)."""
    compiler = _compiler()
    if not compiler:
        return None  # no compiler: the torch loop, silently (nothing the user asked for failed)
    run = dict(capture_output=True, text=True, encoding="utf-8", errors="replace")
    failed = None
    try:
        version = subprocess.run([*compiler, "--version"], timeout=30, **run).stdout
        key = hashlib.sha256("\0".join([SOURCE, *FLAGS, *compiler, version, _cpu_identity()]).encode()).hexdigest()
        directory = kernel_cache_dir()
        path = os.path.join(directory, f"slabs-{key[:20]}.so")
        failed = path[: -len(".so")] + ".failed"
        if os.path.exists(failed):
            return None  # said when it failed
        if not os.path.exists(path):
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as work:
                source = os.path.join(work, "slabs.c")
                with open(source, "w", encoding="utf-8") as handle:
                    handle.write(SOURCE)
                built = os.path.join(work, "slabs.so")
                result = subprocess.run([*compiler, *FLAGS, source, "-o", built], timeout=300, **run)
                if result.returncode != 0:
                    raise RuntimeError(
                        f"{shlex.join(compiler)} exited {result.returncode}: {result.stderr.strip()[-800:]}"
                    )
                os.replace(built, path)  # atomic: a concurrent process sees the old state or a whole library
        library = ctypes.CDLL(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        from transformers.utils import logging

        if failed is not None and isinstance(error, RuntimeError):  # the compiler itself refused: remember it
            try:
                with open(failed, "w", encoding="utf-8") as handle:
                    handle.write(f"{error}\n")
            except OSError:
                pass
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


def _unit_major(down: torch.Tensor) -> bool:
    return down.transpose(-1, -2).is_contiguous()


def kernel_takes(
    hidden: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor | None = None,
) -> bool:
    """Whether the compiled kernel takes these tensors: fp32 on CPU, ``up`` and the biases contiguous, ``down``
    contiguous or unit-major (memory order (E, I, d) for its (E, d, I) shape), the library built. `slab_products`
    and the execution choice (`hf_comet.modeling.execution.slab_kernel_runs`) both ask it."""
    tensors = (hidden, up, up_bias, down) + (() if down_bias is None else (down_bias,))
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    if not (up.is_contiguous() and up_bias.is_contiguous() and (down_bias is None or down_bias.is_contiguous())):
        return False
    if not (down.is_contiguous() or _unit_major(down)):
        return False
    return native_library() is not None


def slab_products(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    activation,
) -> torch.Tensor | None:
    """`slab_experts`' result by the compiled kernel, or None where it does not apply (`kernel_takes`; indices or
    weights not on CPU, indices not integers, shapes that do not fit the weights: the torch loop then runs, and
    raises its own error for those). ``activation``: a callable ``forward_into(pre, pre)`` runs on the (T * k, I)
    pre-activations between the two products.

    An expert index outside ``[0, E)`` raises IndexError before anything is written."""
    if not kernel_takes(hidden, up, up_bias, down, down_bias):
        return None
    if top_k_index.device.type != "cpu" or top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        return None
    if top_k_weights is not None and (top_k_weights.device.type != "cpu" or not top_k_weights.dtype.is_floating_point):
        return None
    experts, width, size = up.shape
    tokens = hidden.shape[0]
    shapes = [(hidden.shape, (tokens, size)), (top_k_index.shape, (tokens, top_k_index.shape[-1])),
              (up_bias.shape, (experts, width)), (down.shape, (experts, size, width))]  # fmt: skip
    if down_bias is not None:
        shapes.append((down_bias.shape, (experts, size)))
    if top_k_weights is not None:
        shapes.append((top_k_weights.shape, top_k_index.shape))
    if any(tuple(shape) != tuple(expected) for shape, expected in shapes):
        return None  # the torch loop raises torch's own error for inconsistent shapes; C would read out of bounds
    down_unit_major = _unit_major(down)  # checked here, never taken on trust: C reads the memory in this order
    hidden = hidden.contiguous()
    index = top_k_index.to(torch.int64).contiguous()
    weights = None if top_k_weights is None else top_k_weights.to(torch.float32).contiguous()
    top_k = index.shape[1]
    library = native_library()
    pre = hidden.new_empty(tokens * top_k, width)
    status = library.hf_comet_slab_up(hidden.data_ptr(), tokens, size, index.data_ptr(), top_k, experts,
                                      _pointer(weights), up.data_ptr(), up_bias.data_ptr(), width, pre.data_ptr())  # fmt: skip
    if status == -1:
        raise IndexError(f"expert indices must lie in [0, {experts}); got {top_k_index.tolist()}.")
    if status != 0:
        raise MemoryError(f"the slab kernel could not allocate its plan for {tokens * top_k} routed pairs.")
    activation.forward_into(pre, pre)
    output = hidden.new_zeros(tokens, size)
    status = library.hf_comet_slab_down(pre.data_ptr(), tokens, size, index.data_ptr(), top_k, experts,
                                        _pointer(weights), down.data_ptr(), int(down_unit_major), _pointer(down_bias),
                                        width, output.data_ptr())  # fmt: skip
    if status != 0:
        raise MemoryError(f"the slab kernel could not allocate its plan for {tokens * top_k} routed pairs.")
    return output


__all__ = ["ENVIRONMENT_SWITCH", "kernel_cache_dir", "kernel_takes", "native_library", "slab_products"]
