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


def test_eval_of_a_corrupt_model_json_is_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{not json")
    assert cli.main(["eval", str(tmp_path / "model"), str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "model.json: not JSON" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["eval", str(tmp_path / "model"), str(tmp_path / "data"), "--batches", "-1"]) == 2
    assert "--batches -1" in capsys.readouterr().err
