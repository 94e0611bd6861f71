"""docs/scripts.md quotes every script's --help, verbatim and current (regenerate: python -m
tests.docs.scripts_reference --write)."""
import pytest

from tests.docs.scripts_reference import PAGE, help_text, python_scripts, quoted_help

QUOTED = quoted_help(PAGE.read_text())


def test_every_script_has_its_help_quoted():
    assert set(python_scripts()) == set(QUOTED), "add a `<!-- help: scripts/NAME.py -->` block to docs/scripts.md"


@pytest.mark.parametrize("script", sorted(QUOTED))
def test_quoted_help_is_current(script):
    assert QUOTED[script] == help_text(script), \
        f"{script} --help changed: run python -m tests.docs.scripts_reference --write"
