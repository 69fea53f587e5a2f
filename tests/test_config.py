"""Yes / no config keys: the command line hands them over as strings, and every consumer reads them right."""

import pytest

from scripts.config import as_bool
from scripts.errors import ConfigError


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("False", False),
                                            (" TRUE ", True), ("false", False)])
def test_as_bool_reads_json_and_command_line_spellings(value, expected):
    assert as_bool(value, "resume") is expected


@pytest.mark.parametrize("value", ["yes", "0", 1, None, "flase"])
def test_as_bool_refuses_anything_else_and_names_the_key(value):
    with pytest.raises(ConfigError, match="Config key 'resume'"):
        as_bool(value, "resume")


def test_resume_false_from_the_command_line_does_not_resume(tmp_path):
    from scripts.handlers import ResumeFromCheckpoint

    (tmp_path / "checkpoint.pt").write_bytes(b"not read")
    assert ResumeFromCheckpoint(str(tmp_path / "checkpoint.pt"), {}, enabled="false").enabled is False
    assert ResumeFromCheckpoint(str(tmp_path / "checkpoint.pt"), {}, enabled="true").enabled is True
