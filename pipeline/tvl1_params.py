"""TV-L1 parameters: OpenCV's names and defaults, shared by every TV-L1 backend and recorded with the flow.

Kept apart from the torch implementation so that the CLI (which offers every parameter as an option) and the OpenCV
backends do not import torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """The range a numeric TV-L1 parameter must lie in; ``None`` is unbounded. One source for the library's check
    and the CLI's option types (whose ``--help`` shows it)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself excluded
    max_open: bool = False

    def __contains__(self, value: float) -> bool:
        return ((self.min is None or value > self.min or (value == self.min and not self.min_open))
                and (self.max is None or value < self.max or (value == self.max and not self.max_open)))

    def __str__(self) -> str:
        low = None if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
        high = None if self.max is None else f"{'<' if self.max_open else '<='} {self.max:g}"
        return " and ".join(filter(None, [low, high]))


# Where each term of the energy means what its name says. OpenCV 5.0's Dual TV-L1 checks none of these: theta 0
# returns NaN flow, lambda -1 flow ~30x too large, gamma -1 rewards the brightness changes it should explain.
# medianFiltering has its own rule (odd, or <= 1: off).
BOUNDS = {
    "tau": Bound(0, min_open=True),
    "lambda_": Bound(0, min_open=True),
    "theta": Bound(0, min_open=True),
    "nscales": Bound(1),
    "warps": Bound(1),
    "epsilon": Bound(0),
    "innerIterations": Bound(1),
    "outerIterations": Bound(1),
    "scaleStep": Bound(0, 1, min_open=True, max_open=True),
    "gamma": Bound(0),
}


@dataclass(frozen=True)
class TVL1Params:
    """TV-L1 parameters: the names and defaults of ``cv2.optflow.DualTVL1OpticalFlow_create`` (OpenCV 5.0 contrib).

    tau: time step of the dual (numerical) scheme; stable for tau <= 0.25.
    lambda_: weight of the data term (OpenCV's ``lambda``); smaller means smoother flow.
    theta: coupling between the data and regularisation halves of the energy.
    nscales: pyramid levels (fewer if a level would be under 16 pixels on a side).
    warps: re-linearisations of I1 around the current flow per scale.
    epsilon: stopping threshold: mean squared flow update (per pixel) below epsilon**2.
    innerIterations, outerIterations: iteration caps per warp; the median filter runs once per outer iteration.
    scaleStep: size ratio between consecutive pyramid levels.
    gamma: weight of the illumination-change term (0 disables it).
    medianFiltering: side of the median filter applied to the flow (<= 1 disables it).
    useInitialFlow: OpenCV's flag to start from a given flow; not supported here (must be False).
    """

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    innerIterations: int = 30
    outerIterations: int = 10
    scaleStep: float = 0.8
    gamma: float = 0.0
    medianFiltering: int = 5
    useInitialFlow: bool = False

    def __post_init__(self) -> None:
        for spec in fields(self):  # NaN passes every comparison below; inf saturates the stored flow
            if spec.type == "float" and not math.isfinite(getattr(self, spec.name)):
                raise ConfigError(f"TV-L1 {spec.name.rstrip('_')} must be a finite number, got {getattr(self, spec.name)}")
        if self.useInitialFlow:
            raise ConfigError("useInitialFlow=True is not supported by the torch TV-L1 (it takes no initial flow)")
        for name, bound in BOUNDS.items():
            if getattr(self, name) not in bound:
                raise ConfigError(f"TV-L1 {name.rstrip('_')} must be {bound}, got {getattr(self, name)}")
        if self.medianFiltering > 1 and self.medianFiltering % 2 == 0:
            raise ConfigError(f"medianFiltering must be odd (or <= 1 to disable), got {self.medianFiltering}")

    def to_opencv(self) -> Any:
        """OpenCV's Dual TV-L1 object with these parameters (the CPU backend, and this module's reference).

        OpenCV keeps it in contrib's ``cv2.optflow`` (4.x, and 5.0 here); some builds have it in ``cv2`` itself.
        """
        import cv2

        for owner in (getattr(cv2, "optflow", None), cv2):
            create = getattr(owner, "DualTVL1OpticalFlow_create", None)
            if create is not None:
                # Positional: OpenCV's Python binding spells the keyword "innnerIterations".
                return create(self.tau, self.lambda_, self.theta, self.nscales, self.warps, self.epsilon,
                              self.innerIterations, self.outerIterations, self.scaleStep, self.gamma,
                              self.medianFiltering, self.useInitialFlow)
        raise ConfigError(
            f"OpenCV {cv2.__version__} has no Dual TV-L1 (neither cv2.optflow.DualTVL1OpticalFlow_create nor "
            "cv2.DualTVL1OpticalFlow_create); install opencv-contrib-python-headless, or use --backend torch")
