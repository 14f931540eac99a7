"""Issue 24, rule 5: one state directory, chosen on purpose.

The upward search for `.flywheel` stops at the repository or project root (ROOT_MARKERS),
so a store some earlier command left in /tmp or $HOME is never adopted by the directories
below it: before, one `flywheel submit` from /tmp made every later test and project under
/tmp share /tmp/.flywheel. Resolution order otherwise unchanged (test_bad_input_cli.py).
"""

from __future__ import annotations

import pytest

from flywheel.config import ROOT_MARKERS, STATE_ENV, resolve_state_dir, search_dirs


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    assert search_dirs(tmp_path) == [tmp_path], "the test's tmp dir is inside a repository"
    (tmp_path / ".flywheel").mkdir()  # the stray store, as /tmp/.flywheel
    return tmp_path


def test_a_stray_store_above_is_not_adopted_outside_a_repository(tree, monkeypatch):
    work = tree / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert search_dirs(work) == [work]
    assert resolve_state_dir() == (work / ".flywheel", "state_dir")


@pytest.mark.parametrize("marker", ROOT_MARKERS)
def test_the_search_goes_up_to_the_project_root_and_no_further(tree, monkeypatch, marker):
    repo = tree / "repo"
    deep = repo / "src" / "pkg"
    deep.mkdir(parents=True)
    if marker == "pyproject.toml":
        (repo / marker).write_text("[project]\nname = 'x'\n")
    else:
        (repo / marker).mkdir()
    monkeypatch.chdir(deep)
    assert search_dirs(deep) == [deep, repo / "src", repo]
    # the repository has no store yet: the one above it is not taken
    assert resolve_state_dir() == (deep / ".flywheel", "state_dir")
    (repo / ".flywheel").mkdir()
    assert resolve_state_dir() == (repo / ".flywheel", "state_dir")


def test_a_command_below_a_stray_store_makes_its_own_and_says_so(tree, monkeypatch, cli):
    work = tree / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in (tree / ".flywheel").iterdir())
    code, _, err = cli("models", "list")
    assert code == 0 and err == [f"state: {work / '.flywheel'} (new)"], err
    assert (work / ".flywheel" / "mlflow" / "mlflow.db").is_file()
    assert sorted(p.name for p in (tree / ".flywheel").iterdir()) == before  # untouched
