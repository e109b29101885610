"""The pydantic adapter: every refusal reads `SOURCE: key.path: expected …, got …`, in the input's own terms."""

from __future__ import annotations

from typing import Literal, Union

import pytest
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from linewatch.errors import BundleError, ConfigError
from linewatch.validation import Problem, StrictModel, TolerantModel, expected, key_path, show_value, validate

pytestmark = pytest.mark.unit


class Wheel(StrictModel):
    size: StrictInt = Field(16, ge=10, le=30)
    tyre: Literal["summer", "winter"] = "summer"


class Car(StrictModel):
    name: StrictStr
    doors: StrictInt = 4
    electric: StrictBool = False
    price: StrictFloat = 0.0
    plate: Union[StrictInt, StrictStr] = 0
    wheels: tuple[Wheel, ...] = ()

    @field_validator("name")
    @classmethod
    def _not_blank(cls, name: str) -> str:
        if not name.strip():
            raise expected("a name with letters", name)
        return name

    @model_validator(mode="after")
    def _wheels_match(self) -> Car:
        sizes = [w.size for w in self.wheels]
        if len(set(sizes)) > 1:
            i = next(i for i, s in enumerate(sizes) if s != sizes[0])
            raise expected(f"the size of wheels[0] ({sizes[0]})", sizes[i], ("wheels", i, "size"))
        return self


class Reading(TolerantModel):
    value: StrictFloat


def refusal(data: object, model: type = Car, **kwargs) -> str:
    with pytest.raises(kwargs.get("error", ConfigError)) as info:
        validate(model, data, "car.yaml", **kwargs)
    return str(info.value)


def test_valid_input_builds_the_model_with_ints_accepted_as_floats():
    car = validate(Car, {"name": "a", "price": 3, "wheels": [{"size": 17}]}, "car.yaml")
    assert car.price == 3.0 and isinstance(car.price, float) and car.wheels == (Wheel(size=17),)


def test_unknown_key_is_refused_listing_the_known_keys_at_that_place():
    assert refusal({"name": "a", "wheels": [{"sise": 17}]}) == (
        "car.yaml: wheels[0].sise: unknown key (known keys here: size, tyre)"
    )
    assert refusal({"name": "a", "colour": "red"}).startswith("car.yaml: colour: unknown key (known keys here: name,")


def test_a_tolerant_model_ignores_unknown_keys():
    assert validate(Reading, {"value": 1.5, "added_later": True}, "r.json").value == 1.5


def test_missing_key():
    assert refusal({}) == "car.yaml: name: required key missing"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "a", "doors": "5"}, "car.yaml: doors: expected an integer, got str '5'"),
        ({"name": "a", "doors": 5.0}, "car.yaml: doors: expected an integer, got float 5.0"),
        ({"name": "a", "doors": True}, "car.yaml: doors: expected an integer, got bool True"),
        ({"name": "a", "electric": 1}, "car.yaml: electric: expected true/false, got int 1"),
        ({"name": "a", "electric": "yes"}, "car.yaml: electric: expected true/false, got str 'yes'"),
        ({"name": "a", "price": "9.5"}, "car.yaml: price: expected a number, got str '9.5'"),
        ({"name": "a", "price": False}, "car.yaml: price: expected a number, got bool False"),
        ({"name": 7}, "car.yaml: name: expected a string, got int 7"),
    ],
)
def test_scalars_are_strict(data, message):
    assert refusal(data) == message


def test_a_union_says_what_any_of_its_members_would_accept():
    assert refusal({"name": "a", "plate": 1.5}) == "car.yaml: plate: expected an integer or a string, got float 1.5"


def test_nested_path_with_list_index_ranges_and_choices():
    wheels = [{"size": 16}, {"size": 40}]
    assert refusal({"name": "a", "wheels": wheels}) == "car.yaml: wheels[1].size: expected a value <= 30, got int 40"
    wheels = [{"size": 16}, {"tyre": "spiked"}]
    assert refusal({"name": "a", "wheels": wheels}) == (
        "car.yaml: wheels[1].tyre: expected one of 'summer', 'winter', got str 'spiked'"
    )
    assert refusal({"name": "a", "wheels": {"size": 16}}) == "car.yaml: wheels: expected a list, got dict {'size': 16}"
    assert refusal([1]) == "car.yaml: <top level>: expected a mapping, got list [1]"


def test_own_checks_read_the_same_and_can_point_below_the_model():
    assert refusal({"name": "  "}) == "car.yaml: name: expected a name with letters, got str '  '"
    wheels = [{"size": 16}, {"size": 16}, {"size": 17}]
    assert refusal({"name": "a", "wheels": wheels}) == (
        "car.yaml: wheels[2].size: expected the size of wheels[0] (16), got int 17"
    )


def test_the_error_class_is_the_callers():
    assert refusal({"value": "x"}, Reading, error=BundleError).startswith("car.yaml: value: expected a number")


def test_recursion_error_becomes_the_callers_error_naming_the_source():
    class Deep(StrictModel):
        items: list

        @field_validator("items")
        @classmethod
        def _walk(cls, items: list) -> list:
            def depth(x: object) -> int:
                return 1 + max(map(depth, x), default=0) if isinstance(x, list) else 0

            depth(items)
            return items

    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    message = refusal({"items": nested}, Deep, error=BundleError)
    assert message == "car.yaml: nested too deeply to be a valid document"


def test_helpers():
    assert key_path(("cameras", 0, "reconnect", "max_s")) == "cameras[0].reconnect.max_s"
    assert key_path(()) == ""
    assert show_value("x" * 100) == "str '" + "x" * 56 + "..."  # long values are cut, the type stays
    problem = Problem("text", ("a", 1))
    assert isinstance(problem, ValueError) and problem.at == ("a", 1)
