"""``fusesurgery push OUT REPO_ID``: validate a fused checkpoint and upload it in one commit."""

from __future__ import annotations

from typing import Annotated

import typer

from fusesurgery import _json as standard_json
from fusesurgery.cli.errors import stderr
from fusesurgery.cli.options import Json


def push(
    fused: Annotated[str, typer.Argument(
        metavar="OUT", help="A fused checkpoint directory written by fuse or save_fused.",
        show_default=False)],
    repo_id: Annotated[str, typer.Argument(
        metavar="REPO_ID", help="The Hub repo, namespace/name (created if it does not exist).",
        show_default=False)],
    revision: Annotated[str | None, typer.Option(
        help="Commit to this branch (created from main if missing).")] = None,
    private: Annotated[bool, typer.Option(
        "--private", help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    commit_message: Annotated[str | None, typer.Option(
        help="The commit's title.")] = None,
    create_pr: Annotated[bool, typer.Option(
        "--create-pr", help="Open a pull request instead of committing to the branch.")
    ] = False,
    token: Annotated[str | None, typer.Option(
        help="A Hub token with write access (default: HF_TOKEN, then `hf auth login`'s).")
    ] = None,
    base_model: Annotated[list[str] | None, typer.Option(
        "--base-model", help="A source's Hub id for the card's base_model, decoder first "
        "(repeat; default: the sources' own ids when fuse read them from the Hub).")] = None,
    license: Annotated[str | None, typer.Option(
        help="A license id for the card, e.g. apache-2.0 or llama3.1.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Validate headers only (index, shards, keys, shapes, dtypes), not the "
        "forward passes: for a model bigger than this machine's memory.")] = False,
    device: Annotated[str, typer.Option(help="Where validate's forward checks run.")] = "cpu",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and print the files, sizes and model card; no network.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Validate a fused checkpoint, write its model card, and upload it to the Hugging Face
    Hub in one commit. Nothing leaves the machine unless validate passes; a failed upload
    leaves the repo as it was."""
    from fusesurgery.io.hub_client import hub_endpoint

    hub_endpoint()  # huggingface_hub fails to import with a malformed HF_ENDPOINT: say so
    from huggingface_hub.utils import disable_progress_bars

    from fusesurgery._plural import plural
    from fusesurgery._sizes import format_bytes
    from fusesurgery.hub.push import push_fused

    if as_json or stderr.quiet or not stderr.is_terminal:  # the client's own bars
        disable_progress_bars()

    def stage(message: str) -> None:
        stderr.print(f"{message} ...")

    result = push_fused(fused, repo_id, token=token, dry_run=dry_run, on_stage=stage,
                        revision=revision, private=private, commit_message=commit_message,
                        create_pr=create_pr, base_models=tuple(base_model or ()),
                        license=license, quick=quick, device=device)
    plan = result.plan
    if as_json:
        typer.echo(standard_json.dumps(result.to_dict(), indent=2))
        return
    if dry_run:
        width = max(len(f.path_in_repo) for f in plan.files)
        where = plan.repo_id + (f"@{plan.revision}" if plan.revision else "")
        as_pr = " as a pull request" if plan.create_pr else ""
        typer.echo(f"would upload {plural(len(plan.files), 'file')} "
                   f"({format_bytes(plan.total_bytes)}) to {where} in one commit{as_pr}:")
        for f in plan.files:
            typer.echo(f"  {f.path_in_repo:<{width}}  {format_bytes(f.size):>9}")
        typer.echo(f"\n{plan.card}")
        stderr.print("dry run: nothing was uploaded")
        return
    typer.echo(result.pr_url or result.commit_url or result.repo_url)
    if not result.committed:
        stderr.print(f"nothing to push: {result.repo_url} already holds exactly these "
                     f"{plural(len(plan.files), 'file')} (commit {(result.commit or '')[:10]}); no "
                     "commit was made")
        return
    stderr.print(f"pushed {plural(len(plan.files), 'file')} ({format_bytes(plan.total_bytes)}) to "
                 f"{result.repo_url} in commit {(result.commit or '')[:10]}"
                 + (" (new repo)" if result.created_repo else ""))
