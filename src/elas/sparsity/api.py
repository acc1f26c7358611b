"""The method seam: sparsity methods are applied to a built model from outside, like torchao's `quantize_`.

    sparsify_(model, config, filter_fn=None)

dispatches on type(config) through a registry of handlers. A handler finds the modules the method targets
(filter_fn(module, fqn) narrows them), attaches the method to them (an FFN core, a weight parametrisation) and
returns an `Applied` record, kept in the model's `_elas_methods` list. Nothing in `elas.model` knows a method.

A method's config (a dataclass deriving from `SparsityMethod`) declares:
- `mode_at(step, max_steps)`: a hashable mode, a pure function of the step ("dense" during a warm-up, "sparse"
  after; a later method may go sparse -> dense). `set_step(model, step, max_steps)` applies every method's mode
  and returns the tuple of modes: the trainer keys CUDA-graph capture (and compilation) on it. A target whose
  weights change when a mode starts does it in `edit_weights(edit)`, through the trainer's optimizer;
- `stat_names`: the statistics it reports, collected by `collect_stats(model, fn)` (a probe forward);
- `operands()`: which GEMM operands it makes sparse, per targeted module; two methods claiming the same operand
  of the same module are an error when the second is applied.
Method configs are serialised as {"method": NAME, "version": V, **fields} (`method_to_dict` / `method_from_dict`),
the form `ModelConfig.methods` and a run's config.json hold.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable

import torch
import torch.nn as nn

from ..model.ffn import ReLU2FFN

FilterFn = Callable[[nn.Module, str], bool]


class SparsityMethod:
    """Base of every method config. Subclasses are dataclasses with a `name`, a `version` and the fields below."""
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    stat_names: ClassVar[tuple[str, ...]] = ()
    periods: ClassVar[tuple[str, ...]] = ()  # `_steps` fields that are periods (every N steps): scaled, kept >= 1
    # fields that choose kernels, not what is computed (a resume may change them, as config.KERNEL_KEYS)
    kernel_fields: ClassVar[tuple[str, ...]] = ()

    def mode_at(self, step: int, max_steps: int) -> Hashable:
        raise NotImplementedError

    @classmethod
    def upgrade(cls, fields: dict, version: int) -> dict:
        """The fields of a config saved at an older `version` (a run's config.json), as this version reads them
        with the meaning they had: a default that changed since is written out here."""
        return fields

    @property
    def causal(self) -> bool:
        """Whether a token's output in the sparse mode depends on its own and earlier tokens only. A method whose
        selection is shared by a block of tokens (V:N:M's blocks) is not: its loss is not a causal model's, and
        decoding one token at a time computes another function (the trainer, eval and generate say so)."""
        return True

    def check_run(self, max_steps: int, tokens: int) -> None:
        """Refuse, with one line and before any data is read, what this config cannot do in a run of max_steps
        steps of `tokens` tokens a micro-batch (batch_size x seq_len). Default: a sparse window (check_sparse_window)."""
        check_sparse_window(self, max_steps)

    def check_with(self, methods: list["SparsityMethod"]) -> None:
        """Refuse, as check_run does, a combination with the run's other methods (`methods`, this one among them)
        that this config cannot train as asked. Default: none."""

    def operands(self) -> tuple[str, ...]:
        """The GEMM operands this method makes sparse, named on the module it targets (e.g. "y2": the d_ff
        activation that multiplies the down projection; "up.weight")."""
        raise NotImplementedError

    def forward_work(self) -> dict[str, float]:
        """The fraction of its dense forward work each linear of a target ("up", "down") does on this method's
        sparse path, for `elas model`'s FLOP count (linears not named: 1). Default, from operands(): "y2" (the
        down projection's input) at the method's density, a weight ("up.weight") at 1/2. A method whose path
        skips work otherwise (V:N:M's grouped GEMMs) says so itself."""
        out: dict[str, float] = {}
        for op in self.operands():
            if op == "y2":
                out["down"] = getattr(self, "density", 0.5)
            elif op.endswith(".weight"):
                out[op.split(".")[0]] = 0.5
        return out

    def scaled(self, factor: float) -> "SparsityMethod":
        """This config with its step-counted schedule (fields ending in `_steps`, and a `sparse_until` given as a
        step) scaled by factor: a recipe written for one run length, used for another (the quality grid). A
        fraction of the run needs no scaling. factor 0 (the benchmarks: every phase from step 0) keeps
        sparse_until: the sparse phase must not end before it starts."""
        over = {f.name: int(round(getattr(self, f.name) * factor)) for f in dataclasses.fields(self)
                if f.name.endswith("_steps")}
        over.update({k: max(1, over[k]) for k in self.periods})
        u = getattr(self, "sparse_until", None)
        if isinstance(u, int) and not isinstance(u, bool) and factor > 0:
            over["sparse_until"] = int(round(u * factor))
        return dataclasses.replace(self, **over)

    def _check_types(self) -> None:
        """Values from config.json or `--set` arrive as JSON values or strings: coerce what is unambiguous,
        reject the rest with one line naming the field."""
        for f in dataclasses.fields(self):
            v, default = getattr(self, f.name), f.default
            want = type(default) if default is not None and default is not dataclasses.MISSING else None
            if want is bool:
                if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    v = v.lower() in ("true", "1", "yes", "on")
                if not isinstance(v, bool):
                    raise ValueError(f"invalid {self.name}.{f.name}={v!r}: expected true or false")
            elif want is int:
                if isinstance(v, bool):
                    raise ValueError(f"invalid {self.name}.{f.name}={v!r}: expected an integer")
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                if not isinstance(v, int):
                    raise ValueError(f"invalid {self.name}.{f.name}={v!r}: expected an integer")
            setattr(self, f.name, v)


def check_sparse_until(method: str, u: Any) -> None:
    """The end of a method's sparse phase (the third paper's sparse -> dense schedule): a fraction of max_steps
    (a float in [0, 1]) or a step (an int >= 0)."""
    if isinstance(u, bool) or not isinstance(u, (int, float)) or u < 0 or (isinstance(u, float) and not 0 <= u <= 1):
        raise ValueError(f"invalid {method}.sparse_until {u!r}: expected a fraction of max_steps in [0, 1] (a "
                         f"float) or a step (an int >= 0)")


def sparse_end(u: float | int, max_steps: int) -> int:
    """The first step of the final dense phase for sparse_until u."""
    return int(round(u * max_steps)) if isinstance(u, float) else u


def check_sparse_window(config: SparsityMethod, max_steps: int) -> None:
    """A method with the sparse -> dense schedule (`sparse_until`) has a sparse step in a run of max_steps: one whose
    sparse phase ends before its dense warm-up does would train dense throughout under the method's name."""
    u = getattr(config, "sparse_until", None)
    if u is None:
        return
    start, end = config.dense_warmup_steps, min(sparse_end(u, max_steps), max_steps)
    if end <= start:
        raise ValueError(f"{config.name} would never be sparse: its sparse phase would end at step {end} "
                         f"(sparse_until={u!r}, max_steps={max_steps}), by the end of its dense warm-up "
                         f"(dense_warmup_steps={start}); lower model.{config.name}.dense_warmup_steps or raise "
                         f"model.{config.name}.sparse_until")


def dense_throughout(config: SparsityMethod, max_steps: int) -> bool:
    """Whether a method without the sparse -> dense schedule (act24) would train dense for the whole run: its dense
    warm-up not shorter than max_steps. Allowed (a smoke test of the dense phase), but the trainer says so."""
    warm = getattr(config, "dense_warmup_steps", None)
    return getattr(config, "sparse_until", None) is None and warm is not None and warm >= max_steps


def whole(t: Any) -> Any:
    """The whole tensor of a parameter FSDP2 shards (between steps a DTensor: all-gathered, a collective that every
    process makes at the same step of set_step), else t. Methods that read their weights when a mode starts (S-STE's
    beta, the router's clusters) need all of them; inside the forward FSDP2 hands modules whole tensors already."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class Applied:
    """One method applied to one model: the config, the objects it attached (each with `set_mode(mode)` and a
    `stats_sink`), the operands it claims, and how to take it off again."""
    config: SparsityMethod
    targets: list[tuple[str, Any]]  # (fqn of the targeted module, the attached object)
    claims: set[tuple[str, str]]  # (fqn, operand)
    detach: Callable[[], None]
    description: str = ""
    mode: Hashable = None


_HANDLERS: dict[type, Callable[[nn.Module, Any, FilterFn | None], Applied]] = {}
METHODS: dict[str, type] = {}  # name -> config class


def register_method(config_cls: type):
    """Decorator of a handler `fn(model, config, filter_fn) -> Applied` for configs of type config_cls."""
    def deco(fn):
        _HANDLERS[config_cls] = fn
        METHODS[config_cls.name] = config_cls
        return fn
    return deco


def applied_methods(model: nn.Module) -> list[Applied]:
    return model.__dict__.setdefault("_elas_methods", [])


def relu2_ffns(model: nn.Module, filter_fn: FilterFn | None, what: str) -> list[tuple[str, nn.Module]]:
    """(fqn, ReLU2FFN) of every ReLU^2 FFN of model that filter_fn keeps: what FFN methods target. None is a
    one-line error naming the method (`what`)."""
    ffns = [(n, m) for n, m in model.named_modules()
            if isinstance(m, ReLU2FFN) and (filter_fn is None or filter_fn(m, n))]
    if not ffns:
        raise ValueError(f"{what} found no ReLU^2 FFN to apply to: it needs ffn='relu2' (SwiGLU is not sparsified)")
    return ffns


def sparsify_(model: nn.Module, config: SparsityMethod | None, filter_fn: FilterFn | None = None) -> nn.Module:
    """Apply `config`'s method to `model` in place (None: take every applied method off). Returns model."""
    methods = applied_methods(model)
    if config is None:
        for a in reversed(methods):
            a.detach()
        methods.clear()
        return model
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(c.__name__ for c in _HANDLERS) or "none"
        raise TypeError(f"sparsify_: no handler for {type(config).__name__}; registered methods: {known}")
    applied = handler(model, config, filter_fn)
    taken = {c: a.config.name for a in methods for c in applied.claims & a.claims}
    if taken:
        applied.detach()
        (fqn, op), other = next(iter(taken.items()))
        raise ValueError(f"{config.name} and {other} both make operand {op!r} of {fqn or 'the model'} sparse; "
                         f"apply one of them to it (filter_fn narrows a method's modules)")
    methods.append(applied)
    return model


def edit_in_place(param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """param <- fn(param), on this process's rows when FSDP2 shards it (fn must then work row by row). What
    set_step's `edit` does where no optimizer keeps a master copy of the weights."""
    with torch.no_grad():
        t = param.to_local() if hasattr(param, "to_local") else param
        t.copy_(fn(t))


def set_step(model: nn.Module, step: int, max_steps: int,
             edit: Callable[[torch.Tensor, Callable], None] = edit_in_place) -> tuple:
    """Put every applied method in its mode for `step`; returns the modes (one per method, in order). A target
    that changes its weights when a mode starts (S-STE's dense_init=sparse) does so in `edit_weights(edit)`:
    `edit(param, fn)` must apply fn to every copy of param the training holds (the trainer passes its
    optimizer's `edit_`, which updates the fp32 master too)."""
    modes, changed = [], []
    for a in applied_methods(model):
        mode = a.config.mode_at(step, max_steps)
        if mode != a.mode:
            for _, obj in a.targets:
                obj.set_mode(mode)
            a.mode = mode
            changed.append(a)
        modes.append(mode)
    # a target that reads weights when its mode starts (the router clusters the up-projection's neurons) does so
    # in `modes_set()`, once every method is in its mode for this step: S-STE's S(W) is then the weight it reads,
    # whatever the order of model.methods
    for a in changed:
        for _, obj in a.targets:
            if hasattr(obj, "edit_weights"):
                obj.edit_weights(edit)
    for a in changed:
        for _, obj in a.targets:
            if hasattr(obj, "modes_set"):
                obj.modes_set()
    return tuple(modes)


def run_modes(model: nn.Module, max_steps: int) -> set[tuple]:
    """The distinct mode tuples (one mode per applied method, as set_step returns) over a run of max_steps steps:
    each is a graph of every compiled region, for training and again for evaluation. (mode_at is a pure function
    of the step, so the schedule is read by asking it at every step: ~0.1 s for 100k steps.)"""
    methods = [a.config for a in applied_methods(model)]
    return {tuple(m.mode_at(step, max_steps) for m in methods) for step in range(max_steps)}


def collect_stats(model: nn.Module, forward: Callable[[], Any]) -> dict[str, float]:
    """Run `forward()` (a no-grad probe forward of model) with statistics on; returns each method's statistics
    per target ("NAME/i", i the target's index) and their mean over targets ("NAME/mean"), with one host sync."""
    sinks = []
    for a in applied_methods(model):
        for i, (_, obj) in enumerate(a.targets):
            obj.stats_sink = []
            sinks.append((i, obj, a.config))
    try:
        forward()
    finally:
        collected = [(i, obj.stats_sink, cfg) for i, obj, cfg in sinks]
        for _, obj, _ in sinks:
            obj.stats_sink = None
    keys, vals = [], []
    for i, sink, cfg in collected:
        for stats in sink:
            for k, v in stats.items():
                if k not in cfg.stat_names:  # what a method reports is what it declares
                    raise RuntimeError(f"{cfg.name} reported statistic {k!r}, not among its stat_names {cfg.stat_names}")
                keys.append((k, i))
                vals.append(v.float())
    if not vals:
        return {}
    import torch
    host = torch.stack(vals).tolist()
    out: dict[str, float] = {f"{k}/{i}": v for (k, i), v in zip(keys, host)}
    for name in dict.fromkeys(k for k, _ in keys):
        layer = [v for (k, _), v in zip(keys, host) if k == name]
        out[f"{name}/mean"] = sum(layer) / len(layer)
    return out


def non_causal(model: nn.Module, sparse_only: bool = True) -> list[str]:
    """The applied methods that are not causal (SparsityMethod.causal), in a sparse mode now (sparse_only) or
    at any step."""
    return [a.config.name for a in applied_methods(model) if not a.config.causal
            and (not sparse_only or str(a.mode).startswith("sparse"))]


def describe(model: nn.Module) -> list[str]:
    """One line per applied method: what it does and on which path (for the trainer's start-up log)."""
    return [a.description for a in applied_methods(model)]


def method_changes(old: list[dict], new: list[dict]) -> list[tuple[str, bool]]:
    """How two method lists (config dicts) differ: [(change, is a kernel field)], each change named as
    "model.M.F: a -> b", or as "model.methods: act24 -> none" where the methods themselves differ."""
    a, b = [method_from_dict(m) for m in old], [method_from_dict(m) for m in new]
    if [m.name for m in a] != [m.name for m in b]:
        names = lambda ms: ", ".join(m.name for m in ms) or "none"  # noqa: E731
        return [(f"model.methods: {names(a)} -> {names(b)}", False)]
    return [(f"model.{x.name}.{f.name}: {getattr(x, f.name)!r} -> {getattr(y, f.name)!r}",
             f.name in type(x).kernel_fields)
            for x, y in zip(a, b) for f in dataclasses.fields(x) if getattr(x, f.name) != getattr(y, f.name)]


def kernel_field_changes(old: list[dict], new: list[dict]) -> list[str] | None:
    """Where two method lists (config dicts) differ in kernel fields alone: each change as "model.M.F: a -> b"
    ([] where they are equal); None where they differ in anything else (another method, another field)."""
    changes = method_changes(old, new)
    return None if not all(kernel for _, kernel in changes) else [c for c, _ in changes]


def method_to_dict(config: SparsityMethod) -> dict:
    return {"method": config.name, "version": config.version, **dataclasses.asdict(config)}


def method_from_dict(d: dict) -> SparsityMethod:
    """{"method": NAME, "version"?: V, **fields} -> the config object; a bad name, version or key is one line."""
    if not isinstance(d, dict) or "method" not in d:
        raise ValueError(f"a sparsity method is a mapping with a 'method' key (one of {', '.join(METHODS)}), got {d!r}")
    d = dict(d)
    name = d.pop("method")
    cls = METHODS.get(name)
    if cls is None:
        near = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown sparsity method {name!r}{hint}; known: {', '.join(METHODS)}")
    version = d.pop("version", cls.version)
    if not isinstance(version, int) or version > cls.version:
        raise ValueError(f"{name} config version {version!r} is newer than this elas understands ({cls.version})")
    if version < cls.version:
        d = cls.upgrade(d, version)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {name}.{near[0]}?)" if near else ""
            raise ValueError(f"unknown key {name}.{k}{hint}; valid: {', '.join(names)}")
    return cls(**d)


__all__ = ["SparsityMethod", "Applied", "register_method", "sparsify_", "set_step", "run_modes", "collect_stats", "describe",
           "applied_methods", "method_to_dict", "method_from_dict", "kernel_field_changes", "METHODS", "relu2_ffns"]
