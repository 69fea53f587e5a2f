"""The one place that reads the ``python -m monai.bundle`` command line: the config files it names and the config
keys it sets.

``python -m monai.bundle <command> ...`` is the bundle's entry point: MONAI hands the command line to ``fire``,
which calls ``monai.bundle.scripts.<command>`` (``run``, ``onnx_export``, ...) with the command's own arguments
(``--config_file``, ``--run_id``, ``--args_file``, ...) and passes every other ``--key value`` on as a config key.
MONAI adds a key that no config file defines as a new, unused item, so a misspelt ``--encoder_weight`` would train
a random encoder without a word. No code of ours runs before the configs are parsed, so the configs call in here:

- ``check_command_line_keys`` (in every config's ``initialize``, and for MONAI's export commands when the model
  settings are read) refuses a key that no config file of the command defines, and, for inference (a config that
  defines ``model_overrides``), a network, window or label key, which the model's record decides;
- ``scripts.deploy.export_checkpoint`` reads the ``--ckpt_file`` that MONAI's export commands keep to themselves.

Nothing else reads the command line: which value wins between a trained model's record and the config is decided
from the values (``scripts.networks.record``). A process not started as ``python -m monai.bundle <command>`` (a
test, the MONAI Label app, ``InferencePipeline``) has no such command line: nothing is checked there.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from scripts.errors import ConfigError, install_excepthook

__all__ = ["CONFIG_COMMANDS", "BundleArguments", "parse_bundle_arguments", "bundle_arguments",
           "check_command_line_keys", "top_level_key", "config_file_keys", "closest_keys"]

# Commands of ``python -m monai.bundle`` that read config files and take config keys as ``--key value``.
CONFIG_COMMANDS = ("run", "run_workflow", "onnx_export", "ckpt_export", "trt_export", "verify_net_in_out")
# How ``python -m monai.bundle`` shows in ``sys.argv[0]`` (also under ``torchrun -m monai.bundle``).
_ENTRY_POINT = ("monai", "bundle", "__main__.py")
# ``--a#b`` (or ``--a::b``) sets part of ``a``; a leading ``+`` merges instead of replacing.
_NESTED = re.compile(r"#|::")


def _is_flag(token: str) -> bool:
    """fire's test: ``--name`` or ``-n...`` (a negative number is a value)."""
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


def top_level_key(key: str) -> str:
    """The top-level config key of ``key`` (``a`` of ``a#b``, ``a::b`` or ``+a``)."""
    return _NESTED.split(key.lstrip("+"), maxsplit=1)[0]


def config_file_keys(files: Sequence[str]) -> set[str]:
    """The top-level keys the config files define."""
    from monai.bundle import ConfigParser

    keys: set[str] = set()
    for file in files:
        keys |= {top_level_key(key) for key in ConfigParser.load_config_file(str(file))}
    return keys


def closest_keys(key: str, candidates) -> str:
    """``did you mean a, b or c?`` for the known keys closest to ``key``, or ``no similar key``."""
    close = difflib.get_close_matches(key, sorted(candidates), n=3, cutoff=0.6)  # best first
    if not close:
        return "no similar key"
    return f"did you mean {' or '.join([', '.join(close[:-1]), close[-1]] if len(close) > 1 else close)}?"


def _own_arguments(command: str | None) -> frozenset[str]:
    """Names of the arguments of ``python -m monai.bundle <command>`` itself, read from the installed MONAI's
    functions; ``run`` and ``run_workflow`` pass the workflow's on (``workflow_type``, ``properties_path``, ...)."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle import scripts as bundle_scripts

    command = command if command in CONFIG_COMMANDS else "run"
    functions = [getattr(bundle_scripts, command)]
    if command in ("run", "run_workflow"):
        functions += [bundle_scripts.create_workflow, ConfigWorkflow.__init__]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return frozenset(name for function in functions
                     for name, parameter in inspect.signature(function).parameters.items()
                     if parameter.kind not in variadic and name != "self")


@dataclass(frozen=True)
class BundleArguments:
    """A ``python -m monai.bundle`` command line, split as fire and MONAI split it.

    Attributes:
        command: ``run``, ``onnx_export``, ...; None when the arguments start with a flag (overrides alone).
        positional: the values after the command that name no argument (``run training``: the run id).
        arguments: the command's own arguments (``config_file``, ``tracking``, ...) with fire's parsed values,
            those of ``--args_file`` included (the command line wins, as in MONAI).
        overrides: the config keys set, as written (``encoder_kwargs#depth``), on the command line and in
            ``--args_file``.
    """

    command: str | None
    positional: tuple[str, ...]
    arguments: dict[str, Any]
    overrides: tuple[str, ...]

    @property
    def keys(self) -> set[str]:
        """The top-level config keys set (``--a#b value`` sets part of ``a``)."""
        return {top_level_key(key) for key in self.overrides}

    @property
    def config_files(self) -> list[str]:
        """The files of ``--config_file``, in order (a list, or one path, or paths joined by commas, as MONAI reads
        them)."""
        files = self.arguments.get("config_file")
        if files is None:
            return []
        if isinstance(files, str):
            files = files.split(",") if "," in files and not Path(files).is_file() else [files]
        return [str(file) for file in files]

    def defined_keys(self) -> set[str]:
        """The top-level keys the command's configs define: those of its config files, ``_meta_`` (MONAI's
        metadata), and with ``--tracking`` those its settings add (``tracking_uri``, ``experiment_name``, ...)."""
        from monai.bundle import ConfigParser
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

        keys = {"_meta_"} | config_file_keys(self.config_files)
        tracking = self.arguments.get("tracking")
        if tracking is not None:
            if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
                tracking = DEFAULT_EXP_MGMT_SETTINGS[tracking]
            settings = ConfigParser.load_config_files(tracking)
            keys |= {top_level_key(key) for key in settings.get("configs", {})}
        return keys

    def own_arguments(self) -> frozenset[str]:
        """Names of the command's own arguments (not config keys)."""
        return _own_arguments(self.command)

    def check_keys(self, record_keys: Sequence[str] = ()) -> None:
        """Refuses the config keys set that no config file of the command defines, and ``record_keys`` where the
        configs define ``model_overrides`` (see ``check_command_line_keys``)."""
        defined = self.defined_keys()
        record_keys = set(record_keys) if "model_overrides" in defined else set()  # inference: the record decides
        given = sorted(self.keys & record_keys)
        if given:
            example = ", ".join(f"'{key}': ..." for key in given)
            raise ConfigError(
                f"{', '.join('--' + key for key in given)}: inference takes the network, window and class "
                "names from the trained model's record (model.pt, or the ONNX file's metadata), so the run "
                f"would ignore {'it' if len(given) == 1 else 'them'}. To rename the classes, or for a model "
                "file written before records existed, give them in model_overrides instead: "
                f"--model_overrides \"{{{example}}}\"."
            )
        unknown = sorted(self.keys - defined)
        if not unknown:
            return
        candidates = defined | self.own_arguments() | record_keys
        described = [f"--{key} ({closest_keys(key, candidates)})" for key in unknown]
        one = len(unknown) == 1
        raise ConfigError(
            f"Unknown config key{'' if one else 's'} on the command line: {'; '.join(described)}. No config file of "
            f"this command ({', '.join(self.config_files) or 'none given'}) defines {'it' if one else 'them'}, so the "
            f"run would ignore {'it' if one else 'them'}. Fix the name, or define your own keys in a JSON config file "
            "passed last in --config_file."
        )


def parse_bundle_arguments(args: Sequence[str]) -> BundleArguments:
    """Splits the arguments after ``python -m monai.bundle`` (``sys.argv[1:]``) as fire does.

    A flag is ``--name`` or ``-n...``; its value follows an ``=`` or is the next token, unless that is a flag
    too or there is none: then the flag means true (``--noname``: ``name`` false). Hyphens in names become
    underscores. Tokens after the last lone ``--`` are fire's own flags. Names of the command's own arguments
    are arguments; every other name is a config key. ``--args_file`` is read: its keys count as given too.

    Args:
        args: the command line after ``python -m monai.bundle``, e.g. ``["run", "training", "--config_file",
            "bundle/configs/train.json", "--roi_size", "[64,64]"]``, or overrides alone (``["--roi_size", "[64,64]"]``,
            read as those of ``run``).

    Examples::

        parse_bundle_arguments(["run", "--config_file", "train.json", "--encoder_kwargs#depth=6"]).keys
        # {"encoder_kwargs"}
    """
    from fire.parser import DefaultParseValue

    args = [str(arg) for arg in args]
    if "--" in args:
        args = args[:len(args) - 1 - args[::-1].index("--")]
    command = args[0] if args and not _is_flag(args[0]) else None
    own = _own_arguments(command)
    arguments: dict[str, Any] = {}
    positional: list[str] = []
    overrides: list[str] = []
    index = 1 if command else 0
    while index < len(args):
        token = args[index]
        index += 1
        if not _is_flag(token):
            positional.append(token)
            continue
        name, equals, value = token.lstrip("-").partition("=")
        name = name.replace("-", "_")
        if not equals:
            if index < len(args) and not _is_flag(args[index]):
                value, index = args[index], index + 1
            elif name not in own and name.startswith("no"):
                name, value = name[2:], "False"
            else:
                value = "True"
        if name in own:
            arguments[name] = DefaultParseValue(value)
        else:
            overrides.append(name)
    if arguments.get("args_file"):
        from monai.bundle import ConfigParser

        for name, value in ConfigParser.load_config_file(arguments["args_file"]).items():
            if name in own:
                arguments.setdefault(name, value)
            else:
                overrides.append(name)
    return BundleArguments(command, tuple(positional), arguments, tuple(overrides))


def bundle_arguments(argv: Sequence[str] | None = None) -> BundleArguments | None:
    """This process's ``python -m monai.bundle`` command line, or None when it was not started that way.

    Args:
        argv: a whole command line, program first, as ``sys.argv``. Defaults to ``sys.argv``.

    Returns:
        The parsed arguments when ``argv[0]`` is ``monai/bundle/__main__.py`` and ``argv[1]`` one of
        ``CONFIG_COMMANDS``; otherwise None (a test, a server, a script that parses a config itself).
    """
    argv = [str(arg) for arg in (sys.argv if argv is None else argv)]
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != _ENTRY_POINT or argv[1] not in CONFIG_COMMANDS:
        return None
    return parse_bundle_arguments(argv[1:])


def check_command_line_keys(argv: Sequence[str] | None = None, record_keys: Sequence[str] = ()) -> None:
    """Refuses config keys on the ``python -m monai.bundle`` command line that no config file of the command
    defines (MONAI would add them unused, and the run would ignore them). Does nothing in a process not started
    through ``monai.bundle``.

    The first expression of every config's ``initialize`` after the error hook, so it runs before any data is
    read or any network is built; MONAI's export commands, which run no ``initialize``, meet it when the model
    settings are read (``scripts.networks.trained_settings``), so it installs the one-line error hook itself. A key
    of the user's own is accepted once a config file passed in ``--config_file`` (e.g. the user's JSON, last)
    defines it.

    Args:
        argv: a whole command line, program first. Defaults to ``sys.argv``.
        record_keys: the keys of a model's record (``scripts.networks.RECORD_KEYS``). An inference config (one that
            defines ``model_overrides``) refuses them: the trained model's record decides them.

    Raises:
        ConfigError: naming each unknown key and the closest defined keys and arguments (``--encoder_weight``:
            did you mean ``encoder_weights``?).
    """
    arguments = bundle_arguments(argv)
    if arguments is not None:
        install_excepthook()
        arguments.check_keys(record_keys)
