import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws its random inputs from the same seed, so failures reproduce."""
    torch.manual_seed(0)
