"""Validation: prove a fused checkpoint computes what the original decoder computed."""

from fusesurgery.validate.checks import Check, ValidationReport, validate_fused

__all__ = ["Check", "ValidationReport", "validate_fused"]
