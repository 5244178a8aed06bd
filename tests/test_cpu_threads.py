"""OpenMP's spin after each parallel loop is capped before Numba starts its workers
(graceful beside busy processes), unless the user chose a wait policy."""

import os
import subprocess
import sys

import pytest

_SHOW = "import cnnspec.kernels.cpu, os; print(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "1000"), ({"GOMP_SPINCOUNT": "50"}, "50"), ({"OMP_WAIT_POLICY": "active"}, "None")],
)
def test_spin_capped_unless_the_user_chose(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", _SHOW], env={**base, **env}, capture_output=True, text=True
    )
    assert done.stdout.strip() == expected, done.stderr
