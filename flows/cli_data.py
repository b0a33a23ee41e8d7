"""``altforge encode`` and ``altforge versions``: latent datasets, and the versions of an incremental dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Annotated

import typer

from flows import env  # telemetry off before anything imports prefect
from flows.cli_common import STORAGE_OPTIONS_HELP, fail, parse_storage_options

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


LAUNCH_HELP = """
launcher options (read by altforge, not passed on):
  --nproc-per-node N    processes (GPUs) on this node; more than 1 launches torchrun
  --nnodes N            nodes, for multi-node torchrun
  --rdzv-endpoint H:P   host:port of the rendezvous, multi-node
"""


def module_help(module: str) -> int:
    """Print ``python -m module --help`` and then the launcher options altforge adds around it."""
    code = subprocess.call([sys.executable, "-m", module, "--help"])
    print(LAUNCH_HELP, end="")
    return code


def torchrun_prefix(nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None) -> list[str]:
    """``python -m torch.distributed.run`` with the process and node flags (on one node: a rendezvous on a free
    loopback port, and gloo on the loopback interface)."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            fail("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
        return [*launch, f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    os.environ.update(env.loopback_gloo(dict(os.environ)))  # for the torchrun this command starts next
    return [*launch, "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]


def encode(
    ctx: typer.Context,
    nproc_per_node: Annotated[int, typer.Option(help="processes (GPUs) on this node: >1 launches torchrun")] = 1,
    nnodes: Annotated[int, typer.Option(help="nodes, for multi-node torchrun")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="host:port of the rendezvous, multi-node")] = None,
    help_: Annotated[bool, typer.Option("--help", help="show every encoding option")] = False,
) -> None:
    """Encode an image dataset into VAE latents + text embeddings: IN_DIR --out DIR --vae PATH --text-encoder PATH."""
    if help_ or not ctx.args:
        raise typer.Exit(module_help("flows.encode"))
    if nproc_per_node * nnodes > 1:
        from flows.cli_train import run_torchrun  # the ranks' one-line errors, not torchrun's report

        launch = torchrun_prefix(nproc_per_node, nnodes, rdzv_endpoint)
        raise typer.Exit(run_torchrun([*launch, *env.torchrun_worker("flows.encode"), *ctx.args]))
    from flows.encode import main as encode_main

    try:
        code = encode_main(list(ctx.args))
    except SystemExit as e:  # argparse's own one-line usage errors
        code = e.code if isinstance(e.code, int) else 2
    raise typer.Exit(code)


def versions(
    dataset: Annotated[str, typer.Argument(help="versioned dataset root (written by scrape --incremental)")],
    diff: Annotated[
        tuple[int, int] | None, typer.Option(help="two version numbers: the keys added and removed between them")
    ] = None,
    keys: Annotated[bool, typer.Option(help="with --diff: print the keys too")] = False,
    storage_options: Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP)] = None,
) -> None:
    """List the versions of a dataset with their counts, or diff two of them."""
    from pipeline import storage
    from pipeline import versions as v

    so = parse_storage_options(storage_options)
    try:
        if diff is None:
            typer.echo(v.format_versions(v.list_versions(dataset, so)))
            return
        d = v.diff_versions(dataset, diff[0], diff[1], so)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0])
    except KeyError as e:  # a manifest without a field every manifest has
        fail(f"{dataset}: a version's manifest lacks {e}; it was not written by altforge or is damaged")
    except Exception as e:  # an endpoint that is down, wrong credentials (botocore's errors are not OSError)
        if not storage.is_access_error(e):
            raise
        fail(f"{dataset}: {storage.access_error_line(e)}")
    typer.echo(f"v{diff[0]} -> v{diff[1]}: {d['n_added']} added, {d['n_removed']} removed, {d['n_common']} kept")
    if keys:
        for k in d["added"]:
            typer.echo(f"+ {k}")
        for k in d["removed"]:
            typer.echo(f"- {k}")
