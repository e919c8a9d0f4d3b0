"""Per-sample gradient clipping in one backward pass (book-keeping clipping).

For DP-SGD one needs ``Σ_i c_i ∇ℓ_i`` with ``c_i = min(1, C / (‖∇ℓ_i‖ + 1e-6))`` (the clip
factor of Opacus' flat clipping). :class:`BookkeepingClipper` gets it without a second
backward pass and without the non-private weight gradients (Bu et al., "Differentially
private optimization on large model at small cost", ICML 2023):

1. forward hooks keep each layer's input ``a`` and put a tap on its output;
2. one backward pass computes only the gradients with respect to those outputs (``g``),
   not the parameter gradients;
3. per-sample norms, exactly and cheaply per layer: ``‖a_i‖²·‖g_i‖²`` for a Linear on
   flat inputs; for convolutions (patches read by strides, a few samples at a time) and
   sequence inputs, per-sample gradients by batched matmul, kept when they fit in
   memory, else formed chunk by chunk or replaced by the ghost norm
   ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` when that costs fewer operations; per-sample
   gradients of GroupNorm/LayerNorm affine parameters;
4. the clipped sum from the per-sample gradients kept, or from ``a`` and ``g`` with rows
   scaled by ``c_i`` (one matmul per layer).

Supported layers: Linear, Conv1d, Conv2d, GroupNorm, LayerNorm. Any other module that
owns trainable parameters, a parameter shared by several layers or a layer run twice in
one forward pass raises :class:`UnsupportedLayerError` naming it. Pure torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from privfl.errors import PrivflError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
# Per-sample gradients of one layer kept for the clipped sum up to this many elements;
# beyond, they are only formed chunk by chunk for the norms and the sum is a matmul.
KEEP_PER_SAMPLE = 1 << 25
# Inputs (unfolded patches) are built for a few samples at a time, about this many bytes
# (on a CPU, so that the matmul reads them from cache; a GPU wants fewer, larger kernels).
CHUNK_BYTES = 1 << 22
CHUNK_BYTES_GPU = 1 << 28


class UnsupportedLayerError(PrivflError, ValueError):
    """The model holds a layer that book-keeping clipping cannot clip exactly."""


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward records the output gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, slot: _Slot) -> torch.Tensor:
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.slot.grad = g if ctx.slot.grad is None else ctx.slot.grad + g
        return g, None, None


class _Slot:
    """What one layer keeps between its forward and the clipping."""

    __slots__ = ("act", "grad", "module", "name", "params")

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> None:
        self.name, self.module, self.params = name, module, params
        self.act: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None


def _describe(name: str, module: nn.Module) -> str:
    return f"layer {name or '<root>'!r} ({type(module).__name__})"


class BookkeepingClipper:
    """Clipped sums of per-sample gradients of ``model`` in one backward pass.

    Usage per step: ``losses = loss_fn(model(x), y)`` with one loss per sample (no
    reduction), then :meth:`backward` ``(losses, clip)``, which adds
    ``Σ_i min(1, clip / (‖∇ℓ_i‖ + 1e-6)) ∇ℓ_i`` to each trainable parameter's ``.grad``.
    Hooks stay on ``model`` until :meth:`close`.

    Raises
    ------
    UnsupportedLayerError
        At construction, naming the first module with trainable parameters that is not a
        supported layer, a layer registered twice or a parameter shared by two layers; in
        a forward pass, naming a layer that runs twice.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._slots: list[_Slot] = []
        owner: dict[int, str] = {}
        seen: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            if id(module) in seen:
                raise UnsupportedLayerError(
                    f"book-keeping clipping: {_describe(name, module)} is also layer "
                    f"{seen[id(module)]!r}; a reused layer's per-sample gradient is not separable"
                )
            seen[id(module)] = name
            # A subclass with its own forward may compute anything from its parameters.
            known = isinstance(module, SUPPORTED) and type(module).forward is _base(module).forward
            if not known:
                raise UnsupportedLayerError(
                    f"book-keeping clipping: {_describe(name, module)} has trainable "
                    "parameters and is not one of "
                    f"{', '.join(t.__name__ for t in SUPPORTED)}"
                )
            for p in params:
                if id(p) in owner:
                    raise UnsupportedLayerError(
                        f"book-keeping clipping: {_describe(name, module)} shares a parameter "
                        f"with layer {owner[id(p)]!r}"
                    )
                owner[id(p)] = name
            self._slots.append(_Slot(name, module, params))
        self._params = [p for s in self._slots for p in s.params]
        # One leaf per device for the taps to hang on: the backward pass asks for its
        # gradient, so it runs through every tap and skips the parameter gradients.
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._start)]
        for slot in self._slots:
            hook = self._hook(slot)
            self._handles.append(slot.module.register_forward_hook(hook, with_kwargs=True))

    # ------------------------------------------------------------------ hooks

    def _start(self, _module: nn.Module, _args: Any) -> None:
        # A new forward pass of the whole model: forget the previous one.
        if torch.is_grad_enabled():
            for slot in self._slots:
                slot.act = slot.grad = None

    def _hook(self, slot: _Slot) -> Any:
        def hook(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor
        ) -> Any:
            if not torch.is_grad_enabled():
                return None
            if slot.act is not None:
                raise UnsupportedLayerError(
                    f"book-keeping clipping: {_describe(slot.name, slot.module)} ran twice in "
                    "one forward pass; its per-sample gradient is not separable"
                )
            slot.act = (args[0] if args else kwargs["input"]).detach()
            anchor = self._anchors.get(out.device)
            if anchor is None:
                anchor = torch.zeros((), device=out.device, requires_grad=True)
                self._anchors[out.device] = anchor
            return _Tap.apply(out, anchor, slot)

        return hook

    def close(self) -> None:
        """Remove the hooks and drop what the last step kept."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for slot in self._slots:
            slot.act = slot.grad = None

    def __enter__(self) -> BookkeepingClipper:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ clipping

    def backward(self, losses: torch.Tensor, clip: float) -> torch.Tensor:
        """Add the clipped sum of per-sample gradients of ``losses`` (shape ``(B,)``, from
        the last forward pass) to the parameters' ``.grad``; returns the per-sample
        gradient norms before clipping."""
        if losses.dim() != 1:
            raise ValueError(f"losses must have shape (batch,), got {tuple(losses.shape)}")
        n = losses.shape[0]
        if n == 0 or not losses.requires_grad or not self._anchors:
            for p in self._params:
                _accumulate(p, torch.zeros_like(p))
            return losses.detach().new_zeros(losses.shape)
        # Gradients with respect to the tapped outputs only: no parameter gradients.
        torch.autograd.grad(losses.sum(), list(self._anchors.values()), allow_unused=True)
        plans = [_plan(slot, n) for slot in self._slots]
        sq = losses.detach().new_zeros(n, dtype=torch.float32)
        for plan in plans:
            if plan is not None:
                sq += plan.sq_norms()
        norms = sq.clamp(min=0).sqrt()
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        for slot, plan in zip(self._slots, plans, strict=True):
            if plan is None:
                for p in slot.params:
                    _accumulate(p, torch.zeros_like(p))
            else:
                plan.clipped_sum(factor.to(plan.dtype))
            slot.act = slot.grad = None
        return norms


def _base(module: nn.Module) -> type[nn.Module]:
    """The supported torch class ``module`` is an instance of."""
    return next(t for t in SUPPORTED if isinstance(module, t))


def _accumulate(p: nn.Parameter, value: torch.Tensor) -> None:
    value = value.reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = value
    else:
        p.grad.add_(value)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of ``t`` (B, ...), in float32."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=torch.float32).square()


class _Plan:
    """The per-sample norms and the clipped sum of one layer in one step."""

    def __init__(self, slot: _Slot, dtype: torch.dtype) -> None:
        self.slot = slot
        self.dtype = dtype

    def sq_norms(self) -> torch.Tensor:
        raise NotImplementedError

    def clipped_sum(self, factor: torch.Tensor) -> None:
        raise NotImplementedError


def _plan(slot: _Slot, n: int) -> _Plan | None:
    """How to clip ``slot`` this step; None when its output got no gradient."""
    if slot.act is None or slot.grad is None:
        return None
    m = slot.module
    if slot.act.shape[0] != n or slot.grad.shape[0] != n:
        raise UnsupportedLayerError(
            f"book-keeping clipping: {_describe(slot.name, m)} does not keep the batch in "
            f"its first dimension (input {tuple(slot.act.shape)}, {n} losses)"
        )
    if isinstance(m, nn.Linear):
        return _LinearPlan(slot, n)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _ConvPlan(slot, n)
    return _NormPlan(slot)


class _MatmulPlan(_Plan):
    """A layer computing ``a_t @ W_gᵀ (+ b)`` at ``T`` positions per sample in ``G``
    groups. Subclasses give the output gradients ``g`` as ``(B, G, k_out, T)`` and the
    inputs of samples ``i:j`` as ``(j-i, G, T, k_in)`` (unfolded patches for a
    convolution), built chunk by chunk so they stay in cache."""

    g: torch.Tensor

    def __init__(self, slot: _Slot, n: int, groups: int, t: int, k_in: int) -> None:
        grad = slot.grad
        assert grad is not None
        super().__init__(slot, grad.dtype)
        m = slot.module
        self.n, self.groups, self.t, self.k_in = n, groups, t, k_in
        self.k_out = m.weight.shape[0] // groups
        self.weight = m.weight if m.weight.requires_grad else None
        bias = m.bias
        self.bias = bias if bias is not None and bias.requires_grad else None
        self.per_sample: torch.Tensor | None = None
        self.bias_sample: torch.Tensor | None = None
        # Samples per chunk: their inputs, or their per-sample gradients, within budget.
        budget = CHUNK_BYTES if grad.device.type == "cpu" else CHUNK_BYTES_GPU
        per_row = grad.element_size() * groups * k_in * max(t, self.k_out)
        self.rows = max(1, budget // per_row)

    def inputs(self, i: int, j: int) -> torch.Tensor:
        raise NotImplementedError

    def _ranges(self) -> list[tuple[int, int]]:
        return [(i, min(i + self.rows, self.n)) for i in range(0, self.n, self.rows)]

    def sq_norms(self) -> torch.Tensor:
        n = self.n
        total = self.g.new_zeros(n, dtype=torch.float32)
        if self.bias is not None:
            self.bias_sample = self.g.sum(3).reshape(n, -1)
            total += _sq(self.bias_sample)
        if self.weight is None:
            return total
        size = self.groups * self.k_out * self.k_in
        if n * size <= KEEP_PER_SAMPLE:
            # Kept, the per-sample gradients give the clipped sum almost for free.
            self.per_sample = self.g.new_empty(n, self.groups, self.k_out, self.k_in)
        elif self.t * (self.k_in + self.k_out) < self.k_in * self.k_out:
            return total + self._ghost()
        parts = []
        for i, j in self._ranges():
            if self.per_sample is not None:
                ps = torch.matmul(self.g[i:j], self.inputs(i, j), out=self.per_sample[i:j])
            else:
                ps = torch.matmul(self.g[i:j], self.inputs(i, j))
            parts.append(_sq(ps))
        return total + torch.cat(parts)

    def _ghost(self) -> torch.Tensor:
        """``‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)`` per sample."""
        parts = []
        for i, j in self._ranges():
            a, g = self.inputs(i, j), self.g[i:j]
            prod = (a @ a.transpose(2, 3)) * (g.transpose(2, 3) @ g)
            parts.append(prod.reshape(j - i, -1).sum(1, dtype=torch.float32))
        return torch.cat(parts)

    def clipped_sum(self, factor: torch.Tensor) -> None:
        if self.bias is not None:
            assert self.bias_sample is not None
            _accumulate(self.bias, factor @ self.bias_sample)
        if self.weight is None:
            return
        if self.per_sample is not None:
            w = torch.mv(self.per_sample.view(self.n, -1).t(), factor)
        else:
            # Per group, (k_out, B·T) @ (B·T, k_in): the weight gradient with rows scaled.
            w = self.g.new_zeros(self.groups, self.k_out, self.k_in)
            for i, j in self._ranges():
                g = (self.g[i:j] * factor[i:j].view(-1, 1, 1, 1)).permute(1, 2, 0, 3)
                a = self.inputs(i, j).transpose(0, 1)
                w += g.reshape(self.groups, self.k_out, -1) @ a.reshape(self.groups, -1, self.k_in)
        _accumulate(self.weight, w)


class _LinearPlan(_MatmulPlan):
    """Linear; its positions are all the input's middle dimensions (none: ``T = 1``)."""

    def __init__(self, slot: _Slot, n: int) -> None:
        m = slot.module
        assert slot.act is not None and slot.grad is not None
        self.a = slot.act.reshape(n, -1, m.in_features)
        g = slot.grad.reshape(n, -1, m.out_features)
        super().__init__(slot, n, 1, self.a.shape[1], m.in_features)
        self.g = g.transpose(1, 2).unsqueeze(1)

    def inputs(self, i: int, j: int) -> torch.Tensor:
        return self.a[i:j].unsqueeze(1)

    def sq_norms(self) -> torch.Tensor:
        if self.t > 1 or self.weight is None:
            return super().sq_norms()
        # One position: the per-sample gradient g aᵀ has norm ‖g‖·‖a‖.
        a, g = self.a[:, 0], self.g[:, 0, :, 0]
        total = _sq(a) * _sq(g)
        if self.bias is not None:
            self.bias_sample = g
            total += _sq(g)
        return total

    def clipped_sum(self, factor: torch.Tensor) -> None:
        if self.t > 1 or self.weight is None:
            return super().clipped_sum(factor)
        g = self.g[:, 0, :, 0]
        if self.bias is not None:
            _accumulate(self.bias, factor @ g)
        _accumulate(self.weight, (g * factor[:, None]).t() @ self.a[:, 0])
        return None


class _ConvPlan(_MatmulPlan):
    """Conv1d/Conv2d: positions are output pixels, inputs the patches under the kernel,
    read from the padded input by strides (no unfold of the whole batch)."""

    def __init__(self, slot: _Slot, n: int) -> None:
        m = slot.module
        assert isinstance(m, (nn.Conv1d, nn.Conv2d))
        assert slot.act is not None and slot.grad is not None
        x, g = slot.act, slot.grad
        one_d = isinstance(m, nn.Conv1d)
        if x.dim() != (3 if one_d else 4):
            raise UnsupportedLayerError(
                f"book-keeping clipping: {_describe(slot.name, m)} on input of shape "
                f"{tuple(x.shape)}; needs a batch dimension"
            )
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        if one_d:
            x, g = x.unsqueeze(2), g.unsqueeze(2)
            self.kernel = (1, *m.kernel_size)
            self.stride, self.dilation = (1, *m.stride), (1, *m.dilation)
        else:
            self.kernel, self.stride, self.dilation = m.kernel_size, m.stride, m.dilation
        self.x, self.out_hw = x, (g.shape[2], g.shape[3])
        groups = m.groups
        t = g.shape[2] * g.shape[3]
        super().__init__(slot, n, groups, t, m.in_channels // groups * math.prod(self.kernel))
        self.g = g.reshape(n, groups, self.k_out, t)

    def inputs(self, i: int, j: int) -> torch.Tensor:
        x = self.x[i:j]
        sb, sc, sh, sw = x.stride()
        (kh, kw), (s0, s1), (d0, d1) = self.kernel, self.stride, self.dilation
        c = x.shape[1] // self.groups
        patches = x.as_strided(
            (j - i, self.groups, *self.out_hw, c, kh, kw),
            (sb, c * sc, s0 * sh, s1 * sw, sc, d0 * sh, d1 * sw),
            x.storage_offset(),
        )
        return patches.reshape(j - i, self.groups, self.t, self.k_in)


class _NormPlan(_Plan):
    """GroupNorm / LayerNorm: ``y = x̂·w + b`` elementwise, so the per-sample gradients
    are sums of ``x̂·g`` and ``g`` over the positions sharing a parameter."""

    def __init__(self, slot: _Slot) -> None:
        assert slot.act is not None and slot.grad is not None
        super().__init__(slot, slot.grad.dtype)
        m = slot.module
        x, g = slot.act, slot.grad
        n = x.shape[0]
        if isinstance(m, nn.GroupNorm):
            xhat = F.group_norm(x, m.num_groups, eps=m.eps)
            size = m.num_channels
            # (B, C, positions): parameters run along the channel dimension.
            xhat, g = xhat.reshape(n, size, -1), g.reshape(n, size, -1)
            reduce_dim = 2
        else:
            shape = tuple(m.normalized_shape)
            xhat = F.layer_norm(x, shape, eps=m.eps)
            size = math.prod(shape)
            xhat, g = xhat.reshape(n, -1, size), g.reshape(n, -1, size)
            reduce_dim = 1
        self.samples: list[tuple[nn.Parameter, torch.Tensor]] = []
        w, b = m.weight, getattr(m, "bias", None)
        if w is not None and w.requires_grad:
            self.samples.append((w, (xhat * g).sum(reduce_dim)))
        if b is not None and b.requires_grad:
            self.samples.append((b, g.sum(reduce_dim)))

    def sq_norms(self) -> torch.Tensor:
        total = self.slot.grad.new_zeros(self.slot.grad.shape[0], dtype=torch.float32)
        for _p, s in self.samples:
            total += _sq(s)
        return total

    def clipped_sum(self, factor: torch.Tensor) -> None:
        for p, s in self.samples:
            _accumulate(p, factor @ s)
