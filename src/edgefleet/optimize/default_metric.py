"""The default metric, chosen from what the model's primary output is (pure over graph facts; no sessions).

``top1`` and ``agreement`` compare *decisions*: the argmax over the last axis, or ``> 0.5`` when it has size 1. That
is meaningful only when the last axis holds classes. On anything else — a sentence embedding ``[batch, seq,
hidden]`` or ``[batch, 384]`` — the argmax is an arbitrary hidden unit, so every quantized candidate "disagrees"
and is refused for no real loss. Rather than guess, the optimizer asks for ``--metric``.

The last axis counts as a class axis, first rule that holds:

* size > 1 and the output is written by ``Softmax``/``LogSoftmax``, or read by ``ArgMax``/``TopK``;
* size > 1 and the model also has an integer output (a classifier that emits its label next to its scores);
* size > 1 and the output's name says scores (``prob``, ``logit``, ``score``, ``class``, ``softmax``, ``pred``);
* the output is ``[batch, C]`` with ``2 <= C <= MAX_UNNAMED_CLASSES`` and its name does not say features
  (``embed``, ``hidden``, ``feature``, ``pool``, ``latent``, ``vector``, ``encod``);
* size 1 (or a scalar) and the output is written by ``Sigmoid`` or named like a probability: one binary decision.

Anything else — rank 3 and more, a wide unnamed ``[batch, C]``, a size-1 output of unknown meaning — has no class
axis, and choosing a metric is left to the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from edgefleet.errors import UsageError
from edgefleet.optimize.evaluate import Metric

__all__ = ["MAX_UNNAMED_CLASSES", "OutputFacts", "class_axis", "default_metric", "output_facts"]

# An unnamed [batch, C] output is taken for class scores up to this width. Classifiers with more classes almost
# always say so (Softmax, ArgMax or a name); embeddings are 128–1024 wide, where a wrong guess would refuse every
# quantized candidate. A refusal costs the user one flag, a wrong guess a silently wasted optimization.
MAX_UNNAMED_CLASSES = 100

_SCORE_NAME = re.compile(r"prob|logit|score|class|softmax|pred", re.IGNORECASE)
_FEATURE_NAME = re.compile(r"embed|hidden|feature|pool|latent|vector|encod", re.IGNORECASE)
_PROB_NAME = re.compile(r"prob", re.IGNORECASE)
_INT_TYPES = frozenset(
    {
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
    }
)
_CHOICES = "top1|agreement|cosine|sqnr"


@dataclass(frozen=True)
class OutputFacts:
    """What the rules read about the primary output: ``call_shape`` is one call's output shape, batch included."""

    name: str
    call_shape: tuple[int, ...]
    producer: str | None = None
    consumers: frozenset[str] = frozenset()
    model_has_int_output: bool = False


def output_facts(model: onnx.ModelProto, name: str, call_shape: tuple[int, ...]) -> OutputFacts:
    """The facts about output ``name`` of ``model`` (top-level graph; an Identity in front of it is looked through,
    as exporters such as skl2onnx put one there)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, set[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)
    tensor = name
    reads = set(consumers.get(name, set()))
    node = producers.get(tensor)
    while node is not None and node.op_type == "Identity" and node.input:
        tensor = node.input[0]
        reads |= consumers.get(tensor, set()) - {"Identity"}
        node = producers.get(tensor)
    has_int = any(o.type.tensor_type.elem_type in _INT_TYPES for o in graph.output if o.name != name)
    return OutputFacts(
        name=name,
        call_shape=tuple(call_shape),
        producer=None if node is None else node.op_type,
        consumers=frozenset(reads),
        model_has_int_output=has_int,
    )


def class_axis(f: OutputFacts) -> str | None:
    """Why the last axis of the output holds classes, or None when nothing says it does."""
    size = f.call_shape[-1] if f.call_shape else 1
    if size > 1:
        if f.producer in ("Softmax", "LogSoftmax"):
            return f"written by {f.producer}"
        hit = f.consumers & {"ArgMax", "TopK"}
        if hit:
            return f"read by {sorted(hit)[0]}"
        if f.model_has_int_output:
            return "the model also outputs integer labels"
        if _SCORE_NAME.search(f.name):
            return f"named {f.name!r}"
        if len(f.call_shape) == 2 and size <= MAX_UNNAMED_CLASSES and not _FEATURE_NAME.search(f.name):
            return f"[batch, {size}] class scores"
        return None
    if f.producer == "Sigmoid":
        return "a probability written by Sigmoid"
    if _PROB_NAME.search(f.name):
        return f"a probability named {f.name!r}"
    return None


def default_metric(f: OutputFacts, has_labels: bool) -> Metric:
    """``top1`` with labels, else ``agreement`` — only over a class axis; otherwise a :class:`UsageError` asking for
    ``--metric`` (exit 2, one line)."""
    if class_axis(f) is not None:
        return "top1" if has_labels else "agreement"
    shape = "[" + ", ".join(str(d) for d in f.call_shape) + "]"
    raise UsageError(
        f"cannot choose a default metric: output {f.name!r} {shape} has no class axis to take an argmax over "
        f"(it looks like features or an embedding); pass --metric {_CHOICES} — cosine or sqnr compare the outputs "
        "themselves, top1 or agreement only if its last axis really holds classes"
    )
