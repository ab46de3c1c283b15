"""Validation: prove a fused checkpoint computes what the original decoder computed."""

from fusesurgery.validate.checks import Check, ValidationReport, validate_fused, validate_layout

__all__ = ["Check", "ValidationReport", "validate_fused", "validate_layout"]
