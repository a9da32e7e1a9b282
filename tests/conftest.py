import pytest

from tarkit.registry import registry


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test discovers plugins anew, so patched entry points never leak between tests."""
    registry.clear()
    yield
    registry.clear()
