"""The package's native CPU kernels, built on first use.

Three XLA custom calls (JAX's FFI), compiled into one library:

* ``regret_evaluation='certified'`` re-scores the cells whose certificate has
  lapsed (``csrc/certified_rescan.cc``; see
  :func:`jaxbandit.metrics.certified_cell_values`). It is C++ because the work
  it saves is a branch per cell, which XLA's fused loops cannot take.
* ``erm_gradient='native'`` sums the exact ERM's per-user gradient statistics
  over the data rows (``csrc/user_gradient.cc``; see
  :func:`jaxbandit.learners.native_user_gradient`) with no pass over every
  cell, which XLA's gathers and scatters make costly. For classes with
  shared parameters (``known_heads``, ``pooled``) the carried refit's whole
  quasi-Newton loop is one call too (same source; see
  :func:`jaxbandit.learners.native_carried_steps`): each step's gradient from
  that row pass, the BFGS update of the inverse Hessian and the next
  direction, without a dozen small XLA operations a step.

The sources ship with the package and are compiled the first time a process
asks for them, with the machine's C++ compiler (``$CXX``, else ``c++``, ``g++``
or ``clang++``) against the FFI headers jaxlib installs
(``jax.ffi.include_dir()``), for this CPU (``-march=native``). The library is
kept under ``$JAXBANDIT_CACHE_DIR/native`` (default ``~/.cache/jaxbandit/native``),
named by a hash of the sources, the compiler, its flags, jax's version and the
CPU, so a second process loads it in milliseconds. Compiling takes about 5-9 s
(the two sources at once).

Where it cannot be built (no compiler, headers missing, a failed compile) or
``JAXBANDIT_NATIVE=0`` is set, :func:`status` says why and the ``'auto'``
settings use the XLA passes (``regret_evaluation='full'``,
``erm_gradient='xla'``) instead; asking for a native one explicitly is then an
error before anything compiles.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import NamedTuple, Optional

SOURCE = pathlib.Path(__file__).resolve().parent / "csrc" / "certified_rescan.cc"
GRADIENT_SOURCE = SOURCE.parent / "user_gradient.cc"
SOURCES = (SOURCE, GRADIENT_SOURCE)
TARGET = "jaxbandit_certified_rescan"
GRADIENT_TARGET = "jaxbandit_user_gradient"
STEPS_TARGET = "jaxbandit_carried_steps"
_SYMBOLS = {TARGET: "JaxbanditCertifiedRescan", GRADIENT_TARGET: "JaxbanditUserGradient",
            STEPS_TARGET: "JaxbanditCarriedSteps"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared")
_LOCK = threading.Lock()
_REGISTERED = {}  # library path -> the loaded library, registered with JAX once


class Status(NamedTuple):
  """Whether the native kernels are registered with JAX, and if not, why not.

  Attributes:
    available: the custom calls ``TARGET``, ``GRADIENT_TARGET`` and ``STEPS_TARGET`` are
      registered for the CPU.
    reason: what failed, or the library's path when available.
  """

  available: bool
  reason: str


def cache_dir() -> pathlib.Path:
  base = os.environ.get("JAXBANDIT_CACHE_DIR")
  root = pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "jaxbandit"
  return root / "native"


def _compiler() -> Optional[str]:
  named = os.environ.get("CXX")
  if named:
    return shutil.which(named) or named
  for candidate in ("c++", "g++", "clang++"):
    found = shutil.which(candidate)
    if found:
      return found
  return None


def _cpu() -> str:
  """The CPU's model and feature flags (``-march=native`` builds for them)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
  return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line, in order


def _run_all(commands) -> None:
  """Runs ``commands`` at once (each source compiles on its own core); raises
  RuntimeError naming the first that failed, with the end of its error output."""
  running = [(command, subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True))
             for command in commands]
  failures = []
  for command, process in running:
    try:
      _, errors = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      process.kill()
      _, errors = process.communicate()
      errors = f"timed out after 300 s\n{errors}"
    if process.returncode != 0:
      failures.append(f"{' '.join(command)} failed:\n{errors.strip()[-2000:]}")
  if failures:
    raise RuntimeError(failures[0])


def _build(compiler: str, include: str, library: pathlib.Path) -> None:
  library.parent.mkdir(parents=True, exist_ok=True)
  scratch = tempfile.mkdtemp(dir=library.parent, suffix=".partial")
  partial = os.path.join(scratch, library.name)
  try:
    # Each source compiled at once (about 4-6 s each, mostly the FFI header), then linked.
    objects = [os.path.join(scratch, f"{source.stem}.o") for source in SOURCES]
    _run_all([[compiler, *_FLAGS, "-c", "-isystem", include, str(source), "-o", obj]
              for source, obj in zip(SOURCES, objects)])
    _run_all([[compiler, *_FLAGS, *objects, "-o", partial]])
    os.replace(partial, library)  # atomic: a concurrent process sees all of it or none
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def disabled() -> bool:
  """Whether ``JAXBANDIT_NATIVE`` turns the native kernels off (``0``, ``false``, ``no``, ``off``)."""
  return os.environ.get("JAXBANDIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def build_and_register(compiler: Optional[str] = None,
                       directory: Optional[pathlib.Path] = None) -> Status:
  """Compiles the kernels if their library is not in ``directory`` (default :func:`cache_dir`)
  and registers them with JAX; never raises. ``compiler``: default :func:`_compiler`'s."""
  with _LOCK:
    try:
      import jax
      import jax.ffi
    except ImportError as error:  # a jax without the FFI module
      return Status(False, f"jax.ffi is not available ({error})")
    compiler = compiler or _compiler()
    if compiler is None:
      return Status(False, "no C++ compiler found (set CXX, or install g++ or clang++)")
    include = jax.ffi.include_dir()
    if not (pathlib.Path(include) / "xla" / "ffi" / "api" / "ffi.h").exists():
      return Status(False, f"jaxlib's FFI headers are missing under {include}")
    fingerprint = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES), compiler.encode(), " ".join(_FLAGS).encode(),
                 include.encode(), jax.__version__.encode(), _cpu().encode()):
      fingerprint.update(part)
      fingerprint.update(b"\0")
    directory = cache_dir() if directory is None else pathlib.Path(directory)
    library = directory / fingerprint.hexdigest()[:20] / "libjaxbandit_native.so"
    try:
      if not library.exists():
        _build(compiler, include, library)
      if str(library) not in _REGISTERED:
        loaded = ctypes.cdll.LoadLibrary(str(library))
        for target, symbol in _SYMBOLS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)),
                                      platform="cpu")
        _REGISTERED[str(library)] = loaded  # referenced for the life of the process
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
      return Status(False, f"the native kernels could not be built or loaded: {error}")
    return Status(True, str(library))


@functools.lru_cache(maxsize=None)
def _built() -> Status:
  return build_and_register()


def status() -> Status:
  """Whether the kernels can run in this process, building and registering them the first
  time it is asked (once per machine: about 5-9 s); never raises."""
  if disabled():
    return Status(False, "disabled by JAXBANDIT_NATIVE=0")
  return _built()


def available() -> bool:
  """:func:`status` ``.available``."""
  return status().available
