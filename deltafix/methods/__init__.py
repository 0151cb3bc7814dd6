"""Repair methods: one module each, pure tensor functions plus a registry entry."""

from deltafix.methods.registry import (
    Method,
    MethodParams,
    Repaired,
    TuneSpec,
    WeightTensors,
    get_method,
    method_names,
    register,
)

__all__ = ["Method", "MethodParams", "Repaired", "TuneSpec", "WeightTensors", "get_method", "method_names", "register"]
