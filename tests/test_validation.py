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


# --- credentials and hostile values in messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("rtsp://admin:S3cret@192.168.10.21:554/stream1", "rtsp://***@192.168.10.21:554/stream1"),
        ("cannot open url rtsp://admin:p@ss@cam/s", "cannot open url rtsp://***@cam/s"),  # unencoded @ in a password
        ("RTSP://token@cam/s", "RTSP://***@cam/s"),
        ("admin:S3cret@cam/s", "***@cam/s"),  # the scheme forgotten
        ("http://cam/s.mjpg?user=op&Password=S3cret&res=hd", "http://cam/s.mjpg?user=***&Password=***&res=hd"),
        ("http://cam/s?TOKEN=abc;pwd=x#frag", "http://cam/s?TOKEN=***;pwd=***#frag"),
        ("https://h/x?api_key=K&X-Amz-Signature=S", "https://h/x?api_key=***&X-Amz-Signature=***"),
        ("srt://cam:9000?passphrase=longsecret&latency=20", "srt://cam:9000?passphrase=***&latency=20"),
        (
            'rtspsrc location=rtsp://cam/s user-id=admin user-pw="my S3cret" latency=0 ! appsink',
            "rtspsrc location=rtsp://cam/s user-id=*** user-pw=*** latency=0 ! appsink",
        ),
        ("rtspsrc proxy-id = pu proxy-pw=pp ! appsink", "rtspsrc proxy-id = *** proxy-pw=*** ! appsink"),
        ("['rtsp://a:b@h', 'x']", "['rtsp://***@h', 'x']"),
        # nothing to hide: unchanged
        ("rtsp://192.168.10.21:554/stream1", "rtsp://192.168.10.21:554/stream1"),
        ("/dev/video0", "/dev/video0"),
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("v4l2src device=/dev/video0 ! videoconvert ! appsink", "v4l2src device=/dev/video0 ! videoconvert ! appsink"),
        (
            "camera cam1: online -> offline (cannot open url rtsp://cam/s)",
            "camera cam1: online -> offline (cannot open url rtsp://cam/s)",
        ),
    ],
)
def test_redact_source_hides_userinfo_and_credential_parameters(text, shown):
    from linewatch.validation import redact_source

    assert redact_source(text) == shown


def test_redact_source_is_linear_on_hostile_text():
    """It runs on values from outside (config files, request fields): no pattern may backtrack quadratically."""
    import time

    from linewatch.validation import redact_source

    for text in ("a://" * 250_000, "user" * 250_000, 'pw="' * 200_000, "a:b" * 300_000, ("x" * 40 + "=") * 20_000):
        t0 = time.perf_counter()
        redact_source(text)
        assert time.perf_counter() - t0 < 2.0, text[:20]


def test_show_value_hides_credentials_even_past_its_cut():
    url = "rtps://admin:" + "S3cret" * 12 + "@10.0.0.1/s"  # the `@` lies beyond the 60 characters shown
    assert "S3cret" not in show_value(url) and show_value(url) == "str 'rtps://***@10.0.0.1/s'"
    assert "S3cret" not in show_value({"source": url, "x": [url]})


def test_show_value_is_bounded_for_hostile_values():
    """Values from a hostile document: a 5000-digit integer, nesting deeper than repr can go, shared references
    standing for billions of items. Shown short and at once, never raising."""
    assert show_value(10**5000) == "int <integer of 16610 bits>"
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert show_value(nested).startswith("list [[[[")
    bomb: list = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 strings, as YAML aliases build them
    assert len(show_value(bomb)) <= 65
