"""The ``fusesurgery`` command: a typer app whose group maps every error in one place.

Start-up is kept cheap (``--help`` and header-only commands never import torch): commands are
listed in :data:`COMMANDS` and each module is imported only when its command is looked up.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command_from_info
from typer.models import CommandInfo

from fusesurgery.cli.errors import debug_enabled, interrupted, report, report_usage, set_quiet

# (command, module, function, epilog): one row per command, in the order help lists them. A
# new command is one more row; its module is imported only when the command is used or listed.
COMMANDS: tuple[tuple[str, str, str, str], ...] = (
    ("fuse", "fusesurgery.cli.fuse", "fuse",
     "Examples: fusesurgery fuse clip-vit-l-336/ llama-3.1-8b/ -o my-vlm/ ; fusesurgery fuse "
     "siglip/ qwen2/ -o vlm/ --layers 3,7,11 --new-token '<|image|>' --dtype bf16"),
    ("validate", "fusesurgery.cli.validate", "validate",
     "Examples: fusesurgery validate my-vlm/ ; fusesurgery validate my-vlm/ --against "
     "llama-3.1-8b/ --device cuda --json"),
    ("unfuse", "fusesurgery.cli.unfuse", "unfuse",
     "Examples: fusesurgery unfuse my-vlm/ -o llama/ --dtype bf16 ; fusesurgery unfuse my-vlm/ "
     "-o merged/ --format hf --merge-embeddings"),
    ("inspect", "fusesurgery.cli.inspect", "inspect",
     "Examples: fusesurgery inspect decoder/ ; fusesurgery inspect model.safetensors --json ; "
     "fusesurgery inspect ckpt.pt --keys --num-heads 32"),
    ("diff", "fusesurgery.cli.diff", "diff",
     "Examples: fusesurgery diff decoder.pt fused/ ; fusesurgery diff a/ b/ --values --json"),
    ("convert", "fusesurgery.cli.convert", "convert",
     "Examples: fusesurgery convert hf_model/ -o native/ ; fusesurgery convert native/ -o hf/ "
     "--to hf --dtype bf16"),
    ("generate", "fusesurgery.cli.generate", "generate",
     "Examples: fusesurgery generate my-vlm/ --image cat.jpg --prompt 'Describe this image:' ; "
     "fusesurgery generate my-vlm/ --prompt 'Hello' --max-new-tokens 8 --json"),
    ("demo", "fusesurgery.cli.demo", "demo", "Example: fusesurgery demo --json"),
    ("push", "fusesurgery.cli.push", "push",
     "Examples: fusesurgery push my-vlm/ my-org/my-vlm --dry-run ; fusesurgery push my-vlm/ "
     "my-org/my-vlm --private --base-model meta-llama/Llama-3.1-8B --base-model "
     "openai/clip-vit-large-patch14"),
)


def _coerce_plain(annotation: type, value: Any) -> Any:
    """A command-line string as ``annotation`` (bool, int, float, str or Path).

    Raises:
        ValueError: the string is no such value.
    """
    if isinstance(value, annotation):
        return value
    if annotation is bool:
        word = str(value).strip().lower()
        if word in ("1", "true", "yes", "on", "y", "t"):
            return True
        if word in ("0", "false", "no", "off", "n", "f", ""):
            return False
        raise ValueError(f"{value!r} is not a valid boolean")
    if annotation is Path:
        return Path(value)
    try:
        return annotation(value)
    except (TypeError, ValueError):
        what = _TYPE_WORDS.get(annotation, annotation.__name__)
        raise ValueError(f"{value!r} is not a valid {what}") from None


_TYPE_WORDS = {int: "integer", float: "number"}


try:  # typer's per-parameter coercion hook (typer >= 0.29); without it, typer's default stands
    from typer._coercion import RuntimeParam as _RuntimeParam
    from typer._param_types import coerce_cli_choice as _coerce_choice

    class _PlainRuntimeParam(_RuntimeParam):
        """Coerces plain option values without pydantic: typer builds a pydantic TypeAdapter
        per parameter, and importing pydantic costs more than all of ``inspect``'s own work
        on a 405B checkpoint's headers."""

        def _coerce_value(self, value: Any, param: Any, ctx: typer.Context) -> Any:
            try:
                return _coerce_plain(self.annotation, value)
            except ValueError as error:
                raise typer.BadParameter(str(error), ctx=ctx, param=param) from None

    class _ChoiceRuntimeParam(_RuntimeParam):
        """A ``Literal[...]`` option's value, also without pydantic; the message names the
        valid values the way the library's own ``unknown ...; valid: ...`` errors do."""

        def _coerce_value(self, value: Any, param: Any, ctx: typer.Context) -> Any:
            choices = param.type_descriptor.choices
            try:
                return _coerce_choice(value, choices=choices,
                                      case_sensitive=param.type_descriptor.case_sensitive,
                                      ctx=ctx)
            except ValueError:
                noun = _CHOICE_NOUNS.get(param.name, param.name.replace("_", " "))
                raise typer.BadParameter(
                    f"unknown {noun} {value!r}; valid: {', '.join(map(str, choices))}",
                    ctx=ctx, param=param) from None

except ImportError:  # pragma: no cover - another typer
    _PlainRuntimeParam = _ChoiceRuntimeParam = None


_PLAIN_TYPES = (bool, int, float, str, Path)
# What a choice option's value is, where its name does not say (``--to hf``: a layout).
_CHOICE_NOUNS = {"to": "layout"}
# Value placeholders in help, where the option's last name word does not say what goes there.
METAVARS = {
    "output": "DIR", "against": "CHECKPOINT", "to": "LAYOUT", "format": "LAYOUT",
    "base_model": "REPO_ID", "layers": "LIST", "embedding_init": "METHOD",
    "revision": "BRANCH", "commit_message": "TEXT", "prompt": "TEXT", "image": "FILE",
}
_TYPE_METAVARS = {int: "N", float: "NUMBER"}


def _metavar(param: Any) -> str:
    """An option's value placeholder in help, by one rule: :data:`METAVARS` where the name
    does not say; ``N`` for an integer, ``NUMBER`` for a float; else the name's last word
    (``--device DEVICE``, ``--max-shard-size SIZE``, ``--new-token TOKEN``)."""
    if param.name in METAVARS:
        return METAVARS[param.name]
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if annotation in _TYPE_METAVARS and not getattr(descriptor, "is_choice", False):
        return _TYPE_METAVARS[annotation]
    return param.name.rsplit("_", 1)[-1].upper()


def _no_type_column(ctx: Any) -> None:
    return None


def _param_rules(params: list[Any]) -> list[Any]:
    """The one rule every command's parameters follow, for help and for start-up time.

    Help in the style of git's and hf's: a flag shows no value placeholder (typer would print
    ``--json <bool>``), an option taking a value shows what it takes in capitals
    (``--output DIR``, ``--every N``; see :func:`_metavar`) instead of typer's ``<str>``, and
    a positional shows its name in capitals (``CHECKPOINT``, ``OUT``) in the usage line
    (without typer's ``{braces}``, see :class:`_Command`) and in the arguments panel, with
    no type beside it. Values of plain types and ``Literal`` choices are coerced without
    pydantic (see :class:`_PlainRuntimeParam`, :class:`_ChoiceRuntimeParam`).
    """
    for param in params:
        if param.param_type_name == "argument":
            if param.metavar is None:
                param.metavar = param.name.upper()
            param.display_type_rich = _no_type_column  # the name says it: no <str> beside
        elif getattr(param, "is_flag", False):
            if param.metavar is None:
                param.metavar = ""
        elif param.metavar is None:
            param.metavar = _metavar(param)
        descriptor = getattr(param, "type_descriptor", None)
        if (_PlainRuntimeParam is None or descriptor is None
                or getattr(param, "_runtime_param", False) is not None
                or descriptor.file_annotation is not None or param.multiple
                or param.nargs != 1):
            continue
        if descriptor.annotation in _PLAIN_TYPES:
            param._runtime_param = _PlainRuntimeParam(
                parameter_info=descriptor.parameter_info, annotation=descriptor.annotation)
        elif descriptor.is_choice and not descriptor.is_list:
            param._runtime_param = _ChoiceRuntimeParam(
                parameter_info=descriptor.parameter_info, annotation=descriptor.annotation)
    return params


class _Command(TyperCommand):
    """A command whose parameters follow :func:`_param_rules`."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _param_rules(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            piece = param.metavar if param.required else f"[{param.metavar}]"
            pieces.append(piece + ("..." if param.nargs != 1 else ""))
        return pieces


def _summary(doc: str | None) -> str | None:
    """A command's line in the root help: its docstring's first sentence, up to a colon."""
    if not doc:
        return None
    sentence = " ".join(doc.split()).split(". ")[0].removesuffix(".")
    return sentence.split(": ")[0]


def _quiet_given(value: bool) -> None:
    if value:
        set_quiet(True)


def _quiet(
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", expose_value=False, callback=_quiet_given,
        help="No progress bars or messages on stderr (errors and stdout data still show).")
    ] = False,
) -> None:
    """Holds the ``--quiet`` option that every command accepts after its name."""


class _Group(TyperGroup):
    """Runs a command; exceptions become one line and an exit code (see ``cli.errors``).

    Commands come from :data:`COMMANDS`, each built (importing its module) on first lookup:
    running ``fusesurgery inspect`` imports the inspect command alone, and shell completion
    and ``--help`` list every command through the same lookup.
    """

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return [*(row[0] for row in COMMANDS), *(n for n in self.commands if n not in _NAMES)]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in _NAMES:
            _, module, function, epilog = COMMANDS[_NAMES[cmd_name]]
            callback = getattr(importlib.import_module(module), function)
            command = get_command_from_info(
                CommandInfo(cmd_name, cls=_Command, callback=callback, epilog=epilog,
                            short_help=_summary(inspect.getdoc(callback))),
                pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=self.rich_markup_mode,
            )
            command.params.extend(get_command_from_info(
                CommandInfo(callback=_quiet), pretty_exceptions_short=True,
                rich_markup_mode=self.rich_markup_mode).params)
            self.commands[cmd_name] = command
        return self.commands.get(cmd_name)

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _param_rules(super().get_params(ctx))

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Parse and run; a usage error (an unknown option or command, a bad or missing
        value) is one line and exit 2, JSON on stdout too under ``--json`` (see
        ``cli.errors.report_usage``), instead of typer's boxed message.

        Help (``--help``, no arguments at all), ``-V`` and shell completion run as typer runs
        them; this only takes over the exit at the end.

        Raises:
            SystemExit: always, with the exit code (see ``cli.errors``).
        """
        if not standalone_mode:  # a caller that handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        words = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            code = 1
        except typer.TyperException as error:  # click's ClickException and its usage errors
            if type(error).__name__ == "NoArgsIsHelpError":  # the help is already printed
                code = error.exit_code
            else:
                ctx = getattr(error, "ctx", None)
                code = report_usage(error.format_message(),
                                    ctx.command_path if ctx is not None else "fusesurgery",
                                    as_json="--json" in words[:_end_of_options(words)])
        sys.exit(code if isinstance(code, int) else 0)

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except typer.TyperException as error:  # typer suggests from loaded commands only
            if args and "Did you mean" not in error.message:
                matches = get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    error.message = (f"{error.message.rstrip('.')}. Did you mean "
                                     f"{', '.join(map(repr, matches))}?")
            raise

    def invoke(self, ctx: typer.Context):
        # the command line before click consumes it: an error under --json is JSON too
        words = (*getattr(ctx, "_protected_args", ()), *ctx.args)
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and exits: typer prints and exits as usual
        except BrokenPipeError:
            raise  # stdout closed early (`| head`): click exits quietly, as git does
        except KeyboardInterrupt as exc:
            raise typer.Exit(interrupted(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the one place that maps errors
            code = report(exc, as_json="--json" in words)
            raise typer.Exit(code) from (exc if debug_enabled() else None)


def _end_of_options(words: list[str]) -> int:
    """Where ``--`` ends the options (after it, ``--json`` would be an argument)."""
    return words.index("--") if "--" in words else len(words)


_NAMES = {row[0]: i for i, row in enumerate(COMMANDS)}

app = typer.Typer(
    cls=_Group,
    name="fusesurgery",
    help="Model surgery on pretrained checkpoints: fuse an encoder into an LLM decoder.",
    no_args_is_help=True,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", "-V", help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bars or messages on stderr (errors and stdout data "
        "still show); also accepted after the command name.")] = False,
) -> None:
    """Model surgery on pretrained checkpoints: fuse an encoder into an LLM decoder.

    Set FUSESURGERY_DEBUG=1 to see tracebacks behind error messages.
    """
    set_quiet(quiet)  # every invocation starts from this (in-process runs share the console)
    if version:
        from fusesurgery._version import __version__

        typer.echo(f"fusesurgery {__version__}")  # as git and hf print theirs
        raise typer.Exit()
