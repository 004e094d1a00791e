"""Reads Hugging Face checkpoint files (safetensors, JSON) without torch.

Every malformed file raises one `HFFormatError` whose message names the file
and what is wrong with it (never a bare struct, JSON or memory error).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_REFETCH = "re-download or re-save the checkpoint"


class HFFormatError(ValueError):
  """A Hugging Face file that cannot be read; the message names the file and the problem."""


def parse_json_object(text: str | bytes, path: str) -> dict[str, Any]:
  """The JSON object in `text`, read from `path` (named in any error)."""
  try:
    value = json.loads(text)
  except UnicodeDecodeError as e:
    raise HFFormatError(f"{path}: not UTF-8 text (byte {e.start}); {_REFETCH}") from e
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} "
                        f"(char {e.pos}): {e.msg}; fix the file or {_REFETCH}") from e
  if not isinstance(value, dict):
    raise HFFormatError(f"{path}: holds a JSON {type(value).__name__}, not an object; "
                        f"fix the file or {_REFETCH}")
  return value


def read_json_object(path: str) -> dict[str, Any]:
  """The JSON object in the local file `path`, with errors that name it."""
  with open(path, "rb") as f:
    return parse_json_object(f.read(), path)


def _tensor_layout(path: str, name: str, entry: Any) -> tuple[Any, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry, checked for consistency."""
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
    raise HFFormatError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets in "
                        f"the header; {_REFETCH}")
  dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
  if dtype is None:
    raise HFFormatError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which is "
                        f"not one of {sorted(SAFETENSORS_DTYPES)}")
  shape, offsets = entry["shape"], entry["data_offsets"]
  if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
          and isinstance(offsets, list) and len(offsets) == 2
          and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
    raise HFFormatError(f"{path}: tensor {name!r} has shape {shape!r} and data_offsets "
                        f"{offsets!r}; expected lists of non-negative ints, begin <= end; "
                        f"{_REFETCH}")
  begin, end = offsets
  needed = np.dtype(dtype).itemsize * math.prod(shape)
  if end - begin != needed:
    raise HFFormatError(f"{path}: tensor {name!r} has data_offsets {begin}..{end} "
                        f"({end - begin} bytes) but dtype {entry['dtype']} and shape "
                        f"{tuple(shape)} need {needed} bytes; {_REFETCH}")
  return dtype, tuple(shape), begin, end


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of one .safetensors file as read-only memory maps.

  Parses the format directly (8-byte little-endian header length, JSON
  header, raw little-endian data) so that bf16 works without torch; the
  header length and every tensor's extent are checked against the file size
  before anything is allocated or mapped.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    length_bytes = f.read(8)
    if len(length_bytes) < 8:
      raise HFFormatError(f"{path}: {size} bytes, cut inside the 8-byte header length "
                          f"(truncated or not a safetensors file); {_REFETCH}")
    header_len = int.from_bytes(length_bytes, "little")
    if header_len > size - 8:
      raise HFFormatError(f"{path}: header length {header_len} is past the end of the "
                          f"{size}-byte file (truncated or not a safetensors file); "
                          f"{_REFETCH}")
    header = parse_json_object(f.read(header_len), f"{path} (safetensors header)")
  data_start = 8 + header_len
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, begin, end = _tensor_layout(path, name, entry)
    if data_start + end > size:
      raise HFFormatError(f"{path}: tensor {name!r} ends at byte {data_start + end}, past "
                          f"the end of the {size}-byte file (truncated); {_REFETCH}")
    dtype = np.dtype(dtype).newbyteorder("<")
    if begin == end:  # mmap cannot map zero bytes.
      tensors[name] = np.zeros(shape, dtype)
      continue
    tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin,
                              shape=shape)
  return tensors


# -- an imported model's record -------------------------------------------------------

IMPORT_INFO = "hf_import.json"  # written by hf_checkpoint.import_checkpoint


def read_import_info(path: str) -> dict:
  """The hf_import.json of a directory written by `hf_checkpoint.import_checkpoint`."""
  info_path = os.path.join(path, IMPORT_INFO)
  if not os.path.exists(info_path):
    raise FileNotFoundError(f"{path} has no {IMPORT_INFO}: give the output directory of "
                            "`python -m pause_flax.convert import`.")
  return read_json_object(info_path)
