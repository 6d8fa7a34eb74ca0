"""Self-contained HTML reports of benchmark results (plots embedded as base64 PNG)."""

from .html import render_report, write_report

__all__ = ["render_report", "write_report"]
