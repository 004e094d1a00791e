"""Every relative link in README.md and docs/*.md resolves to a file and, for a
markdown target with '#anchor', to one of its headings (GitHub's heading ids).

Strict: a link to a page that does not exist yet fails, so the manual's pages
must all be present before a merge. No jax, no network; runs in well under a second.
"""

import collections
import os
import re
import unicodedata
import urllib.parse

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target stops at whitespace or ')'.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def markdown_files():
  docs = os.path.join(REPO, "docs")
  names = sorted(n for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
  return ["README.md"] + [os.path.join("docs", n) for n in names]


def _prose_lines(text):
  """Lines outside fenced code blocks, with inline code removed."""
  in_fence = False
  for line in text.splitlines():
    if _FENCE.match(line):
      in_fence = not in_fence
      continue
    if not in_fence:
      yield line


def github_slug(heading):
  """The id GitHub gives a heading: lowercase, punctuation dropped, spaces -> '-'."""
  text = heading.strip().lower()
  kept = []
  for ch in text:
    cat = unicodedata.category(ch)
    if ch in " -_" or cat[0] in "LNM":
      kept.append(ch)
  return "".join(kept).replace(" ", "-")


def anchors(path):
  with open(path, encoding="utf-8") as f:
    text = f.read()
  seen = collections.Counter()
  out = set()
  for line in _prose_lines(text):
    m = _HEADING.match(line)
    if not m:
      continue
    # Links in a heading keep only their text; markup characters are punctuation anyway.
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))
    slug = github_slug(title)
    out.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
    seen[slug] += 1
  return out


def links(rel_path):
  """(line number, target) for every link in a markdown file, outside code."""
  with open(os.path.join(REPO, rel_path), encoding="utf-8") as f:
    text = f.read()
  in_fence = False
  for number, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      in_fence = not in_fence
      continue
    if in_fence:
      continue
    for m in _LINK.finditer(_INLINE_CODE.sub("", line)):
      yield number, m.group(1)


def broken_links(rel_path):
  problems = []
  base = os.path.dirname(os.path.join(REPO, rel_path))
  for number, target in links(rel_path):
    if target.startswith(_EXTERNAL):
      continue
    path_part, _, anchor = target.partition("#")
    path_part = urllib.parse.unquote(path_part)
    resolved = os.path.normpath(os.path.join(base, path_part)) if path_part else os.path.join(
        REPO, rel_path)
    where = f"{rel_path}:{number}: {target}"
    if not resolved.startswith(REPO + os.sep):
      problems.append(f"{where} (points outside the repository)")
    elif not os.path.exists(resolved):
      problems.append(f"{where} (no such file: {os.path.relpath(resolved, REPO)})")
    elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
      problems.append(f"{where} (no heading with id '{anchor}' in "
                      f"{os.path.relpath(resolved, REPO)})")
  return problems


@pytest.mark.parametrize("rel_path", markdown_files())
def test_relative_links_resolve(rel_path):
  problems = broken_links(rel_path)
  assert not problems, "broken links:\n" + "\n".join(problems)


def test_docs_index_lists_every_page():
  with open(os.path.join(REPO, "docs", "index.md"), encoding="utf-8") as f:
    index = f.read()
  pages = [os.path.basename(p) for p in markdown_files() if p.startswith("docs")]
  missing = [p for p in pages if p != "index.md" and f"]({p}" not in index]
  assert not missing, f"docs/index.md does not link: {missing}"


@pytest.mark.parametrize("heading, slug", [
    ("Evaluation: `python -m pause_flax.eval`", "evaluation-python--m-pause_flaxeval"),
    ("3. Put C4 (TFDS `c4/en:3.0.1`) on GCS", "3-put-c4-tfds-c4en301-on-gcs"),
    ("GPU MFU (H100 and H200, 2026-11-28)", "gpu-mfu-h100-and-h200-2026-11-28"),
])
def test_github_slug(heading, slug):
  assert github_slug(heading) == slug
