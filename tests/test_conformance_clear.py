"""The conformance suite against ``clear`` itself, float and quantized."""

from __future__ import annotations

from secureinfer.testing import SchemeConformance


class TestClearConformance(SchemeConformance):
    config = "clear"


class TestClearQuantizedConformance(SchemeConformance):
    config = "clear?bits=8"
