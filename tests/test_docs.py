"""Every command in the README and the docs still fits the code: config files exist, config keys exist, CLI
commands and their options exist. Nothing is run; the commands are parsed as a user would type them."""

import dataclasses
import inspect
import re
import shlex
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.bundle_args import CONFIG_COMMANDS, parse_bundle_arguments

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "bundle" / "docs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(kind: str) -> list[tuple[str, int, list[str]]]:
    """(file, line, argv) of every ``python -m <kind> ...`` command in a code block of the docs."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        in_code, i = False, 0
        while i < len(lines):
            line = lines[i]
            if line.strip().startswith("```"):
                in_code = not in_code
            elif in_code and f"python -m {kind} " in line:
                start, text = i, line
                while text.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i].strip()
                text = text[text.index(f"python -m {kind} "):].split(" #")[0]
                text = re.sub(r"\[--[^\]]*\]", "", text)  # optional parts written as [--key value]
                found.append((doc.name, start + 1, shlex.split(text)[3:]))
            i += 1
    return found


def _config_path(name: str) -> Path:
    path = REPO / name
    if not path.exists() and name.startswith("configs/"):
        path = REPO / "bundle" / name  # commands run inside the packed bundle, whose configs/ is bundle/configs/
    return path


BUNDLE = _commands("monai.bundle")
CLI = _commands("scripts.cli")


def test_the_docs_hold_commands_to_check():
    assert len(BUNDLE) >= 10 and len(CLI) >= 10


@pytest.mark.parametrize("doc,line,argv", BUNDLE, ids=[f"{d}:{n}" for d, n, _ in BUNDLE])
def test_bundle_commands_name_existing_configs_and_keys(doc, line, argv):
    command = parse_bundle_arguments(argv)  # as the bundle's own key check reads a command line
    for key in ("config_file", "meta_file"):
        names = command.arguments.get(key)
        names = [] if names is None else [names] if isinstance(names, str) else names
        missing = [n for n in names if not _config_path(n).is_file()]
        assert not missing, f"{doc}:{line}: --{key} files {missing} do not exist"
    if command.command not in CONFIG_COMMANDS:
        return  # verify_metadata, download, ...: no config keys
    files = [str(_config_path(n)) for n in command.config_files]
    if command.command == "run":
        parser = ConfigParser()
        parser.read_config(files)
        run_id = command.arguments.get("run_id", command.positional[0] if command.positional else "run")
        assert run_id in parser.config, f"{doc}:{line}: run id '{run_id}' is not a key of {files}"
    dataclasses.replace(command, arguments={**command.arguments, "config_file": files}).check_keys()


@pytest.mark.parametrize("doc,line,argv", CLI, ids=[f"{d}:{n}" for d, n, _ in CLI])
def test_cli_commands_and_options_exist(doc, line, argv):
    from scripts.cli import commands
    from scripts.study.runner import parse_args

    if argv[0] == "study":
        with pytest.raises(SystemExit) if "--help" in argv else _nothing():
            parse_args([a for a in argv[1:]])
        return
    table = commands()
    assert argv[0] in table, f"{doc}:{line}: unknown command '{argv[0]}'"
    function = table[argv[0]]
    rest = argv[1:]
    if isinstance(function, dict):
        assert rest and rest[0] in function, f"{doc}:{line}: unknown '{argv[0]} {rest[:1]}'"
        function, rest = function[rest[0]], rest[1:]
    signature = inspect.signature(inspect.unwrap(function))
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for option in (a[2:].split("=")[0] for a in rest if a.startswith("--")):
        assert takes_any or option in signature.parameters, f"{doc}:{line}: '{argv[0]}' has no option --{option}"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False
