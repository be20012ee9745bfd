import os

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter (tests/test_triton.py);
# the flag must be set before the kernels are first compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws its random inputs from the same seed, so failures reproduce."""
    torch.manual_seed(0)


def _hypothesis_profiles() -> None:
    """``ci`` (the default): derandomised and small, so that CI is quick and never flaky.
    ``fuzz`` (``make fuzz``): thousands of examples per loss, seeded from the command line."""
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                  print_blob=True)
    settings.register_profile("ci", max_examples=40, derandomize=True, **common)
    settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")), **common)
    settings.load_profile("ci")


_hypothesis_profiles()
