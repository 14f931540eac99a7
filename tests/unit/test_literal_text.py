"""Issue 24, rule 6: user text (reasons, names, messages quoting input) is shown literally.

Every console the CLI prints through is made by `make_console`, which never reads rich
markup; styles go beside the text (`styled`). The registry's end-to-end case (a reason of
'[/]' and of '[bold red]...[link=...]' through `models promote` and `models history`) is in
test_registry.py.
"""

from __future__ import annotations

import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.cli.common import console, err_console, make_console, styled, table

MARKUP = ["[/]", "[bold red]x[/bold red]", "[link=http://x.example]y[/link]", "[", "\\[a]"]


@pytest.mark.parametrize("text", MARKUP)
def test_every_console_prints_markup_as_text(text):
    for c in (console, err_console, make_console(width=200)):
        with c.capture() as cap:
            c.print(text)
            c.print(styled(("error:", "red"), " ", text))
            c.print(table("t", {text: text}))
        out = cap.get()
        assert out.count(text) >= 3, out


def test_an_error_quoting_markup_is_one_literal_line(tmp_path):
    out = flywheel(tmp_path, "run", "--profile", "[/]x.yaml")
    lines = nonblank(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0] == "error: [/]x.yaml: profile not found"
