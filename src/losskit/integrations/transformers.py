r"""Hugging Face transformers causal LMs compute their loss with losskit, without logits.

A ``*ForCausalLM`` computes ``logits = lm_head(hidden)`` over every token, then its own
cross-entropy, and keeps the ``[tokens, vocabulary]`` logits (and their float32 copy) for
the backward. One call routes that loss through
:func:`losskit.functional.linear_cross_entropy`, which never forms the logits::

    from losskit.integrations.transformers import use_linear_cross_entropy

    model = use_linear_cross_entropy(AutoModelForCausalLM.from_config(config))
    out = model(input_ids, labels=labels)  # out.loss as before, out.logits is None
    out.loss.backward()

How it gets in, for any model with transformers' causal-LM layout (a base model plus an
output embedding that is a ``torch.nn.Linear``), not one patch per class: while the
model's ``forward`` runs with ``labels``, its output embedding returns a *deferred logits*
object instead of the logits: it holds the final hidden states and the embedding's
weight (and bias), and records what the model's own code does to the logits before its
loss. Scalings and a ``tanh`` soft-cap (Gemma 2/3's ``final_logit_softcapping``,
Cohere's ``logit_scale``, Granite's ``logits_scaling``) fold into
``linear_cross_entropy``'s ``softcap`` and ``temperature``; the upcast ``.float()``
picks the compute dtype; token-side reshapes and slices (the label shift of older
models, ``view(-1, vocab_size)``) are applied to the hidden states instead; and when the
model's loss (``ForCausalLMLoss`` or its own ``CrossEntropyLoss``) reaches
``torch.nn.functional.cross_entropy``, that call, with its target, ``ignore_index``,
``reduction``, ``weight`` and ``label_smoothing``, is answered by
``linear_cross_entropy``. Everything else the model's loss does (the label shift,
``shift_labels``, the division by ``num_items_in_batch`` under gradient accumulation,
a mixture-of-experts auxiliary loss) runs as its own code, so the loss is the model's:
equal in float32, and computed in float32 from half-precision weights where the model
upcasts (transformers' loss rounds the logits to the model's dtype first; losskit does
not, so in bfloat16 the two differ by that rounding). ``logits_to_keep`` slices the
hidden states before the output embedding, as in the model.

With ``labels`` the output's ``logits`` is ``None``; without them (evaluation,
``generate``) the model runs untouched and returns its logits. A ``Trainer`` evaluation
whose ``compute_metrics`` needs logits therefore needs :func:`restore` first (or
``prediction_loss_only=True`` when the loss is all it needs). Anything the model does
to its logits that cannot be folded raises a ``TypeError`` naming the model's class and
the operation; :func:`restore` (or leaving :func:`using_linear_cross_entropy`) undoes
the change.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.linear import linear_cross_entropy

__all__ = ["TokenLogProbs", "restore", "token_log_probs", "use_linear_cross_entropy", "using_linear_cross_entropy"]

_ATTR = "_losskit_linear_cross_entropy"
_FN = "use_linear_cross_entropy"


class _Patch:
    """What one patched model needs: its head, the options, the capture depth and the
    record of the current labelled call (deferred logits made, cross-entropies answered)."""

    def __init__(self, model: nn.Module, head: nn.Linear, chunk_size: int | None, lse_square_scale: float):
        self.owner = type(model).__name__
        self.head = head
        self.chunk_size = chunk_size
        self.lse_square_scale = lse_square_scale
        self.depth = 0
        self.made = 0
        self.answered = 0
        # Instance-level forwards already there (another wrapper's), put back by restore().
        self.previous = {"model": model.__dict__.get("forward"), "head": head.__dict__.get("forward")}

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        if self.depth == 0:
            self.made = self.answered = 0
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


class _Transform(NamedTuple):
    """The logits the model's code holds, as ``(num / den) * softcap_cap(hidden @ W.T + b)``
    (no soft-cap when ``cap`` is None). Numerator and denominator are kept apart so that
    Gemma's ``/ c, tanh, * c`` folds to exactly ``cap = c`` and a scale of exactly 1."""

    num: float = 1.0
    den: float = 1.0
    cap: float | None = None

    def temperature(self) -> float:
        # losskit divides the (soft-capped) logits by the temperature: 1 / (num / den).
        return self.den / self.num


class _DeferredLogits:
    """Stands for ``transform(hidden @ weight.T + bias)`` of shape ``[..., V]`` without
    forming it. Not a tensor: torch functions reach it through ``__torch_function__``, and
    only those that can be folded into ``linear_cross_entropy`` are answered."""

    def __init__(self, hidden: Tensor, patch: _Patch, dtype: torch.dtype, transform: _Transform = _Transform()):
        self.hidden = hidden
        self.patch = patch
        self.dtype = dtype
        self.transform = transform

    # -- what the model's code may read ------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.patch.head.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def ndim(self) -> int:
        return self.hidden.dim()

    def dim(self) -> int:
        return self.hidden.dim()

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def is_floating_point(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"DeferredLogits(shape={tuple(self.shape)}, dtype={self.dtype}, {self.transform})"

    # -- what it can apply without forming the logits -----------------------------------
    def _with(self, hidden: Tensor | None = None, dtype: torch.dtype | None = None,
              transform: _Transform | None = None) -> _DeferredLogits:
        return _DeferredLogits(self.hidden if hidden is None else hidden, self.patch,
                               self.dtype if dtype is None else dtype, self.transform if transform is None else transform)

    def _refuse(self, what: str) -> TypeError:
        return TypeError(
            f"{_FN}: {self.patch.owner} applies {what} to its logits, which linear_cross_entropy cannot do "
            "without forming them; call losskit.integrations.transformers.restore(model) to use the model's own loss"
        )

    def float(self) -> _DeferredLogits:
        return self._with(dtype=torch.float32)

    def to(self, *args: Any, **kwargs: Any) -> _DeferredLogits:
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (torch.device, str)):
                device = a
            else:
                raise self._refuse(f".to({a!r})")
        if kwargs or (device is not None and torch.device(device) != self.device):
            raise self._refuse(f".to(device={device!r}, {kwargs})")
        if dtype is not None and not dtype.is_floating_point:
            raise self._refuse(f".to({dtype})")
        return self._with(dtype=dtype)

    def contiguous(self, *args: Any, **kwargs: Any) -> _DeferredLogits:
        return self

    def view(self, *shape: Any) -> _DeferredLogits:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if not shape or shape[-1] != self.shape[-1]:
            raise self._refuse(f"a reshape to {shape} that moves the vocabulary dimension")
        # The vocabulary stays last and whole: the same reshape of the tokens applies to the hidden states.
        return self._with(hidden=self.hidden.reshape(*shape[:-1], self.hidden.shape[-1]))

    reshape = view

    def __getitem__(self, index: Any) -> _DeferredLogits:
        items = index if isinstance(index, tuple) else (index,)
        counted = sum(i.dim() if isinstance(i, Tensor) and i.dtype == torch.bool else 0 if i is None else 1
                      for i in items if i is not Ellipsis)
        whole_last = bool(items) and isinstance(items[-1], slice) and items[-1] == slice(None)
        if Ellipsis in items:
            keeps_vocab = whole_last or items[-1] is Ellipsis
        else:
            keeps_vocab = counted < self.ndim or (counted == self.ndim and whole_last)
        if not keeps_vocab or any(i is None for i in items):
            raise self._refuse(f"the index {index!r}, which selects within the vocabulary")
        # Token-side indexing (e.g. logits[..., :-1, :] for the label shift) selects hidden rows.
        return self._with(hidden=self.hidden[index])

    def _scaled(self, factor: Any, divide: bool) -> _DeferredLogits:
        if isinstance(factor, Tensor) or not isinstance(factor, numbers.Real) or isinstance(factor, bool) or factor <= 0:
            raise self._refuse(f"{'division' if divide else 'multiplication'} by {factor!r} (only positive Python numbers fold into a temperature)")
        t = self.transform
        num, den = (t.num, t.den * factor) if divide else (t.num * factor, t.den)
        return self._with(transform=t._replace(num=num, den=den))

    def __mul__(self, other: Any) -> _DeferredLogits:
        return self._scaled(other, divide=False)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> _DeferredLogits:
        return self._scaled(other, divide=True)

    def tanh(self) -> _DeferredLogits:
        t = self.transform
        if t.cap is not None:
            raise self._refuse("a second tanh")
        # tanh(s z) = s * softcap_{1/s}(z), with softcap_c(z) = c tanh(z / c): the scale s stays.
        return self._with(transform=t._replace(cap=t.den / t.num))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._refuse(f".{name}")

    def _operator(self, *args: Any) -> Any:
        raise self._refuse("an arithmetic operation other than a positive scaling")

    __add__ = __radd__ = __sub__ = __rsub__ = __neg__ = __pow__ = __rtruediv__ = _operator

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            return _answer_cross_entropy(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        deferred = next((a for a in (*args, *kwargs.values()) if isinstance(a, _DeferredLogits)), None)
        if deferred is None:  # inside a list (torch.cat, torch.stack, ...): nothing to fold
            raise TypeError(f"{_FN}: a model's logits reached torch.{name}, which linear_cross_entropy cannot apply "
                            "without forming them; call losskit.integrations.transformers.restore(model)")
        if func in (torch.tanh, Tensor.tanh) and len(args) == 1 and not kwargs:
            return deferred.tanh()
        if func in (torch.mul, Tensor.mul, torch.multiply) and len(args) == 2 and not kwargs:
            other = args[1] if args[0] is deferred else args[0]
            return deferred._scaled(other, divide=False)
        if func in (torch.div, Tensor.div, torch.true_divide) and len(args) == 2 and not kwargs and args[0] is deferred:
            return deferred._scaled(args[1], divide=True)
        if func in (torch.reshape, Tensor.reshape, Tensor.view) and args[0] is deferred:
            return deferred.view(*args[1:])
        raise deferred._refuse(f"torch.{name}")


def _answer_cross_entropy(input: Any, target: Tensor, weight: Tensor | None = None, size_average: Any = None,
                          ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                          label_smoothing: float = 0.0) -> Tensor:
    """torch.nn.functional.cross_entropy on deferred logits, by linear_cross_entropy."""
    if not isinstance(input, _DeferredLogits):
        raise TypeError(f"{_FN}: deferred logits reached cross_entropy as its target or weight, not as its input")
    if size_average is not None or reduce is not None:
        raise input._refuse("cross_entropy's deprecated size_average/reduce")
    if input.ndim > 2:  # torch reads dim 1 as the classes: the model did not flatten its tokens
        raise input._refuse(f"cross_entropy to {input.ndim}-d logits (classes on dim 1)")
    patch, head = input.patch, input.patch.head
    x, w, b = input.hidden, head.weight, head.bias
    if input.dtype != x.dtype or input.dtype != w.dtype:
        # The model upcast its logits (ForCausalLMLoss's .float()): compute in that dtype. The
        # weight copy is transient (ToCopy saves nothing for backward) and linear_cross_entropy
        # makes the same float32 copy of half-precision weights internally anyway.
        x, w, b = x.to(input.dtype), w.to(input.dtype), None if b is None else b.to(input.dtype)
    t = input.transform
    loss = linear_cross_entropy(
        x, w, target, linear_bias=b, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, softcap=t.cap, temperature=t.temperature(),
        lse_square_scale=patch.lse_square_scale, chunk_size=patch.chunk_size,
    )
    patch.answered += 1
    return loss


def _head_of(model: Any, fn: str) -> nn.Linear:
    """The model's output embedding, or a TypeError naming the class it cannot serve."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module (a transformers *ForCausalLM); got {type(model).__name__}")
    name = type(model).__name__
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(
            f"{fn}: {name} has no output embedding (get_output_embeddings() returned None): it is not a causal LM "
            "with transformers' layout (a base model plus an output embedding)"
        )
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{fn}: {name}'s output embedding is a {type(head).__name__}, not a torch.nn.Linear")
    if getattr(model, "base_model", model) is model:
        raise TypeError(f"{fn}: {name} has no base model separate from its output embedding")
    if "labels" not in inspect.signature(type(model).forward).parameters:
        raise TypeError(f"{fn}: {name}.forward takes no labels, so it computes no loss to replace")
    return head


def _drop_deferred(output: Any, patch: _Patch) -> Any:
    """The model's output with the deferred logits replaced by None (removed from tuples,
    as transformers' to_tuple() leaves out fields that are None)."""
    if patch.made == 0:
        raise TypeError(
            f"{_FN}: {patch.owner} computed its loss without calling its output embedding "
            f"({type(patch.head).__name__}) as a module, so losskit cannot serve it"
        )
    if patch.answered == 0:
        raise TypeError(f"{_FN}: {patch.owner} did not compute a cross-entropy from its logits when given labels")
    if isinstance(output, OrderedDict):  # transformers' ModelOutput
        for key in [k for k, v in output.items() if isinstance(v, _DeferredLogits)]:
            OrderedDict.__delitem__(output, key)  # as if made with None: absent from keys() and to_tuple()
            object.__setattr__(output, key, None)
        return output
    if isinstance(output, tuple):
        return type(output)(v for v in output if not isinstance(v, _DeferredLogits))
    return output


def use_linear_cross_entropy(model: Any, *, chunk_size: int | None = None, lse_square_scale: float = 0.0) -> Any:
    r"""Make a transformers causal LM compute its loss with :func:`~losskit.functional.linear_cross_entropy`.

    After it, ``model(input_ids, labels=labels, ...)`` returns the model's usual output
    with the same loss (label shift, ``shift_labels``, ignore index -100, the mean over
    counted tokens or the sum over ``num_items_in_batch``, ``logits_to_keep``, the
    family's soft-cap or logit scaling: the model's own code computes all of it) and
    ``logits=None``: the ``[tokens, vocabulary]`` logits are never formed. Without
    ``labels`` the model is unchanged, so evaluation and ``generate`` see its logits.
    Calling it again replaces the options.

    Args:
        model: a ``PreTrainedModel`` with transformers' causal-LM layout: a base model and
            an output embedding (``get_output_embeddings()``) that is a ``torch.nn.Linear``,
            tied to the input embedding or not, with or without a bias.
        chunk_size: tokens per chunk of ``linear_cross_entropy`` (default: chosen from the
            vocabulary size).
        lse_square_scale: z-loss scale added to every token's loss (default 0: the
            model's loss unchanged).

    Returns:
        ``model``, patched in place.

    Raises:
        TypeError: naming the model's class, when it has no such layout; during a
            forward with labels, when the model does to its logits something that cannot
            be folded into ``linear_cross_entropy`` (the operation is named).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from losskit.integrations.transformers import restore, use_linear_cross_entropy
        >>> torch.manual_seed(0) and None
        >>> config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> ids = torch.randint(0, 256, (2, 12))
        >>> stock = model(ids, labels=ids).loss
        >>> out = use_linear_cross_entropy(model)(ids, labels=ids)
        >>> out.logits is None, torch.allclose(out.loss, stock)
        (True, True)
        >>> restore(model)(ids, labels=ids).logits.shape
        torch.Size([2, 12, 256])
    """
    head = _head_of(model, _FN)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_FN}: chunk_size must be a positive number of tokens or None; got {chunk_size!r}")
    if not isinstance(lse_square_scale, numbers.Real) or lse_square_scale < 0:
        raise ValueError(f"{_FN}: lse_square_scale must be a number >= 0; got {lse_square_scale!r}")
    if hasattr(model, _ATTR):
        restore(model)
    patch = _Patch(model, head, chunk_size, float(lse_square_scale))
    model_forward, head_forward = model.forward, head.forward
    signature = inspect.signature(model_forward)

    @functools.wraps(model_forward)  # keeps the signature: the Trainer reads **kwargs off it
    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels") if not args else signature.bind_partial(*args, **kwargs).arguments.get("labels")
        if labels is None:
            return model_forward(*args, **kwargs)
        with patch.capturing():
            output = model_forward(*args, **kwargs)
        return _drop_deferred(output, patch)

    @functools.wraps(head_forward)
    def output_embedding(input: Tensor) -> Any:
        if patch.depth == 0:
            return head_forward(input)
        patch.made += 1
        bias = head.bias
        dtype = torch.result_type(input, head.weight) if bias is None else torch.promote_types(
            torch.result_type(input, head.weight), bias.dtype)
        return _DeferredLogits(input, patch, dtype)

    model.forward = forward
    head.forward = output_embedding
    object.__setattr__(model, _ATTR, patch)
    return model


def restore(model: Any) -> Any:
    """Undo :func:`use_linear_cross_entropy`: the model computes its own loss and logits
    again. Returns ``model``; a model that was not patched is returned unchanged."""
    patch = model.__dict__.pop(_ATTR, None)
    if patch is None:
        return model
    for owner, key in ((model, "model"), (patch.head, "head")):
        owner.__dict__.pop("forward", None)
        if patch.previous[key] is not None:
            owner.__dict__["forward"] = patch.previous[key]
    return model


@contextlib.contextmanager
def using_linear_cross_entropy(model: Any, *, chunk_size: int | None = None,
                               lse_square_scale: float = 0.0) -> Iterator[Any]:
    """:func:`use_linear_cross_entropy` for the length of a ``with`` block, then :func:`restore`."""
    use_linear_cross_entropy(model, chunk_size=chunk_size, lse_square_scale=lse_square_scale)
    try:
        yield model
    finally:
        restore(model)


class TokenLogProbs(NamedTuple):
    """Per-token results of :func:`token_log_probs`, shaped like the labels."""

    log_probs: Tensor  #: log p(next label | tokens so far); 0 where the label is ignored
    entropy: Tensor | None  #: entropy of the next-token distribution (nats), when asked for; 0 where ignored


def token_log_probs(model: Any, input_ids: Tensor | None = None, labels: Tensor | None = None, *,
                    shift_labels: Tensor | None = None, entropy: bool = False, ignore_index: int = -100,
                    chunk_size: int | None = None, **model_kwargs: Any) -> TokenLogProbs:
    r"""Per-token log-probabilities of the labels (and entropies) from a causal LM, without logits.

    The input a DPO or GRPO trainer needs. The model runs as usual up to its output
    embedding; then :func:`losskit.functional.linear_log_probs` (or
    :func:`~losskit.functional.linear_log_probs_and_entropy`) read the final hidden states and the embedding's weight (and bias) chunk by chunk, so
    the ``[tokens, vocabulary]`` logits are never formed. Labels are shifted as the
    model's loss shifts them: position ``t`` holds ``log p(labels[t + 1] | input[:t + 1])``
    and the last position is ignored. The model may be patched by
    :func:`use_linear_cross_entropy` or not; it is left as it was.

    Args:
        model: a causal LM with transformers' layout (see :func:`use_linear_cross_entropy`).
        input_ids: ``[B, T]`` token ids (or pass ``inputs_embeds`` in ``model_kwargs``).
        labels: ``[B, T]``, ``ignore_index`` where no log-prob is wanted (prompt, padding);
            default ``input_ids``.
        shift_labels: ``[B, T]`` labels already shifted (as transformers' ``shift_labels``);
            replaces ``labels``.
        entropy: also return the entropy of every counted position's next-token distribution.
        ignore_index: label value that yields 0.
        chunk_size: tokens per chunk (default: chosen from the vocabulary size).
        **model_kwargs: passed to the model (``attention_mask``, ``position_ids``,
            ``logits_to_keep``, ...).

    Returns:
        :class:`TokenLogProbs` ``(log_probs, entropy)``, each ``[B, T]`` (``entropy`` is
        None unless asked for). A family's logit scaling (Cohere, Granite) is applied as a
        temperature; a model that soft-caps its logits (Gemma 2/3) raises ``TypeError``.

    Example (DPO, with :func:`losskit.functional.dpo_loss`)::

        def sequence_log_probs(model, ids, completion_mask):
            labels = ids.masked_fill(~completion_mask, -100)  # count the completion only
            return token_log_probs(model, ids, labels, attention_mask=attention).log_probs.sum(-1)

        policy_chosen, policy_rejected = (sequence_log_probs(policy, ids, mask) for ids, mask in pairs)
        with torch.no_grad():
            ref_chosen, ref_rejected = (sequence_log_probs(reference, ids, mask) for ids, mask in pairs)
        loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    """
    fn = "token_log_probs"
    head = _head_of(model, fn)
    patched = hasattr(model, _ATTR)
    if not patched:
        use_linear_cross_entropy(model)
    patch = getattr(model, _ATTR)
    try:
        with patch.capturing():
            output = model(input_ids=input_ids, **model_kwargs)
    finally:
        if not patched:
            restore(model)
    deferred = output.logits if hasattr(output, "logits") else output[0]
    if not isinstance(deferred, _DeferredLogits):
        raise TypeError(f"{fn}: {type(model).__name__} did not return the logits of its output embedding")
    t = deferred.transform
    if t.cap is not None:
        raise TypeError(f"{fn}: {type(model).__name__} soft-caps its logits, which linear_log_probs does not take")
    if shift_labels is None:
        labels = input_ids if labels is None else labels
        if labels is None:
            raise ValueError(f"{fn}: give labels (or input_ids) or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    x = deferred.hidden
    if tuple(shift_labels.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{fn}: the labels (shifted) are shaped {tuple(shift_labels.shape)} but the model kept "
            f"{tuple(x.shape[:-1])} positions (logits_to_keep?); pass shift_labels for the kept positions"
        )
    from ..functional import linear_log_probs, linear_log_probs_and_entropy  # losskit's post-training wing

    options = dict(temperature=t.temperature(), ignore_index=ignore_index, chunk_size=chunk_size)
    if entropy:  # one pass over the output layer for both
        return TokenLogProbs(*linear_log_probs_and_entropy(x, head.weight, shift_labels, head.bias, **options))
    return TokenLogProbs(linear_log_probs(x, head.weight, shift_labels, head.bias, **options), None)
