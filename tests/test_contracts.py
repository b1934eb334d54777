"""Contract tests over every registered component of every kind: a new component or an installed
plugin is checked automatically."""

import pytest

from aptp.testing import check_component, registered_specs


@pytest.mark.parametrize("spec", registered_specs(), ids=lambda s: f"{s.kind}-{s.name}")
def test_component_contract(spec):
    check_component(spec)


def test_there_are_components_of_the_core_kinds():
    kinds = {s.kind for s in registered_specs()}
    missing = {"backbone", "granularity", "encoder", "balancer", "router"} - kinds
    assert not missing, f"no built-in component registered for: {sorted(missing)}"
