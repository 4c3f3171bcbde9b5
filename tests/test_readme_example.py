"""The README's Python API example runs as written, against a real etcd and a real agent."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from gleam import keys
from gleam.embedded import EtcdServer
from tests.support import ROOT, AgentProcess, client_for, wait_until

pytestmark = pytest.mark.slow


def readme_python_api_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python code block"
    return match.group(1)


def test_the_readme_python_api_example_runs(
    private_etcd: EtcdServer,
    start_agent: Callable[..., AgentProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = readme_python_api_example()
    assert 'make_settings("http://127.0.0.1:2379")' in code
    code = code.replace("http://127.0.0.1:2379", private_etcd.endpoint)
    # The example uses the default prefix, so this test has an etcd of its own.
    agent = start_agent(private_etcd.endpoint, "-id", "web-1", "-region", "eu")
    etcd = client_for(private_etcd.endpoint)
    try:
        wait_until(lambda: etcd.get(keys.Layout().info_key("web-1"))[0], what="registration")
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    finally:
        etcd.close()
        agent.stop()
    out = capsys.readouterr().out.splitlines()
    # config::sync gets a table where it expects a key name: both keys report a failure,
    # which the example prints; then the fleet's state and the exit code.
    assert [line.split()[:3] for line in out[:2]] == [
        ["web-1", "/gleam/node/web-1", "failed"],
        ["web-1", "/gleam/region/eu", "failed"],
    ]
    assert out[2].startswith("1 [")
