"""README's Python snippets, each as a reader copies it into a file of its own: every name it uses is
defined in it, and the one no journey test runs (structured outputs) runs against the test stack.
tests/test_journey.py runs the OpenAI and Responses snippets against `inferq up`."""

from __future__ import annotations

import builtins
import re
import subprocess
import symtable
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Stack

README = (REPO / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _undefined(source: str) -> set[str]:
    """Names the snippet reads that nothing in it binds (and no builtin): a NameError when it runs."""
    top = symtable.symtable(source, "<README>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = bound | set(dir(builtins))
    missing: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for sym in table.get_symbols():
            free = table is top or sym.is_global()
            if sym.is_referenced() and free and sym.get_name() not in known:
                missing.add(sym.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return missing


def test_readme_undefined_name_check_catches_a_snippet_without_its_client() -> None:
    assert _undefined("r = client.models.list()\nprint(r)") == {"client"}
    assert _undefined("import os\nclass A:\n    x: str = os.sep\n") == set()


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.splitlines()[-1][:40] for s in SNIPPETS])
def test_readme_python_snippet_defines_every_name_it_uses(snippet: str) -> None:
    compile(snippet, "<README>", "exec")
    assert not _undefined(snippet), snippet


def test_readme_structured_outputs_snippet_runs_on_its_own(stack: Stack, tmp_path: Path) -> None:
    start = README.index("## Structured outputs")
    (snippet,) = re.findall(r"```python\n(.*?)```", README[start : README.index("\n## ", start + 1)], re.S)
    script = tmp_path / "structured.py"
    script.write_text(snippet.replace("http://127.0.0.1:8000", stack.base_url))
    env = {k: v for k, v in stack.api.env.items() if k != "INFERQ_API_KEY"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    # The parsed pydantic model, printed: both fields, whatever a sampled answer put in them.
    # (repr quotes a value holding a single quote with double quotes)
    assert re.fullmatch(r"name=(['\"]).*\1 country=(['\"]).*\2\n", done.stdout), done.stdout
