"""One error base: the CLI prints exactly vidgen's own errors as one line and lets bugs show."""

from __future__ import annotations

import pytest

from vidgen import capacity, cli, errors, media, storage
from vidgen.data.format import DatasetError
from vidgen.jobs import JobsError
from vidgen.render.spec import SpecError
from vidgen.train.config import ConfigError
from vidgen.train.export import ExportError


@pytest.mark.parametrize("cls", [storage.StorageError, storage.NotFoundError, media.MediaError, DatasetError,
                                 ConfigError, ExportError, SpecError, JobsError, errors.InputError, cli.UserError])
def test_every_user_error_derives_from_the_one_base(cls):
    assert issubclass(cls, errors.VidgenError)


def test_a_bug_raising_valueerror_shows_its_traceback_not_a_one_line_error(monkeypatch, capsys):
    def bug(*_args, **_kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(capacity, "plan", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["plan", "--render-minutes", "10"])
    assert "vidgen: error" not in capsys.readouterr().err


def test_a_user_error_is_one_line_with_exit_2(capsys):
    assert cli.main(["plan", "--render-minutes", "10", "--size", "wide"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidgen: error: --size 'wide'") and len(err.strip().splitlines()) == 1
