"""Every native ISA path against the scalar kernels, outside Python: natively for this CPU's
paths, and the NEON path (phones, Raspberry Pi) cross-compiled with g++-aarch64-linux-gnu and run
under qemu-aarch64. CI installs both tools; there a missing tool is a failure, not a skip."""
import subprocess
from pathlib import Path

import pytest

from support import require_tools

CHECK_SRC = Path(__file__).resolve().parent.parent / "csrc" / "check"
CROSS_CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


def build(build_dir: Path, *cmake_args: str) -> Path:
    subprocess.run(["cmake", "-S", CHECK_SRC, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", *cmake_args],
                   check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", build_dir, "-j2"], check=True, capture_output=True, timeout=600)
    return build_dir / "kernel_check"


def run_check(cmd: list) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.timeout(900)
def test_native_isa_paths_match_scalar(tmp_path):
    out = run_check([str(build(tmp_path / "native"))])
    assert " 0 failed" in out and "moe_experts fast" in out


@pytest.mark.timeout(900)
def test_neon_paths_under_qemu(tmp_path):
    """`-cpu max` has the dot-product instructions and the int8 matrix multiply: all three NEON
    builds run (smmla tiles, sdot and the baseline one beside them); `-cpu cortex-a76` has sdot
    only (two builds); `-cpu cortex-a72` (Raspberry Pi 4) neither: the baseline build alone. The
    fast path (MXFP4, Q4 and Q8 experts; tiles where built) and the Q8 copy must equal the scalar
    kernels bit for bit in every build."""
    require_tools(CROSS_CXX, QEMU, install="apt-get install g++-aarch64-linux-gnu qemu-user")
    exe = build(tmp_path / "aarch64", f"-DCMAKE_CXX_COMPILER={CROSS_CXX}", "-DCMAKE_SYSTEM_NAME=Linux",
                "-DCMAKE_SYSTEM_PROCESSOR=aarch64")
    checks = {"moe_experts exact T=7", "moe_experts fast T=80", "token split identical T=80", "bf16_matmul", "q8_matmul",
              "fast bit-identical to scalar T=80", "q8 bit-identical to scalar T=40", "moe_experts q4 fast T=80",
              "q4 fast bit-identical to scalar T=80", "moe_experts q8 exact T=7", "q8 fast bit-identical to scalar T=80"}
    for cpu, builds in (("max", 3), ("cortex-a76", 2), ("cortex-a72", 1)):
        out = run_check([QEMU, "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", str(exe)])
        neon = [line for line in out.splitlines() if line.startswith("neon")]
        assert all(any(check in line for line in neon) for check in checks), out
        assert sum("fast bit-identical to scalar" in line for line in neon) == 3 * 3 * builds, out  # T, formats
        assert all(line.endswith("ok") for line in neon) and " 0 failed" in out, out
