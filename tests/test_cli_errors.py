"""User errors on the command line: one ``error: ...`` line on stderr, exit code 2, no traceback (``--debug`` shows it)."""

import pytest
import torch

import multiway
from multiway import cli


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_missing_checkpoint_file(tmp_path, capsys):
    code, err = run(
        ["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors"), "--model", "beit3_tiny_patch8_32"], capsys
    )
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "missing.pth" in err[0]


def test_unknown_model_name_lists_the_presets(tmp_path, capsys):
    code, err = run(["convert", str(tmp_path / "x.pth"), str(tmp_path / "out.safetensors"), "--model", "beit3_huge"], capsys)
    assert code == 2 and len(err) == 1 and "beit3_huge" in err[0] and "beit3_base_patch16_224" in err[0]


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    path = tmp_path / "small.pth"
    torch.save({"model": multiway.create_model("beit3_tiny_patch8_32").state_dict()}, path)
    code, err = run(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", "beit3_small_patch8_64"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert"])
    assert e.value.code == 2


def test_missing_optional_extra_names_the_pip_command(monkeypatch, capsys):
    def needs_transformers(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=needs_transformers)
    code, err = run([], capsys)
    assert code == 2 and err == ["error: this command needs the optional package 'transformers': pip install 'multiway[meter]'"]


def test_system_exit_with_a_message_is_one_line_and_exit_2(monkeypatch, capsys):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=lambda args: (_ for _ in ()).throw(SystemExit("give --images or --texts")))
    code, err = run([], capsys)
    assert code == 2 and err == ["error: give --images or --texts"]


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"), "--model", "beit3_tiny_patch8_32"])
    monkeypatch.setenv("MULTIWAY_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"), "--model", "beit3_tiny_patch8_32"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main([])
