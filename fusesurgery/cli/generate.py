"""``fusesurgery generate OUT --image IMG --prompt TEXT``: does the fused model run?"""

from __future__ import annotations

from typing import Annotated

import typer

from fusesurgery import _json as standard_json
from fusesurgery._plural import plural
from fusesurgery.cli.errors import stderr
from fusesurgery.cli.options import DtypeOption, Json, parse_dtype_option


def generate(
    fused: Annotated[str, typer.Argument(
        help="A fused checkpoint directory (with its tokenizer), or a transformers export of "
        "one.", show_default=False)],
    prompt: Annotated[str, typer.Option(
        help="The prompt; <|image|> marks where an image goes (one is put in front when "
        "--image is given and the prompt has none).")],
    image: Annotated[list[str] | None, typer.Option(
        help="An image file, repeatable: one per image token.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="The most tokens to add.")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    dtype: DtypeOption = None,
    temperature: Annotated[float, typer.Option(
        help="0 for greedy decoding, else the sampling temperature.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(
        help="Sample among the K most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(
        help="Sample among the most likely tokens whose probability reaches P.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
    as_json: Json = False,
) -> None:
    """Run a prompt (and images) through a fused checkpoint and print the text it adds. With
    zero gates it prints what the original decoder prints for the same prompt ids."""
    from fusesurgery.run.generation import generate_text  # noqa: PLC0415 - imports torch

    result = generate_text(fused, prompt, image or (), max_new_tokens=max_new_tokens,
                           device=device, dtype=parse_dtype_option(dtype),
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if result.prepended_image_tokens:
        stderr.print(f"note: the prompt has no image token; "
                     f"{plural(result.prepended_image_tokens, 'image token')} put in front of "
                     "it, as chat templates do")
    if as_json:
        typer.echo(standard_json.dumps({
            "text": result.text, "prompt_ids": list(result.prompt_ids),
            "new_ids": list(result.new_ids),
            "prepended_image_tokens": result.prepended_image_tokens,
            "stopped_at_eos": result.stopped_at_eos}, indent=2))
        return
    typer.echo(result.text)
