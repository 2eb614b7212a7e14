"""The kernel fuzz cases (``test_kernel_fuzz.py``) against an AddressSanitizer build of ``_kernels.c``.

Any out-of-bounds read or write in a kernel (such as the group-size overflow of issue 15: ``gk_unpack``
writing 8192 codes into its 4096-byte stack array) aborts the run with an ASan report, which fails this
test even where the plain build would silently corrupt memory. The library is built with
``GRADKIT_KERNEL_FLAGS`` into a fresh cache folder and loaded into a non-ASan Python, which needs the
ASan runtime preloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradkit.compress import _native

REPO = Path(__file__).resolve().parents[2]
FUZZ = Path(__file__).with_name("test_kernel_fuzz.py")
ASAN_FLAGS = "-fsanitize=address -fno-omit-frame-pointer"


def _asan_runtime(cc: str, tmp_path: Path) -> str:
    """The compiler's ASan runtime library, after checking that it can build a sanitized library;
    skips (with the reason) where it cannot."""
    if sys.platform != "linux":
        pytest.skip("the AddressSanitizer check preloads the runtime with LD_PRELOAD (Linux only)")
    try:
        found = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{cc} cannot report its AddressSanitizer runtime: {exc}")
    if not os.path.isabs(found) or not os.path.exists(found):
        pytest.skip(f"{cc} has no AddressSanitizer runtime (libasan.so not found)")
    src = tmp_path / "probe.c"
    src.write_text("int probe(int *p) { return p[0]; }\n")
    probe = subprocess.run([cc, *ASAN_FLAGS.split(), "-shared", "-fPIC", str(src), "-o", str(tmp_path / "p.so")],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        pytest.skip(f"{cc} does not support {ASAN_FLAGS}: {probe.stderr.strip()[:200]}")
    return found


@pytest.mark.slow
def test_fuzz_cases_pass_under_address_sanitizer(tmp_path: Path) -> None:
    cc = _native._compiler()
    if cc is None:
        pytest.skip("no C compiler here: the fused kernels cannot be built")
    runtime = _asan_runtime(cc, tmp_path)
    cache = tmp_path / "cache"
    env = dict(os.environ)
    env.pop("GRADKIT_KERNELS", None)  # "torch" would skip every native case
    env.update(
        LD_PRELOAD=runtime,
        ASAN_OPTIONS="detect_leaks=0",  # CPython and torch keep allocations until exit
        GRADKIT_KERNEL_FLAGS=ASAN_FLAGS,
        GRADKIT_CACHE_DIR=str(cache),
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])]),
    )
    # -s: an ASan report goes to stderr as the process aborts, past pytest's output capture.
    proc = subprocess.run([sys.executable, "-m", "pytest", str(FUZZ), "-q", "-s", "-x", "-rs",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert "AddressSanitizer" not in output, output[-6000:]
    assert proc.returncode == 0, output[-6000:]
    assert "skipped" not in output, output[-3000:]  # every native case ran
    # The kernels that ran were the sanitized build, made for this run.
    (built,) = cache.glob("kernels-*.so")
    assert b"__asan_report" in built.read_bytes()
