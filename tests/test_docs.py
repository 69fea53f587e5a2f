"""Every command in the README and the docs still fits the code: config files exist, config keys exist, CLI
commands and their options exist. Nothing is run; the commands are parsed as a user would type them."""

import inspect
import re
import shlex
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "bundle" / "docs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Keys of `python -m monai.bundle run` itself, not of the configs.
RUN_OPTIONS = {"config_file", "meta_file", "logging_file", "init_id", "run_id", "final_id", "tracking", "args_file"}


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
    options, positional, i = {}, [], 0
    while i < len(argv):
        if argv[i].startswith("--"):
            key, _, value = argv[i][2:].partition("=")
            if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            options[key] = value
        else:
            positional.append(argv[i])
        i += 1
    for key in ("config_file", "meta_file"):
        if key not in options:
            continue
        names = options[key]
        names = [n.strip(" '\"") for n in names.strip("[]").split(",")] if names.startswith("[") else [names]
        missing = [n for n in names if not _config_path(n).is_file()]
        assert not missing, f"{doc}:{line}: --{key} files {missing} do not exist"
    if positional[:1] != ["run"]:
        return  # another bundle command (onnx_export, verify_metadata, ...): its own options
    names = options["config_file"]
    names = [n.strip(" '\"") for n in names.strip("[]").split(",")] if names.startswith("[") else [names]
    parser = ConfigParser()
    parser.read_config([str(_config_path(n)) for n in names])
    run_id = positional[1] if len(positional) > 1 else "run"
    assert run_id in parser.config, f"{doc}:{line}: run id '{run_id}' is not a key of {names}"
    for key in set(options) - RUN_OPTIONS:
        assert key.split("#")[0] in parser.config, f"{doc}:{line}: --{key} is not a key of {names}"


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
