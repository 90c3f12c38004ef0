"""Modules and Parameters: trees of learnable values (MiniTorch module 0)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple


class Module:
    """A node in a tree of modules, holding Parameters and child Modules.

    Assigning a ``Parameter`` or a ``Module`` to an attribute registers it; everything else is a plain attribute.

    Attributes:
        _modules: child modules by attribute name.
        _parameters: this module's own parameters by attribute name.
        training: whether the module is in training mode.
    """

    _modules: Dict[str, "Module"]
    _parameters: Dict[str, "Parameter"]
    training: bool

    def __init__(self) -> None:
        # Bypass our __setattr__: the registries must exist before anything is registered.
        self.__dict__["_modules"] = {}
        self.__dict__["_parameters"] = {}
        self.__dict__["training"] = True

    def modules(self) -> Sequence["Module"]:
        """The direct child modules."""
        # BEGIN SOLUTION task0_4: return the direct child modules (registered in _modules)
        return list(self.__dict__["_modules"].values())
        # END SOLUTION

    def children(self) -> Sequence["Module"]:
        """The direct child modules (same as ``modules()``, the PyTorch name)."""
        return self.modules()

    def train(self) -> None:
        """Set this module and all its descendants to training mode."""
        # BEGIN SOLUTION task0_4: set training = True on this module and every descendant
        self.__dict__["training"] = True
        for m in self.modules():
            m.train()
        # END SOLUTION

    def eval(self) -> None:
        """Set this module and all its descendants to evaluation mode."""
        # BEGIN SOLUTION task0_4: set training = False on this module and every descendant
        self.__dict__["training"] = False
        for m in self.modules():
            m.eval()
        # END SOLUTION

    def named_parameters(self) -> Sequence[Tuple[str, "Parameter"]]:
        """All parameters of this module and its descendants, named by dotted path (e.g. ``"layer1.weights"``)."""
        # BEGIN SOLUTION task0_4: this module's parameters, then each child's, named by dotted path (child.name)
        out: List[Tuple[str, Parameter]] = list(self.__dict__["_parameters"].items())
        for child_name, child in self.__dict__["_modules"].items():
            out.extend((f"{child_name}.{name}", p) for name, p in child.named_parameters())
        return out
        # END SOLUTION

    def parameters(self) -> Sequence["Parameter"]:
        """All parameters of this module and its descendants."""
        # BEGIN SOLUTION task0_4: every parameter of this module and its descendants
        return [p for _, p in self.named_parameters()]
        # END SOLUTION

    def add_parameter(self, k: str, v: Any) -> "Parameter":
        """Register ``v`` as a parameter named ``k`` (wrapping it in a ``Parameter``) and return the Parameter."""
        val = Parameter(v, k)
        self.__dict__["_parameters"][k] = val
        return val

    def to(self, backend: Any) -> "Module":
        """Move every Parameter whose value has a ``.to(backend)`` method (Tensors) to ``backend``; returns self."""
        for p in self.parameters():
            mover = getattr(p.value, "to", None)
            if callable(mover):
                p.update(mover(backend))
        return self

    def __setattr__(self, key: str, val: Any) -> None:
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting {key!r}")
        # An attribute lives in exactly one place: drop any earlier registration under this name.
        d["_parameters"].pop(key, None)
        d["_modules"].pop(key, None)
        d.pop(key, None)
        if isinstance(val, Parameter):
            d["_parameters"][key] = val
        elif isinstance(val, Module):
            d["_modules"][key] = val
        else:
            super().__setattr__(key, val)

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails.
        d = self.__dict__
        if key in d.get("_parameters", {}):
            return d["_parameters"][key]
        if key in d.get("_modules", {}):
            return d["_modules"][key]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __delattr__(self, key: str) -> None:
        d = self.__dict__
        if key in d["_parameters"]:
            del d["_parameters"][key]
        elif key in d["_modules"]:
            del d["_modules"][key]
        else:
            super().__delattr__(key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The computation of the module; subclasses override it."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __repr__(self) -> str:
        lines = []
        for key, module in self.__dict__["_modules"].items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"({key}): {child}")
        body = "\n  " + "\n  ".join(lines) + "\n" if lines else ""
        return f"{type(self).__name__}({body})"


class Parameter:
    """A learnable value held by a Module.

    If the value has ``requires_grad_`` (Tensors, Scalars), it is marked as requiring a gradient, on creation and on
    every ``update``.
    """

    def __init__(self, x: Any = None, name: Optional[str] = None) -> None:
        self.value = x
        self.name = name
        self._prepare()

    def _prepare(self) -> None:
        if hasattr(self.value, "requires_grad_"):
            self.value.requires_grad_(True)
            if self.name:
                self.value.name = self.name

    def update(self, x: Any) -> None:
        """Replace the value (e.g. after an optimizer step)."""
        self.value = x
        self._prepare()

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return str(self.value)
