"""Entry point of the ``memkv`` command; each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import typer.core

from lmcache_memkv.cli import bench as bench_cmd
from lmcache_memkv.cli import demo as demo_cmd
from lmcache_memkv.cli import keygen as keygen_cmd
from lmcache_memkv.cli import node as node_cmd
from lmcache_memkv.cli import stats as stats_cmd
from lmcache_memkv.cli import status as status_cmd


def _no_flag_type(display: Any) -> Any:
    """Typer shows flags (--json, --help) with a ``<bool>`` metavar, as if they took a value."""

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else display(self, ctx)

    return display_type_rich


_display = getattr(typer.core.TyperOption, "display_type_rich", None)
if _display is not None:
    typer.core.TyperOption.display_type_rich = _no_flag_type(_display)  # type: ignore[method-assign]

app = typer.Typer(
    name="memkv",
    help="MemKV: a cluster memory tier for LMCache. Run `memkv COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from lmcache_memkv import __version__
        from lmcache_memkv.wire.constants import VERSION

        typer.echo(f"memkv {__version__} (data-plane protocol {VERSION})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """MemKV: a cluster memory tier for LMCache."""


app.command("demo", help=demo_cmd.HELP, epilog=demo_cmd.EXAMPLE)(demo_cmd.demo)
app.command("node", help=node_cmd.HELP, epilog=node_cmd.EXAMPLE)(node_cmd.node)
app.command("keygen", help=keygen_cmd.HELP, epilog=keygen_cmd.EXAMPLE)(keygen_cmd.keygen)
app.command("status", help=status_cmd.HELP, epilog=status_cmd.EXAMPLE)(status_cmd.status)
app.command("stats", help=stats_cmd.HELP, epilog=stats_cmd.EXAMPLE)(stats_cmd.stats)
app.command("bench", help=bench_cmd.HELP, epilog=bench_cmd.EXAMPLE)(bench_cmd.bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
