"""What a run reports about itself."""
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the kernel's own high-water mark (Linux)")
def test_the_peak_memory_reported_is_the_process_s_own_not_its_launcher_s():
    """getrusage's ru_maxrss in a process started by another keeps the launcher's RSS when larger (pytest's,
    a notebook kernel's): this one reported 1.9 GiB for a run that had peaked at 1.4 (tests/integration/
    test_plan.py, in CI). The launcher here holds 1 GiB more than the child will."""
    ballast = bytearray(2**30)
    ballast[::4096] = b"\1" * (2**30 // 4096)  # every page touched, so resident
    child = subprocess.run([sys.executable, "-c", "from qlora.tracking import peak_memory_gb\n"
                            "import resource\nprint(peak_memory_gb('cpu'), resource.getrusage(resource.RUSAGE_SELF)"
                            ".ru_maxrss / 2**20)"], capture_output=True, text=True, check=True)
    del ballast
    reported, ru_maxrss = map(float, child.stdout.split())
    assert ru_maxrss > 1.0  # what getrusage says: the launcher's
    assert 0.05 < reported < 1.0  # Python with transformers imported
