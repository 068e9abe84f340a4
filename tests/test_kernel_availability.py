"""No silent skips: with LSSA_REQUIRE_KERNELS=native (.ci/run sets what every CI machine
builds) a kernel that does not run here fails; otherwise it is reported as a skip with the reason."""

import subprocess
import sys

import pytest

from lssa_hf.kernels import status


@pytest.mark.parametrize("name", status.KERNELS)
def test_kernel_runs_here_or_says_why(name):
    reason = status.why_off(name)
    if reason is None:
        return
    if name in status.required():
        pytest.fail(f"{status.REQUIRE_ENV} requires the {name} kernel, which is off here: {reason}")
    pytest.skip(f"{name} kernel off here: {reason}")


def test_required_names_are_checked(monkeypatch):
    monkeypatch.setenv(status.REQUIRE_ENV, "native, triton")
    assert status.required() == ["native", "triton"]
    monkeypatch.setenv(status.REQUIRE_ENV, "nativ")
    with pytest.raises(ValueError, match="unknown kernels"):
        status.required()


def test_disabled_kernels_say_which_switch(monkeypatch):
    monkeypatch.setenv("LSSA_NATIVE", "0")
    assert status.why_off("native") == "disabled by LSSA_NATIVE=0"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if status.triton_lssa.available() and not status.torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in status.why_off("triton")


def test_info_lists_every_kernel_with_its_state():
    run = subprocess.run([sys.executable, "-m", "lssa_hf.cli", "info", "--no-models"], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "LSSA_NATIVE": "0"})
    assert run.returncode == 0, run.stderr
    assert "native kernel: off: disabled by LSSA_NATIVE=0" in run.stdout
    for name in status.KERNELS:
        assert f"{name} kernel:" in run.stdout
