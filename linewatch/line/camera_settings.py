"""Locked capture properties (exposure, gain, white balance, focus): set on open, read back, re-read (torch-free).

A model judges what it was trained on: an auto-exposure that brightens a dark part, or an autofocus hunting, changes
the picture without changing the part. So the config locks them, and the daemon says what the camera really did:
each property is `ok` (read back as set), `mismatch` (read back differently: the driver rounded or refused), `drift`
(was ok, later read back differently) or `unsupported` (the backend has no such property: a video file, a folder,
many network streams). None of these stops inspection: a camera that cannot be locked still gives pictures, and the
gate (linewatch/line/gating.py) refuses the ones that are unfit. OpenCV's `set` returns False for a property the
backend does not handle (unsupported); a property it accepts is read back and compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import cv2

from linewatch.line.config import CameraSettingsConfig

log = logging.getLogger("linewatch.line.cameras")

# config key -> OpenCV property, in the order they are set (auto modes before the values they unlock)
PROPERTIES: dict[str, int] = {
    "auto_exposure": cv2.CAP_PROP_AUTO_EXPOSURE,
    "exposure": cv2.CAP_PROP_EXPOSURE,
    "gain": cv2.CAP_PROP_GAIN,
    "auto_wb": cv2.CAP_PROP_AUTO_WB,
    "wb_temperature": cv2.CAP_PROP_WB_TEMPERATURE,
    "autofocus": cv2.CAP_PROP_AUTOFOCUS,
    "focus": cv2.CAP_PROP_FOCUS,
}
OK, MISMATCH, DRIFT, UNSUPPORTED = "ok", "mismatch", "drift", "unsupported"
ABS_TOLERANCE = 0.02


class PropertyCapture(Protocol):
    """What is used of cv2.VideoCapture."""

    def set(self, prop: int, value: float) -> bool: ...

    def get(self, prop: int) -> float: ...


@dataclass
class PropertyState:
    wanted: float
    read: float | None = None
    state: str = UNSUPPORTED

    def as_dict(self) -> dict[str, Any]:
        return {"set": self.wanted, "read": self.read, "state": self.state}


def within(wanted: float, read: float, tolerance: float) -> bool:
    """Whether a read-back value counts as the set one (drivers round to their steps)."""
    return abs(read - wanted) <= max(ABS_TOLERANCE, tolerance * abs(wanted))


def wanted_settings(cfg: CameraSettingsConfig) -> dict[str, float]:
    return {key: float(v) for key in PROPERTIES if (v := getattr(cfg, key)) is not None}


class CameraSettings:
    """The properties one camera's config locks, and what its backend made of them (one per capture thread)."""

    def __init__(
        self,
        camera: str,
        cfg: CameraSettingsConfig,
        properties: dict[str, int] = PROPERTIES,
        wanted: dict[str, float] | None = None,
    ):
        """`properties`/`wanted`: the OpenCV property table and the values to set; by default the config's."""
        self.camera = camera
        self.cfg = cfg
        self.properties = properties
        values = wanted_settings(cfg) if wanted is None else wanted
        self.states: dict[str, PropertyState] = {k: PropertyState(v) for k, v in values.items()}
        self.warnings = 0  # mismatches and drifts seen (each change of a property's state to one counts once)
        self._said_unsupported: set[str] = set()

    @property
    def wanted(self) -> bool:
        return bool(self.states)

    def apply(self, cap: PropertyCapture | None) -> None:
        """Set every configured property on a freshly opened capture (None: a source without properties, a folder)
        and read each back; logs what is unsupported (info) and what does not hold (warning)."""
        for key, st in self.states.items():
            prop = self.properties[key]
            accepted = False
            if cap is not None:
                try:
                    accepted = bool(cap.set(prop, st.wanted))
                except cv2.error:
                    accepted = False
            self._update(key, st, cap if accepted else None, opened=True)

    def recheck(self, cap: PropertyCapture | None) -> None:
        """Read the supported properties back (cheap `get` calls) and report drift."""
        for key, st in self.states.items():
            if st.state != UNSUPPORTED:
                self._update(key, st, cap, opened=False)

    def _update(self, key: str, st: PropertyState, cap: PropertyCapture | None, opened: bool) -> None:
        old = st.state
        read = None
        if cap is not None:
            try:
                read = float(cap.get(self.properties[key]))
            except cv2.error:
                read = None
        if read is None:  # refused by set, or not readable: the backend does not do this property
            st.read, st.state = None, UNSUPPORTED
        elif within(st.wanted, read, self.cfg.tolerance):
            st.read, st.state = read, OK
        else:
            st.read, st.state = read, MISMATCH if opened or old == MISMATCH else DRIFT
        if st.state == old and not opened:
            return
        if st.state == UNSUPPORTED:
            if key not in self._said_unsupported:  # once, not on every reconnect
                self._said_unsupported.add(key)
                log.info("camera %s: setting %s=%g: not supported by this backend", self.camera, key, st.wanted)
        elif st.state == OK:
            if old in (MISMATCH, DRIFT):
                log.info("camera %s: setting %s reads %g again, as set", self.camera, key, st.read)
            elif opened:
                log.info("camera %s: setting %s=%g locked (reads %g)", self.camera, key, st.wanted, st.read)
        else:
            self.warnings += 1
            log.warning(
                "camera %s: setting %s set to %g but reads %g (%s)", self.camera, key, st.wanted, st.read, st.state
            )

    def report(self) -> dict[str, dict[str, Any]]:
        """The status topic's `camera_settings`: {property: {set, read, state}}."""
        return {key: st.as_dict() for key, st in self.states.items()}
