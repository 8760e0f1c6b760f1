"""MONAI transforms that simulate a motion-corrupted, undersampled 2D multi-slice MRI acquisition."""

from .acquisition import (
    AcquisitionParameters,
    RandSimulateAcquisition,
    RandSimulateAcquisitiond,
    SimulateAcquisition,
    SimulateAcquisitiond,
    simulate_acquisition,
)
from .motion import KspaceMotion, KspaceMotiond
from .thick_slice import ThickSliceAcquisition, ThickSliceAcquisitiond
from .undersampling import KspaceUndersampling, KspaceUndersamplingd

__all__ = [
    "AcquisitionParameters",
    "KspaceMotion",
    "KspaceMotiond",
    "KspaceUndersampling",
    "KspaceUndersamplingd",
    "RandSimulateAcquisition",
    "RandSimulateAcquisitiond",
    "SimulateAcquisition",
    "SimulateAcquisitiond",
    "ThickSliceAcquisition",
    "ThickSliceAcquisitiond",
    "simulate_acquisition",
]
