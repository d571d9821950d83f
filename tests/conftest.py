"""Shared fixtures: the real models, loaded once for the whole test session.

Loading vLLM takes most of a minute on a 2-core machine, so every test that
needs a model shares one :class:`assistant.models.Models` and one event loop
(vLLM's ``AsyncLLM`` binds its output handler to the loop it first ran on).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assistant.config import Config, load_config  # noqa: E402
from helpers import ASSETS, TEST_OVERRIDES  # noqa: E402


@pytest.fixture(scope="session")
def config() -> Config:
    return load_config(overrides=TEST_OVERRIDES)


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on the session's one event loop."""
    return loop.run_until_complete


@pytest.fixture(scope="session")
def models(config: Config, run: Callable[..., Any]) -> Iterator[Any]:
    from assistant.models import load_models

    loaded = load_models(config)
    run(loaded.warm_up())
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    return json.loads((ASSETS / "manifest.json").read_text(encoding="utf-8"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-minutes", type=float, default=0.0, metavar="N",
                     help="run each wire's fuzzer (tests/test_fuzz_protocol.py) for about N minutes instead of "
                     "its bounded number of cases")


@pytest.fixture()
def fuzz_budget(request: pytest.FixtureRequest) -> tuple[int, float | None]:
    """(cases, seconds) for a fuzzer: the suite's bounded default, or --fuzz-minutes."""
    minutes = float(request.config.getoption("--fuzz-minutes"))
    return (100_000, minutes * 60) if minutes > 0 else (40, None)
