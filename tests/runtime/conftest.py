"""Helpers for the runtime tests: a config file, the agent's loop in a thread, the stored rows."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.settings import Settings, load_settings
from agent.store import Store
from tests.conftest import FIXTURES

SIGNED_PULSEWAY = FIXTURES / "files" / "pulseway.exe"
SIGNED_DWSERVICE = FIXTURES / "files" / "dwservice.exe"
PULSEWAY_RULE = "6192b741-4540-4416-8dbb-ce0405166d0a"
DWSERVICE_RULE = "642b39b7-18eb-46eb-ba1f-bf70befae05e"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, exclusions: tuple[tuple[str, str], ...] = (), **agent: Any) -> Path:
    lines = ["[agent]"] + [f"{k} = {toml_value(v)}" for k, v in agent.items()]
    for ident, expression in exclusions:
        lines += ["", "[[exclusions]]", f"id = {json.dumps(ident)}", f"expression = '{expression}'"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def loader(config: Path, state: Path) -> Callable[[], Settings]:
    def load() -> Settings:
        return load_settings(state_dir=str(state), config_file=str(config), env={})

    return load


def stored_rows(state: Path) -> list[dict[str, Any]]:
    with Store(state / "rmmhunt.sqlite3") as store:
        return list(store.iter_rows())


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(every)


class AgentThread:
    """The real Runner loop in a thread of the test process (priority left alone)."""

    def __init__(self, load: Callable[[], Settings], **kwargs: Any) -> None:
        from agent.service.runner import Runner

        self.runner = Runner(load, low_priority=False, **kwargs)
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="agent-under-test")

    def _run(self) -> None:
        try:
            self.code = self.runner.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> AgentThread:
        self.thread.start()
        wait_for(lambda: self.runner.status.get("state") == "running" or not self.thread.is_alive(), 30)
        if self.error:
            raise self.error
        return self

    def stop(self) -> int | None:
        self.runner.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
        return self.code


@pytest.fixture
def agent_thread():
    started: list[AgentThread] = []

    def start(load: Callable[[], Settings], **kwargs: Any) -> AgentThread:
        agent = AgentThread(load, **kwargs)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        if agent.thread.is_alive():
            agent.stop()
