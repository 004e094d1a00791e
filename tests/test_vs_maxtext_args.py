"""benchmarks/vs_maxtext.py's command line: the shape and batch it is asked to time."""

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "vs_maxtext.py")
_spec = importlib.util.spec_from_file_location("vs_maxtext", _PATH)
vs_maxtext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_maxtext)


def _args(monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", ["vs_maxtext.py", *argv])
  return vs_maxtext.parse_args()


def test_shape_defaults_to_bench_4l_and_derives_head_dim():
  assert vs_maxtext.parse_shape("") == dict(vs_maxtext.DEFAULT_SHAPE, kv_heads=4)
  shape = vs_maxtext.parse_shape("layers=6,d_model=384,heads=6,mlp=1536,seq=512")
  assert (shape["layers"], shape["d_model"], shape["heads"], shape["head_dim"],
          shape["kv_heads"], shape["mlp"], shape["vocab"], shape["seq"]) == (
              6, 384, 6, 64, 6, 1536, 32000, 512)
  # An explicit head_dim wins; kv_heads keeps its own value.
  shape = vs_maxtext.parse_shape("d_model=512,heads=8,head_dim=32,kv_heads=2")
  assert (shape["head_dim"], shape["kv_heads"]) == (32, 2)
  assert vs_maxtext.parse_shape(vs_maxtext.shape_arg(shape)) == shape


@pytest.mark.parametrize("text, fragment", [
    ("layer=6", "'layer=6'"), ("layers=0", "'layers=0'"), ("seq=x", "'seq=x'"),
    ("d_model=100,heads=3", "d_model=100 is not divisible by heads=3"),
])
def test_bad_shape_is_refused_naming_the_item(text, fragment):
  with pytest.raises(ValueError, match=fragment):
    vs_maxtext.parse_shape(text)


def test_args_parse_batch_chunk_and_python(monkeypatch):
  python = os.path.realpath(sys.executable)
  args = _args(monkeypatch, "--batch=4", "--shape=layers=8,d_model=512,heads=8,seq=512",
               "--loss_chunk_len=0", f"--pause_flax_python={python}")
  assert (args.batch, args.model_shape["layers"], args.model_shape["head_dim"]) == (4, 8, 64)
  assert args.loss_chunk_len == 0 and args.pause_flax_python == python
  assert _args(monkeypatch).loss_chunk_len == "auto"
  assert _args(monkeypatch).pause_flax_python == sys.executable


def test_missing_pause_flax_python_is_refused(monkeypatch, capsys, tmp_path):
  missing = str(tmp_path / "venv312" / "bin" / "python")
  with pytest.raises(SystemExit) as e:
    _args(monkeypatch, f"--pause_flax_python={missing}")
  assert e.value.code == 2
  assert f"--pause_flax_python={missing}: not an executable" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--batch=3"], ["--batch=0"], ["--shape=vocab=-1"], ["--loss_chunk_len=some"],
])
def test_bad_args_exit_2(monkeypatch, capsys, argv):
  with pytest.raises(SystemExit) as e:
    _args(monkeypatch, *argv)
  assert e.value.code == 2
  assert argv[0].split("=")[1] in capsys.readouterr().err
