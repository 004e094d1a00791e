"""The offline corpus: deterministic, correct answers, distinct splits."""

import pytest

from pause_flax.data import synthetic


@pytest.mark.parametrize("task", sorted(synthetic.DOWNSTREAM_GENERATORS))
def test_deterministic_and_splits_differ(task):
  train = [synthetic.downstream_example(task, "train", i) for i in range(50)]
  assert train == [synthetic.downstream_example(task, "train", i)
                   for i in range(50)]
  valid = [synthetic.downstream_example(task, "validation", i)
           for i in range(50)]
  assert train != valid
  assert all(q.endswith("=") and a for q, a in train)


def _solve(question: str) -> str:
  body = question[:-1]
  if body.startswith("sum%10 "):
    return str(sum(map(int, body.split()[1])) % 10)
  if body.startswith("sum3 "):
    return str(sum(int(c) for c in body.split()[1]) % 10)
  if body.startswith("count "):
    _, letter, letters = body.split()
    return str(sum(c == letter for c in letters))
  if body.startswith("ptr "):
    *edges, query = body.split()[1:]
    succ = dict(edge.split(">") for edge in edges)
    node, steps = query.split("*")
    for _ in range(int(steps)):
      node = succ[node]
    return node
  a, b = body.split("+")
  return str(int(a) + int(b))


@pytest.mark.parametrize("task", sorted(synthetic.DOWNSTREAM_GENERATORS))
def test_answers_are_right(task):
  for i in range(200):
    question, answer = synthetic.downstream_example(task, "train", i)
    assert _solve(question) == answer


def test_lm_documents_teach_the_formats():
  doc = synthetic.lm_document("train", 0)
  assert doc == synthetic.lm_document("train", 0)
  lines = [l for i in range(20)
           for l in synthetic.lm_document("train", i).splitlines()]
  solved = [l for l in lines if "=" in l]
  assert solved and all(_solve(l.split("=")[0] + "=") == l.split("=")[1]
                        for l in solved)
  assert any(l.endswith(".") for l in lines)  # filler prose


def test_metric_postprocessor_and_errors():
  assert synthetic.postprocess_answer(b" 42\n") == "42"
  assert synthetic.exact_match(["1", "2"], ["1", "3"]) == {"exact_match": 50.0}
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    synthetic.exact_match(["1", "2"], ["1"])
  with pytest.raises(ValueError, match="Unknown synthetic task 'division'"):
    synthetic.downstream_example("division", "train", 0)
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    synthetic.lm_dataset_fn("test")
