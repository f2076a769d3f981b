"""The command line's help: plain text, every subcommand and option listed (no model loaded)."""

import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from tl_linmap.__main__ import main
from tl_linmap.load.models import BUNDLED

OPTIONS = {"demo": ["prompt", "--model", "--top"], "report": ["prompt", "--model", "--output", "--layers", "--top"]}


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _no_markup(text: str) -> None:
    # reST or Markdown markup reads as noise in a terminal.
    assert "`" not in text
    assert not re.search(r":(func|class|meth|mod|attr):", text)


def test_main_help_is_plain_and_lists_the_commands(capsys):
    text = _help(capsys, ["--help"])
    _no_markup(text)
    assert text.startswith("usage: tl-linmap ")
    for command in OPTIONS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command  # listed, with a line of help
        assert f"tl-linmap {command}" in text  # and shown in an example
    for name in BUNDLED:
        assert name in text


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_command_help_is_plain_and_explains_every_option(capsys, command):
    text = _help(capsys, [command, "--help"])
    _no_markup(text)
    assert text.startswith(f"usage: tl-linmap {command} ")
    for option in OPTIONS[command]:
        # The option's line ("  --top TOP   tokens per ...", "  -o OUTPUT, --output OUTPUT")
        # carries a description, or the next line does, indented.
        line = rf"^ +(?:-\w \S+, )?{re.escape(option)}\b[^\n]*?(?: {{2,}}|\n {{20,}})\w"
        assert re.search(line, text, re.M), option


def test_layers_are_parsed_and_a_bad_list_is_explained(capsys):
    from tl_linmap.__main__ import parser

    assert parser().parse_args(["report", "--layers", "0,10,29"]).layers == [0, 10, 29]
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["report", "--layers", "0,ten"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--layers" in error and "comma-separated" in error and "'0,ten'" in error


def test_a_missing_command_is_an_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_module_and_console_script_reach_the_same_main():
    run = subprocess.run([sys.executable, "-m", "tl_linmap", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: tl-linmap ")
    (script,) = entry_points(group="console_scripts", name="tl-linmap")  # installed from pyproject
    assert script.load() is main
