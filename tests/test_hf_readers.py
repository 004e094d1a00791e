"""Malformed Hugging Face files: one clear error naming the file (no torch needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from pause_flax import hf_checkpoint
from pause_flax.hf_files import HFFormatError, read_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _safetensors(path, header, data=b"", header_len=None):
  """Writes a safetensors file: 8-byte little-endian length, JSON header, data."""
  text = json.dumps(header).encode() if isinstance(header, dict) else header
  length = len(text) if header_len is None else header_len
  with open(path, "wb") as f:
    f.write(length.to_bytes(8, "little") + text + data)
  return str(path)


def _valid(path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
  header = {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]},
            "empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [28, 28]}}
  return _safetensors(path, header, a.tobytes() + b.tobytes()), a, b


def test_a_valid_file_reads_back(tmp_path):
  path, a, b = _valid(tmp_path / "ok.safetensors")
  tensors = read_safetensors(path)
  np.testing.assert_array_equal(tensors["a"], a)
  np.testing.assert_array_equal(tensors["b"].astype(np.float32), b.astype(np.float32))
  assert tensors["empty"].shape == (0, 4) and "__metadata__" not in tensors


def _refused(path, match):
  with pytest.raises(HFFormatError, match=match) as info:
    read_safetensors(path)
  message = str(info.value)
  assert message.startswith(str(path)) and "\n" not in message


def test_file_cut_inside_the_length(tmp_path):
  path = tmp_path / "cut.safetensors"
  path.write_bytes(b"\x10\x00\x00")
  _refused(path, "3 bytes, cut inside the 8-byte header length")


def test_absurd_header_length(tmp_path):
  path, _, _ = _valid(tmp_path / "big.safetensors")
  with open(path, "r+b") as f:
    f.write((2**62).to_bytes(8, "little"))
  _refused(path, f"header length {2**62} is past the end of the")


def test_file_cut_inside_the_json_header(tmp_path):
  path, _, _ = _valid(tmp_path / "cut.safetensors")
  with open(path, "rb") as f:
    head = f.read(30)
  with open(path, "wb") as f:
    f.write(head)
  _refused(path, "header length .* is past the end of the 30-byte file")


def test_header_that_is_not_json(tmp_path):
  path = _safetensors(tmp_path / "bad.safetensors", b'{"a": {"dtype": "F32",,}}')
  _refused(path, r"\(safetensors header\): invalid JSON at line 1 column 23")


def test_header_that_is_not_utf8(tmp_path):
  path = _safetensors(tmp_path / "bad.safetensors", b'{"\xff": 1}')
  _refused(path, "not UTF-8 text")


def test_offsets_beyond_the_file(tmp_path):
  header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
  path = _safetensors(tmp_path / "short.safetensors", header, b"\0" * 40)
  _refused(path, "tensor 'w' ends at byte .*, past the end of the .*-byte file")


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "need 16 bytes"),
    ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}, "need .* bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "begin <= end"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "non-negative ints"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, "dtype 'Q4'"),
    ({"shape": [4], "data_offsets": [0, 16]}, "lacks dtype, shape or data_offsets"),
    ([0, 16], "lacks dtype, shape or data_offsets"),
])
def test_entries_inconsistent_with_their_dtype_and_shape(tmp_path, entry, match):
  path = _safetensors(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 16)
  _refused(path, f"tensor 'w' .*{match}")


_CONFIG = {"model_type": "llama", "vocab_size": 32, "num_hidden_layers": 1, "hidden_size": 16,
           "num_attention_heads": 2, "intermediate_size": 32}


def _hf_dir(tmp_path, config_text):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(config_text)
  return hf_dir


def test_bad_config_json_names_the_file(tmp_path):
  hf_dir = _hf_dir(tmp_path, '{"model_type": "llama",\n "hidden_size": 64,,}')
  with pytest.raises(HFFormatError) as info:
    hf_checkpoint.import_checkpoint(str(hf_dir), str(tmp_path / "out"))
  assert str(info.value).startswith(f"{hf_dir / 'config.json'}: invalid JSON at line 2 "
                                    "column 20")


def test_config_json_that_is_not_an_object(tmp_path):
  hf_dir = _hf_dir(tmp_path, "[1, 2]")
  with pytest.raises(HFFormatError, match="config.json: holds a JSON list, not an object"):
    hf_checkpoint.import_checkpoint(str(hf_dir), str(tmp_path / "out"))


def test_config_json_without_a_required_key(tmp_path):
  config = {k: v for k, v in _CONFIG.items() if k != "hidden_size"}
  with pytest.raises(HFFormatError, match="config.json has no integer hidden_size"):
    hf_checkpoint.config_from_hf(config)


def test_bad_index_json_names_the_file(tmp_path):
  hf_dir = _hf_dir(tmp_path, "{}")
  (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": ')
  with pytest.raises(HFFormatError, match="model.safetensors.index.json: invalid JSON"):
    hf_checkpoint.load_hf_weights(str(hf_dir))


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "pause_flax.convert", *args], cwd=REPO,
                        capture_output=True, text=True, check=False,
                        env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("case", ["missing_dir", "bad_safetensors"])
def test_convert_refuses_bad_input_in_one_line(tmp_path, case):
  hf_dir = tmp_path / "nowhere"
  if case == "bad_safetensors":
    hf_dir = _hf_dir(tmp_path, json.dumps(_CONFIG))
    (hf_dir / "model.safetensors").write_bytes(b"\x01\x02")
  result = _convert("import", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("convert: error: --hf_dir: "), lines
  expected = "is not a directory" if case == "missing_dir" else "cut inside the 8-byte"
  assert expected in lines[0]


def test_convert_names_a_missing_flag():
  result = _convert("export", "--out=x")
  assert result.returncode == 2
  assert result.stderr.strip() == "convert: error: export needs --checkpoint; add --checkpoint=DIR"


def test_convert_debug_shows_the_traceback(tmp_path):
  result = _convert("import", f"--hf_dir={tmp_path / 'nowhere'}", f"--out={tmp_path}",
                    "--debug")
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "is not a directory" in result.stderr
