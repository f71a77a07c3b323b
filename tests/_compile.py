"""Shared helpers of the torch.compile tests (issue 15): graph breaks, and compiled == eager."""

from __future__ import annotations

import torch


def _backend(graphs):
    """aot_eager; with a list ``graphs``, the code of each graph dynamo traced is appended to it."""
    if graphs is None:
        return "aot_eager"
    from torch._dynamo.backends.debugging import aot_eager

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    return record


def compiled_matches_eager(fn, inputs, atol=1e-5, rtol=1e-5, *, some_grads=False, graphs=None):
    """fn compiled with fullgraph=True (aot_eager: dynamo + AOTAutograd, no codegen) gives the eager
    result and gradients of the inputs that require grad (``some_grads``: there must be some);
    ``graphs``: a list that gets the traced graph's code. Returns the compiled function."""
    torch._dynamo.reset()
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager.float().sum(), [x for x in leaves if x.requires_grad])
    leaves2 = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    compiled_fn = torch.compile(fn, fullgraph=True, backend=_backend(graphs))
    compiled = compiled_fn(*leaves2)
    grads = torch.autograd.grad(compiled.float().sum(), [x for x in leaves2 if x.requires_grad])
    torch.testing.assert_close(compiled, eager, atol=atol, rtol=rtol)
    if some_grads:
        assert len(grads) == len(eager_grads) > 0
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, atol=atol, rtol=rtol)
    return compiled_fn


def no_graph_breaks(fn, *inputs, one_graph=False):
    """``torch._dynamo.explain`` finds no graph break in ``fn(*inputs)`` (``one_graph``: and one graph)."""
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(*inputs)
    assert explain.graph_break_count == 0, [str(b.reason) for b in explain.break_reasons]
    if one_graph:
        assert explain.graph_count == 1


def model_step(model):
    """A training step's loss as a function of the batch (what a compiled training loop traces)."""

    def step(input_ids, attention_mask, labels):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    return step


def step_breaks(model, batch):
    """(graph breaks, their first lines) of the model's step on ``batch``."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model_step(model))(**batch)
    return ex.graph_break_count, [str(b.reason).splitlines()[0] for b in ex.break_reasons]


def loss_and_grads(step, model, batch):
    model.zero_grad(set_to_none=True)
    loss = step(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step_compiles_to_eager(model, batch, *, wrap=lambda step: step, some_grads=False, graphs=None):
    """The model's step compiled with fullgraph=True gives the eager loss (1e-5) and parameter
    gradients (1e-4). ``wrap`` decorates both steps (e.g. seeding the generator before each);
    ``some_grads``: there must be some; ``graphs``: a list that gets the traced graph's code.
    Returns the eager gradients."""
    eager_loss, eager_grads = loss_and_grads(wrap(model_step(model)), model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(model_step(model), fullgraph=True, backend=_backend(graphs))
    loss, grads = loss_and_grads(wrap(compiled), model, batch)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and (grads or not some_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    return eager_grads


def traced_code(model, batch, *, fullgraph: bool = False) -> str:
    """The code of the graphs dynamo traces for the model's step on ``batch`` (run once, not compiled further)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model_step(model), fullgraph=fullgraph, backend=record)(**batch)
    return "\n".join(graphs)


def graph_nodes(code) -> list[str]:
    """The ``torch.ops.fastft`` operators called in graph code (a string, or a list of graphs' code as
    ``graphs=`` records it), in order, repeats included."""
    import re

    return re.findall(r"torch\.ops\.fastft\.(\w+)", code if isinstance(code, str) else "\n".join(code))


def fastft_nodes(model, batch) -> list[str]:
    """The ``torch.ops.fastft`` operators called in the model's traced step, in order, repeats included."""
    return graph_nodes(traced_code(model, batch))
