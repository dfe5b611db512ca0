"""``tenant_from`` rules: a job (ServiceTitan's shape) to a budget tenant id."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.config.servicetitan import TENANT_ID, Connection, ServiceTitanConfig
from guardproxy.servicetitan.mapping import UnmappableJob, tenant_for
from tests.servicetitan.helpers import TID1, job


def rules(tenant_from: str, tenant_map: dict[str, str] | None = None) -> ServiceTitanConfig:
    return ServiceTitanConfig(
        app_key="k", connections=(Connection(TID1, "c", "s"),), tenant_from=tenant_from,
        tenant_map=tenant_map or {},
    )


def test_st_tenant_defaults_to_st_prefix() -> None:
    assert tenant_for(job(), TID1, rules("st_tenant")) == f"st-{TID1}"


def test_st_tenant_goes_through_tenant_map() -> None:
    assert tenant_for(job(), TID1, rules("st_tenant", {str(TID1): "acme"})) == "acme"


@pytest.mark.parametrize(
    ("field", "expected"),
    [("businessUnitId", "businessUnitId-10"), ("customerId", "customerId-1001"),
     ("locationId", "locationId-1101"), ("jobTypeId", "jobTypeId-55")],
)
def test_id_fields_default_to_field_and_value(field: str, expected: str) -> None:
    assert tenant_for(job(), TID1, rules(field)) == expected


def test_id_fields_go_through_tenant_map() -> None:
    assert tenant_for(job(), TID1, rules("businessUnitId", {"10": "hvac", "55": "other"})) == "hvac"
    assert tenant_for(job(), TID1, rules("jobTypeId", {"10": "hvac", "55": "other"})) == "other"


@pytest.mark.parametrize("value", [None, True, "", [10]])
def test_missing_or_odd_id_field_is_unmappable(value: Any) -> None:
    with pytest.raises(UnmappableJob, match="job 987654321 has no businessUnitId"):
        tenant_for(job(businessUnitId=value), TID1, rules("businessUnitId"))


def test_absent_id_field_is_unmappable() -> None:
    body = job()
    del body["locationId"]
    with pytest.raises(UnmappableJob, match="has no locationId"):
        tenant_for(body, TID1, rules("locationId"))


def test_external_data_value_is_the_tenant() -> None:
    assert tenant_for(job(), TID1, rules("externalData:budget_tenant")) == "acme"


def test_external_data_goes_through_tenant_map() -> None:
    assert tenant_for(job(), TID1, rules("externalData:budget_tenant", {"acme": "acme-corp"})) == "acme-corp"


@pytest.mark.parametrize(
    "entries",
    [None, [], [{"key": "other", "value": "acme"}], [{"key": "budget_tenant", "value": ""}],
     [{"key": "budget_tenant"}], "budget_tenant"],
)
def test_missing_external_data_entry_is_unmappable(entries: Any) -> None:
    with pytest.raises(UnmappableJob, match="has no externalData entry 'budget_tenant'"):
        tenant_for(job(externalData=entries), TID1, rules("externalData:budget_tenant"))


def test_custom_field_value_is_the_tenant() -> None:
    assert tenant_for(job(), TID1, rules("customField:Budget Code")) == "ACME-HVAC"


def test_custom_field_goes_through_tenant_map() -> None:
    assert tenant_for(job(), TID1, rules("customField:Budget Code", {"ACME-HVAC": "acme"})) == "acme"


def test_missing_custom_field_is_unmappable() -> None:
    with pytest.raises(UnmappableJob, match="has no value in custom field 'Cost Center'"):
        tenant_for(job(), TID1, rules("customField:Cost Center"))


@pytest.mark.parametrize(
    ("tenant_from", "fields"),
    [("customField:Budget Code", {"customFields": [{"name": "Budget Code", "value": "ACME HVAC"}]}),
     ("externalData:budget_tenant", {"externalData": [{"key": "budget_tenant", "value": "-acme"}]}),
     ("externalData:budget_tenant", {"externalData": [{"key": "budget_tenant", "value": "a" * 65}]})],
)
def test_value_that_is_not_a_tenant_id_is_unmappable(tenant_from: str, fields: dict[str, Any]) -> None:
    with pytest.raises(UnmappableJob, match="not a valid tenant id"):
        tenant_for(job(**fields), TID1, rules(tenant_from))


@given(value=st.integers(min_value=1, max_value=2**63 - 1), field=st.sampled_from(["customerId", "locationId"]))
def test_any_id_value_maps_to_a_valid_tenant(value: int, field: str) -> None:
    tenant = tenant_for(job(**{field: value}), TID1, rules(field))
    assert tenant == f"{field}-{value}"
    assert TENANT_ID.match(tenant)
