"""The human rendering of ``fusesurgery inspect`` (rich tables), imported only when a report
is printed, so that ``fusesurgery --help`` does not load the library behind it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fusesurgery._plural import plural
from fusesurgery._sizes import format_bytes
from fusesurgery.config import RopeScaling
from fusesurgery.convert.detect import DetectedModel
from fusesurgery.convert.keymaps import split_layer_index
from fusesurgery.reports.inspection import (
    FusionReport,
    InspectReport,
    TensorCount,
    format_index_set,
)

PROVENANCE_STYLES = {"given": "bold cyan", "read": "green", "inferred": "yellow",
                     "default": "dim"}


# --------------------------------------------------------------------------------------------
# Human output.


def render_report(report: InspectReport, *, all_keys: bool = False) -> Group:
    """The report as rich renderables: a header, then one section per aspect."""
    if report.unsupported is not None:
        return _render_unsupported(report, all_keys)
    if report.unresolved is not None:
        return _render_unresolved(report, all_keys)
    sections: list[Any] = [_header(report), _config_table("config", report.model)]
    if report.fusion is not None:
        sections.append(_fusion_section(report.fusion))
    sections.append(_counts_table("parameters", "component", report.components,
                                  report.num_parameters))
    sections.append(_counts_table("dtypes", "dtype", report.dtypes, report.num_parameters))
    sections.append(_all_keys_table(report) if all_keys else _key_tree_table(report))
    if report.notes:
        sections.append(_notes_section(report.notes))
    spaced: list[Any] = []
    for section in sections:
        spaced.extend((section, Text("")))
    return Group(*spaced[:-1])


def _render_unsupported(report: InspectReport, all_keys: bool) -> Group:
    """What a metadata viewer shows (files, tensors, dtypes, parameters, config.json's main
    fields, key rows), then the one line on the native family it would need."""
    unsupported = report.unsupported
    text = _file_line(report)
    kind = unsupported.kind or "model"
    what = unsupported.model_type or "unknown"
    text.append(f"\n{kind}", style="bold")
    text.append(f" · {what} · no supported family")
    fields = _section("from key names and shapes" if unsupported.fields_from_shapes
                      else "config.json", "field", "value")
    for name, value in unsupported.config_fields.items():
        fields.add_row(name, escape(format_config_value(value)))
    sections: list[Any] = [text]
    if unsupported.config_fields:
        sections.append(fields)
    sections.append(_counts_table("dtypes", "dtype", report.dtypes, report.num_parameters))
    sections.append(_all_keys_table(report) if all_keys else _key_tree_table(report))
    sections.append(Text(unsupported.needs(), style="bold yellow"))
    spaced: list[Any] = []
    for section in sections:
        spaced.extend((section, Text("")))
    return Group(*spaced[:-1])


def _render_unresolved(report: InspectReport, all_keys: bool) -> Group:
    """A supported checkpoint whose config nothing completes: what a metadata viewer shows,
    the fields its weights tell, and which facts need an option (the notes say which)."""
    unresolved = report.unresolved
    text = _file_line(report)
    text.append(f"\n{unresolved.kind}", style="bold")
    text.append(f" · {unresolved.family} · {unresolved.layout} layout · no config file")
    table = _section("config (what the weights tell)", "field", "value", "source")
    partial = unresolved.partial
    for name, value in partial.values.items():
        source = partial.provenance[name]
        table.add_row(name, escape(format_config_value(value)),
                      Text(source, style=PROVENANCE_STYLES.get(source, "")))
    for name, flag in partial.missing.items():
        table.add_row(name, "?", Text(f"needs {flag}", style="bold yellow"))
    sections: list[Any] = [text, table, _counts_table(
        "parameters", "component", report.components, report.num_parameters)]
    sections.append(_counts_table("dtypes", "dtype", report.dtypes, report.num_parameters))
    sections.append(_all_keys_table(report) if all_keys else _key_tree_table(report))
    sections.append(_notes_section(report.notes[:-1]))
    sections.append(Text(unresolved.needs(), style="bold yellow"))
    spaced: list[Any] = []
    for section in sections:
        if section is not None:
            spaced.extend((section, Text("")))
    return Group(*spaced[:-1])


def _notes_section(notes: Iterable[str]) -> Group | None:
    notes = list(notes)
    if not notes:
        return None
    grid = Table.grid(padding=(0, 1))
    grid.add_column()
    grid.add_column(overflow="fold")
    for note in notes:
        grid.add_row("-", escape(note))
    return Group(Text("notes", style="bold"), grid)


def _file_line(report: InspectReport) -> Text:
    text = Text(report.path, style="bold")
    text.append(
        f"\n{report.format}, {plural(len(report.files), 'file')}, "
        f"{plural(report.num_tensors, 'tensor', spec=',')}, "
        f"{_short_count(report.num_parameters)} parameters, {format_bytes(report.total_bytes)}"
    )
    return text


def _header(report: InspectReport) -> Text:
    model = report.model
    text = _file_line(report)
    text.append(f"\n{model.kind}", style="bold")
    text.append(f" · {model.family} · {model.layout} layout")
    if model.fused_style:
        text.append(f" · {model.fused_style} style")
    text.append(f" · config from {model.config_source}" if model.config_source
                else " · no config file")
    return text


def _section(title: str, *columns: str, right: Iterable[str] = ()) -> Table:
    # min_width keeps a title wider than the columns on one line.
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, show_edge=False, min_width=len(title))
    right = set(right)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left",
                         overflow="fold")
    return table


def _config_table(title: str, model: DetectedModel) -> Table:
    table = _section(title, "field", "value", "source")
    for name, source in model.provenance.items():
        value = format_config_value(getattr(model.config, name))
        table.add_row(name, escape(value), Text(source, style=PROVENANCE_STYLES.get(source, "")))
    for name, value in model.unmodelled.items():  # read, and it changes the computation
        table.add_row(name, escape(format_config_value(value)),
                      Text("read, not modelled (see notes)", style="bold yellow"))
    return table


def format_config_value(value: Any) -> str:
    """A config value as a short string (RoPE scaling on one line, floats without noise)."""
    if isinstance(value, RopeScaling):
        return value.summary()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fusion_section(fusion: FusionReport) -> Group:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    layers = fusion.fusion_layers
    grid.add_row("fusion layers", f"{len(layers)} at layers {format_index_set(layers)}"
                 if layers else "none")
    grid.add_row("fusion vocab", plural(fusion.fusion_vocab_size, "new token"))
    grid.add_row("encoder dim", str(fusion.encoder_dim))
    order = "before" if fusion.fusion_first else "after"
    grid.add_row("order", f"each fusion layer runs {order} its decoder layer "
                 f"(from {fusion.settings_source})")
    grid.add_row("norm eps", f"{fusion.ca_norm_eps:g} (ca_norm, mlp_norm), "
                 f"{fusion.qk_norm_eps:g} (q/k norms)")
    if fusion.projection is not None:
        grid.add_row("projection", fusion.projection)
    if fusion.encoder is not None:
        enc = fusion.encoder.config
        grid.add_row("encoder", f"{fusion.encoder.family}, {plural(enc.num_layers, 'layer')}, "
                     f"width {enc.embed_dim}, {enc.image_size}px / {enc.patch_size}px patches")
    if not fusion.gates:
        grid.add_row("gates", "none stored")
    elif fusion.is_identity:
        grid.add_row("gates", Text(f"identity: all gates 0 ({plural(len(fusion.gates), 'gate')})",
                                   style="green"))
    else:
        nonzero = sum(value != 0.0 for value in fusion.gates.values())
        grid.add_row("gates", Text(f"{nonzero} of {plural(len(fusion.gates), 'gate')} non-zero: "
                                   "the fused model differs from the decoder", style="yellow"))
    parts: list[Any] = [Text("fusion", style="bold"), grid]
    if fusion.gates and not fusion.is_identity:
        parts.extend((Text(""), _gate_table(fusion.gates)))
    if fusion.encoder is not None:
        parts.extend((Text(""), _config_table("encoder config", fusion.encoder)))
    return Group(*parts)


def _gate_table(gates: Mapping[str, float]) -> Table:
    """One row per fusion layer, one column per gate (``ca_scale``, ``mlp_scale``)."""
    rows: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for key, value in gates.items():
        template, index = split_layer_index(key)
        gate = template.rsplit(".", 2)[-2]
        if gate not in columns:
            columns.append(gate)
        rows.setdefault(index if index is not None else template, {})[gate] = value
    table = _section("gate values", "layer", *columns,
                     right=("layer", *columns))
    for label, values in rows.items():
        table.add_row(label, *(f"{values[c]:.4g}" if c in values else "-" for c in columns))
    return table


def _counts_table(title: str, label: str, counts: Iterable[TensorCount], total: int) -> Table:
    table = _section(title, label, "tensors", "parameters", "share", "size",
                     right=("tensors", "parameters", "share", "size"))
    for count in counts:
        share = f"{100 * count.num_parameters / total:.1f}%" if total else "-"
        table.add_row(escape(count.name), f"{count.num_tensors:,}",
                      f"{count.num_parameters:,}", share, format_bytes(count.nbytes))
    return table


def _key_tree_table(report: InspectReport) -> Table:
    rows = plural(len(report.key_rows), "row", spec=",")
    table = _section(f"keys ({report.num_tensors:,} in {rows})", "key", "shape", "dtype")
    for row in report.key_rows:
        table.add_row(escape(row.name), format_shape(row.shape), row.dtype)
    return table


def _all_keys_table(report: InspectReport) -> Table:
    table = _section(f"keys ({report.num_tensors:,})", "key", "shape", "dtype")
    for info in report.tensors:
        table.add_row(escape(info.name), format_shape(info.shape), info.dtype_name)
    return table


def format_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _short_count(count: int) -> str:
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


