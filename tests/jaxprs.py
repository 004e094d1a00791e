"""Reading programs in tests: every equation of a jaxpr, nested ones included."""

from collections.abc import Iterator

import jax.extend.core


def all_eqns(jaxpr: jax.extend.core.Jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
  """The equations of `jaxpr` and of every jaxpr inside it (scan, remat, custom_vjp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from all_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from all_eqns(sub)
