"""The ``fusesurgery`` command: a typer app whose group maps every error in one place."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from fusesurgery.cli import convert, demo, diff, fuse, inspect, unfuse, validate
from fusesurgery.cli.errors import debug_enabled, interrupted, report


class _Group(TyperGroup):
    """Runs a command; exceptions become one line and an exit code (see ``cli.errors``)."""

    def invoke(self, ctx: typer.Context):
        # the command line before click consumes it: an error under --json is JSON too
        words = (*getattr(ctx, "_protected_args", ()), *ctx.args)
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and exits: typer prints and exits as usual
        except KeyboardInterrupt as exc:
            raise typer.Exit(interrupted(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the one place that maps errors
            code = report(exc, as_json="--json" in words)
            raise typer.Exit(code) from (exc if debug_enabled() else None)


app = typer.Typer(
    cls=_Group,
    name="fusesurgery",
    help="Model surgery on pretrained checkpoints: fuse an encoder into an LLM decoder.",
    no_args_is_help=True,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("fuse", epilog="Examples: fusesurgery fuse clip-vit-l-336/ llama-3.1-8b/ -o my-vlm/ ; "
            "fusesurgery fuse siglip/ qwen2/ -o vlm/ --layers 3,7,11 --new-token '<|image|>' "
            "--dtype bf16")(fuse.fuse)
app.command("validate", epilog="Examples: fusesurgery validate my-vlm/ ; fusesurgery validate "
            "my-vlm/ --against llama-3.1-8b/ --device cuda --json")(validate.validate)
app.command("unfuse", epilog="Examples: fusesurgery unfuse my-vlm/ -o llama/ ; fusesurgery "
            "unfuse my-vlm/ -o merged/ --format hf --merge-embeddings")(unfuse.unfuse)
app.command("inspect", epilog="Examples: fusesurgery inspect decoder/ ; "
            "fusesurgery inspect model.safetensors --json ; fusesurgery inspect ckpt.pt --keys "
            "--num-heads 32")(inspect.inspect)
app.command("diff", epilog="Examples: fusesurgery diff decoder.pt fused/ ; "
            "fusesurgery diff a/ b/ --values --json")(diff.diff)
app.command("convert", epilog="Examples: fusesurgery convert hf_model/ -o native/ ; "
            "fusesurgery convert native/ -o hf/ --to hf --dtype bf16")(convert.convert)
app.command("demo", epilog="Example: fusesurgery demo --json")(demo.demo)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Model surgery on pretrained checkpoints: fuse an encoder into an LLM decoder.

    Set FUSESURGERY_DEBUG=1 to see tracebacks behind error messages.
    """
    if version:
        from fusesurgery import __version__

        typer.echo(__version__)
        raise typer.Exit()
