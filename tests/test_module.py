"""Module 0: Modules and Parameters."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch.module import Module, Parameter
from minitorch.scalar import Scalar

VAL = 40.0
med_ints = st.integers(min_value=1, max_value=20)


# Check that simple Modules register their parameters.
class ModuleA1(Module):
    def __init__(self) -> None:
        super().__init__()
        self.p1 = Parameter(5)
        self.non_param = 10
        self.a = ModuleA2()
        self.b = ModuleA3()


class ModuleA2(Module):
    def __init__(self) -> None:
        super().__init__()
        self.p2 = Parameter(10)


class ModuleA3(Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = ModuleA4()


class ModuleA4(Module):
    def __init__(self) -> None:
        super().__init__()
        self.p3 = Parameter(15)


@pytest.mark.task0_4
def test_stacked_demo() -> None:
    """Check that each of the properties match."""
    mod = ModuleA1()
    np = dict(mod.named_parameters())

    x = str(mod)
    print(x)
    assert mod.p1.value == 5
    assert mod.non_param == 10

    assert np["p1"].value == 5
    assert np["a.p2"].value == 10
    assert np["b.c.p3"].value == 15
    assert len(mod.parameters()) == 3
    assert len(mod.modules()) == 2
    assert mod.children() == mod.modules()


# Advanced tests: Modules built from random sizes.
class Module1(Module):
    def __init__(self, size_a: int, size_b: int, val: float) -> None:
        super().__init__()
        self.module_a = Module2(size_a)
        self.module_b = Module2(size_b)
        self.parameter_a = Parameter(val)


class Module2(Module):
    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        self.parameter_a = Parameter(VAL)
        self.parameter_b = Parameter(VAL)
        self.non_parameter = 10
        self.module_c = Module3()
        for i in range(extra):
            self.add_parameter(f"extra_parameter_{i}", 0)


class Module3(Module):
    def __init__(self) -> None:
        super().__init__()
        self.parameter_a = Parameter(VAL)


@pytest.mark.task0_4
@given(med_ints, med_ints)
def test_module(size_a: int, size_b: int) -> None:
    """Check the properties of a single module."""
    module = Module2()
    module.eval()
    assert not module.training
    module.train()
    assert module.training
    assert len(module.parameters()) == 3

    module = Module2(size_b)
    assert len(module.parameters()) == size_b + 3

    module = Module2(size_a)
    named_parameters = dict(module.named_parameters())
    assert named_parameters["parameter_a"].value == VAL
    assert named_parameters["parameter_b"].value == VAL
    assert named_parameters["extra_parameter_0"].value == 0


@pytest.mark.task0_4
@given(med_ints, med_ints, st.floats(min_value=-100, max_value=100, allow_nan=False))
def test_stacked_module(size_a: int, size_b: int, val: float) -> None:
    """Check the properties of a stacked module."""
    module = Module1(size_a, size_b, val)
    module.eval()
    assert not module.training
    assert not module.module_a.training
    assert not module.module_b.training
    assert not module.module_a.module_c.training
    module.train()
    assert module.training
    assert module.module_a.training
    assert module.module_b.training
    assert module.module_b.module_c.training

    assert len(module.parameters()) == 1 + (size_a + 3) + (size_b + 3)

    named_parameters = dict(module.named_parameters())
    assert named_parameters["parameter_a"].value == val
    assert named_parameters["module_a.parameter_a"].value == VAL
    assert named_parameters["module_a.parameter_b"].value == VAL
    assert named_parameters["module_b.parameter_a"].value == VAL
    assert named_parameters["module_b.parameter_b"].value == VAL
    assert named_parameters["module_a.module_c.parameter_a"].value == VAL


class ModuleRun(Module):
    def forward(self, x: int, scale: int = 1) -> int:
        return 10 * x * scale


@pytest.mark.task0_4
def test_module_call() -> None:
    assert ModuleRun()(2) == 20
    assert ModuleRun()(2, scale=3) == 60


@pytest.mark.task0_4
def test_module_fail_forward() -> None:
    with pytest.raises(NotImplementedError):
        Module()()


@pytest.mark.task0_4
def test_missing_attribute_raises() -> None:
    mod = ModuleA1()
    with pytest.raises(AttributeError):
        mod.does_not_exist
    assert not hasattr(mod, "does_not_exist")


@pytest.mark.task0_4
def test_reassign_and_delete() -> None:
    """Reassigning a name moves it between parameters, modules and plain attributes."""
    mod = ModuleA2()
    mod.p2 = 3
    assert mod.p2 == 3 and len(mod.parameters()) == 0
    mod.p2 = Parameter(1.0)
    assert len(mod.parameters()) == 1
    mod.sub = ModuleA4()
    assert [name for name, _ in mod.named_parameters()] == ["p2", "sub.p3"]
    del mod.sub
    assert len(mod.modules()) == 0
    del mod.p2
    assert len(mod.parameters()) == 0


@pytest.mark.task0_4
def test_repr() -> None:
    text = repr(ModuleA1())
    assert text.startswith("ModuleA1(")
    assert "(a): ModuleA2()" in text
    assert "(b): ModuleA3(\n    (c): ModuleA4()\n  )" in text
    assert repr(ModuleA4()) == "ModuleA4()"


@pytest.mark.task0_4
def test_parameter_marks_values() -> None:
    """Parameters turn constants into leaves and name their value."""
    s = Scalar(1.0, back=None)
    p = Parameter(s, "weight")
    assert s.is_leaf() and s.name == "weight"
    p.update(Scalar(2.0, back=None))
    assert p.value.is_leaf() and p.value.name == "weight"
    assert str(p) == str(p.value) and repr(p) == repr(p.value)

    mod = Module()
    added = mod.add_parameter("w", Scalar(3.0, back=None))
    assert mod.w is added and added.value.is_leaf()


class _Movable:
    """Stands in for a Tensor: has ``.to(backend)`` and ``requires_grad_``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.grad_flag = False

    def to(self, backend: str) -> "_Movable":
        return _Movable(backend)

    def requires_grad_(self, flag: bool = True) -> None:
        self.grad_flag = flag


@pytest.mark.task0_4
def test_module_to_backend() -> None:
    mod = ModuleA2()
    mod.sub = Module()
    mod.sub.w = Parameter(_Movable("simple"))
    assert mod.to("fast") is mod
    moved = mod.sub.w.value
    assert moved.backend == "fast" and moved.grad_flag
    assert mod.p2.value == 10  # values without .to() are left alone
