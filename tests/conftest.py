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
