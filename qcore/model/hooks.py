"""Hooks: how the engine watches (and changes) a model's layers without editing the model's code.

Every module that adds hooks (calibration, simulation, sensitivity, explain, roofline) adds them to a
*private copy* of the model: a hook on a shared model would be copied, with the model, into every
copy another thread takes meanwhile. Two tools:

- ``temporary_hooks``: registers ``(module, hook)`` pairs for a ``with`` block and always removes them;
- ``run_with_hooks``: runs batches through a fresh private copy of a model carrying hooks on its
  named modules (eval mode, ``torch.no_grad``); the caller's model is only read.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

Hooks = Iterable[tuple[nn.Module, Callable]]


@contextmanager
def temporary_hooks(pre: Hooks = (), post: Hooks = (), post_kwargs: Hooks = ()):
    """For the ``with`` block, each ``(module, hook)`` of ``pre`` is a forward pre-hook, of ``post`` a
    forward hook, of ``post_kwargs`` a forward hook that also receives keyword arguments; all are
    removed when the block ends, also on errors. Use it on a private copy of a model only."""
    with ExitStack() as stack:
        for module, hook in pre:
            stack.enter_context(module.register_forward_pre_hook(hook))
        for module, hook in post:
            stack.enter_context(module.register_forward_hook(hook))
        for module, hook in post_kwargs:
            stack.enter_context(module.register_forward_hook(hook, with_kwargs=True))
        yield


def run_with_hooks(model: nn.Module, batches: Iterable[tuple], pre: Mapping[str, Callable] | None = None,
                   post: Mapping[str, Callable] | None = None,
                   progress: Callable[[float], None] | None = None) -> None:
    """Run each batch (a tuple of model inputs) through a private copy of ``model`` in eval mode under
    ``torch.no_grad``, with forward pre-hooks ``pre`` and forward hooks ``post`` (module name -> hook)
    on the copy's modules of those names. ``progress(fraction done)`` after each batch. ``model`` is
    left exactly as it was (no hooks, same mode); the outputs are discarded (the hooks record)."""
    batches = list(batches)
    private = copy.deepcopy(model).eval()
    modules = dict(private.named_modules())
    with temporary_hooks(pre=[(modules[n], h) for n, h in (pre or {}).items()],
                         post=[(modules[n], h) for n, h in (post or {}).items()]), torch.no_grad():
        for i, batch in enumerate(batches):
            private(*batch)
            if progress:
                progress((i + 1) / len(batches))
