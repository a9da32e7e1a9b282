import pytest

from tarkit.registry import registry


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test discovers plugins anew, so patched entry points never leak between tests."""
    registry.clear()
    yield
    registry.clear()


@pytest.fixture(autouse=True, scope="session")
def tarkit_cache(tmp_path_factory):
    """tarkit's cache (the converted qwen2 tokenizer) lives in a temp folder for the session, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TARKIT_CACHE", str(tmp_path_factory.mktemp("tarkit_cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: thread start-up costs more than it saves, and on a shared 2-core machine two threads per
    process oversubscribe the cores (a test file measured 94 s with two threads, 6 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def one_thread_in_commands():
    """In-process `tarkit` commands pick their thread count like the tests: one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TARKIT_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One QUICK demo per test session (about a minute): the trained folders the demo, README and pipeline
    tests read. Laid out as `tarkit demo` writes it: <out>/checkpoints/<stage>, <out>/runs/<stage>."""
    from pathlib import Path

    from tarkit.cli import main

    out = tmp_path_factory.mktemp("demo")
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
    status = main(["demo", "--quick", "--out", str(out), "--recipes", str(recipes),
                   "--prompts", "4", "--images", "3", "--candidates", "2", "--batch-size", "4"])
    assert status == 0
    return out
