"""Every command in the README and the docs still fits the code: config files exist, config keys exist, CLI
commands and their options exist. Nothing is run; the commands are parsed as a user would type them.

Checked: ``python -m monai.bundle``, ``torchrun ... -m monai.bundle``, ``python -m scripts.cli`` and
``python -m scripts.benchmarks.<name>`` in the code blocks and the inline code of README.md, bundle/docs/README.md
and docs/*.md. Paths are placeholders and are not checked, except the config files, which must exist."""

import dataclasses
import inspect
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.errors import ConfigError

from scripts.bundle_args import CONFIG_COMMANDS, parse_bundle_arguments

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "bundle" / "docs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# A command line of a checked module: ``python``, ``.venv/bin/python`` or ``torchrun`` (with its options), then ``-m``.
COMMAND = re.compile(r"(?:^|\s)(?P<launcher>\S*python3?|torchrun)\s+(?:\S+\s+)*?-m\s+"
                     r"(?P<module>monai\.bundle|scripts\.cli|scripts\.benchmarks\.\w+)(?=\s|$)(?P<args>.*)")
# Shell operators between commands on one line (``... && .venv/bin/python -m monai.bundle ...``).
SEPARATOR = re.compile(r"\s*(?:&&|\|\||;)\s*|\s\|\s")
# Values written as placeholders in prose: ``prepare ...``, ``--weights ...``, ``<file>``.
PLACEHOLDER = re.compile(r"^(\.\.\.|<[^>]*>)$")


def _snippets(doc: Path) -> list[tuple[int, str, bool]]:
    """(line, text, inline) of every line of the code blocks of ``doc`` (continuation lines joined, comments cut) and
    of every inline code span of its prose (spans broken over lines joined)."""
    lines = doc.read_text().splitlines()
    snippets, prose, in_code, i = [], [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            in_code = not in_code
            prose.append("")
        elif in_code:
            start, text = i, line
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
                prose.append("")
            snippets.append((start + 1, text.split(" #")[0], False))
            prose.append("")
        else:
            prose.append(line)
        i += 1
    text = "\n".join(prose)
    for span in re.finditer(r"`([^`]+)`", text):
        snippets.append((text.count("\n", 0, span.start()) + 1, re.sub(r"\s*\n\s*", " ", span.group(1)), True))
    return snippets


def _commands() -> list[tuple[str, int, str, str, list[str]]]:
    """(file, line, launcher, module, arguments after the module) of every checked command of the docs."""
    found = []
    for doc in DOCS:
        for line, text, inline in _snippets(doc):
            for part in SEPARATOR.split(text):
                match = COMMAND.search(part)
                if match is None:
                    continue
                args = re.sub(r"\[--[^\]]*\]", "", match["args"])  # optional parts written as [--key value]
                argv = [arg for arg in shlex.split(args) if not PLACEHOLDER.match(arg)]
                if inline and argv:
                    argv[-1] = argv[-1].rstrip(".,;:")  # a command that ends a sentence
                found.append((doc.relative_to(REPO).as_posix(), line, match["launcher"], match["module"], argv))
    return found


def _config_path(name: str) -> Path:
    path = REPO / name
    if not path.exists() and name.startswith("configs/"):
        path = REPO / "bundle" / name  # commands run inside the packed bundle, whose configs/ is bundle/configs/
    return path


COMMANDS = _commands()
BUNDLE = [(doc, line, argv) for doc, line, _, module, argv in COMMANDS if module == "monai.bundle"]
CLI = [(doc, line, argv) for doc, line, _, module, argv in COMMANDS if module == "scripts.cli" and argv]
BENCHMARKS = [(doc, line, module, argv) for doc, line, _, module, argv in COMMANDS
              if module.startswith("scripts.benchmarks.")]


def test_the_docs_hold_commands_to_check():
    assert len(BUNDLE) >= 10 and len(CLI) >= 10 and len(BENCHMARKS) >= 5
    assert any(launcher == "torchrun" for _, _, launcher, _, _ in COMMANDS)
    assert any(doc == "bundle/docs/README.md" for doc, _, _ in BUNDLE)


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


def _anchors(doc: Path) -> set[str]:
    """The link anchors of the headings of ``doc``, as GitHub makes them (lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` on repeats)."""
    seen, found, in_code = {}, set(), False
    for line in doc.read_text().splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            repeats = seen.get(slug, 0)
            seen[slug] = repeats + 1
            found.add(f"{slug}-{repeats}" if repeats else slug)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_links_to_sections_find_their_heading(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = doc.parent / target if target else doc
        if not linked.is_file() or anchor not in _anchors(linked):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc.relative_to(REPO)}: links to missing sections: {broken}"


def _fire_arguments(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional values and ``{name: value}`` as fire reads them: ``--name value``, ``--name=value``, a lone
    ``--name`` (true); hyphens in names become underscores."""
    positional, named, i = [], {}, 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if not token.startswith("--"):
            positional.append(token)
            continue
        name, equals, value = token[2:].partition("=")
        if not equals:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                value = "True"
        named[name.replace("-", "_")] = value
    return positional, named


def _check_fire_call(where: str, function, argv: list[str]) -> None:
    """Fails unless fire could call ``function`` with ``argv``: known option names (``--noname`` for a flag), no more
    positional values than parameters. Options beside a ``config_file`` parameter that the function passes on as
    ``**overrides`` must be keys of that config file."""
    positional, named = _fire_arguments(argv)
    signature = inspect.signature(inspect.unwrap(function))
    parameters = signature.parameters
    for name in [n for n in named if n not in parameters and n.startswith("no") and n[2:] in parameters]:
        named[name[2:]] = "False"
        del named[name]
    try:
        signature.bind_partial(*positional, **named)
    except TypeError as err:
        raise AssertionError(f"{where}: {err}") from err
    extra = [name for name in named if name not in parameters]
    if extra and "config_file" in parameters:
        config_file = named.get("config_file", parameters["config_file"].default)
        config = ConfigParser.load_config_file(str(_config_path(config_file)))
        unknown = [name for name in extra if name.split("#")[0] not in config]
        assert not unknown, f"{where}: {['--' + name for name in unknown]} are not keys of its config file"


@pytest.mark.parametrize("doc,line,argv", CLI, ids=[f"{d}:{n}" for d, n, _ in CLI])
def test_cli_commands_and_options_exist(doc, line, argv):
    from scripts.cli import commands
    from scripts.study.runner import parse_args

    where = f"{doc}:{line}: python -m scripts.cli {' '.join(argv)}"
    if argv == ["study"]:
        return  # the command named in prose
    if argv[0] == "study":
        try:
            parse_args(argv[1:])
        except SystemExit as stop:  # argparse's exit: 0 after --help, 2 after an unknown or malformed option
            assert stop.code == 0 and "--help" in argv, f"{where}: refused by the study's parser"
        return
    table = commands()
    assert argv[0] in table, f"{where}: unknown command '{argv[0]}' (commands: {sorted(table)})"
    function, rest = table[argv[0]], argv[1:]
    if isinstance(function, dict):
        if not rest:
            return  # the command group named in prose (``prepare``)
        assert rest[0] in function, f"{where}: unknown '{argv[0]} {rest[0]}' (known: {sorted(function)})"
        function, rest = function[rest[0]], rest[1:]
    _check_fire_call(where, function, rest)


_FIRE_COMPONENTS: dict = {}


def _fire_component(module: str, monkeypatch):
    """What ``python -m <module>`` hands to fire: the module runs as ``__main__`` with ``fire.Fire`` caught."""
    if module not in _FIRE_COMPONENTS:
        import fire

        caught = []
        monkeypatch.setattr(fire, "Fire", lambda component=None, *args, **kwargs: caught.append(component))
        monkeypatch.setattr(sys, "argv", [module])
        monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # entry points install their own hook
        runpy.run_module(module, run_name="__main__")
        assert len(caught) == 1, f"python -m {module} hands {len(caught)} components to fire, not one"
        _FIRE_COMPONENTS[module] = caught[0]
    return _FIRE_COMPONENTS[module]


@pytest.mark.parametrize("doc,line,module,argv", BENCHMARKS, ids=[f"{d}:{n}" for d, n, _, _ in BENCHMARKS])
def test_benchmark_commands_and_options_exist(doc, line, module, argv, monkeypatch):
    _check_fire_call(f"{doc}:{line}: python -m {module} {' '.join(argv)}", _fire_component(module, monkeypatch), argv)


def _first(commands, test):
    return next(command for command in commands if test(command[-1]))


def test_a_renamed_key_option_or_config_file_fails_the_checks(monkeypatch):
    """The checks above can fail: the docs' own commands, with one name changed as a rename in the code would."""
    doc, line, argv = _first(BUNDLE, lambda a: a[:2] == ["run", "training"] and "--datalist" in a)
    renamed = [a.replace("--datalist", "--data_list") for a in argv]
    with pytest.raises((AssertionError, ConfigError), match="data_list"):
        test_bundle_commands_name_existing_configs_and_keys(doc, line, renamed)
    moved = [a.replace("train.json", "training.json") for a in argv]
    with pytest.raises(AssertionError, match="training.json"):
        test_bundle_commands_name_existing_configs_and_keys(doc, line, moved)
    doc, line, argv = _first(CLI, lambda a: a[:2] == ["prepare", "folder"] and "--validation_ratio" in a)
    with pytest.raises(AssertionError, match="val_ratio"):
        test_cli_commands_and_options_exist(doc, line, [a.replace("--validation_ratio", "--val_ratio") for a in argv])
    with pytest.raises(AssertionError, match="unknown 'prepare folders'"):
        test_cli_commands_and_options_exist(doc, line, [a.replace("folder", "folders", 1) for a in argv])
    doc, line, argv = _first(CLI, lambda a: a[:1] == ["study"] and "--recipe" in a)
    with pytest.raises(AssertionError, match="refused by the study's parser"):
        test_cli_commands_and_options_exist(doc, line, [a.replace("--recipe", "--recipes") for a in argv])
    doc, line, module, argv = _first(BENCHMARKS, lambda a: "--iterations" in a)
    renamed = [a.replace("--iterations", "--iters") for a in argv]
    with pytest.raises(AssertionError, match="iters"):
        test_benchmark_commands_and_options_exist(doc, line, module, renamed, monkeypatch)
