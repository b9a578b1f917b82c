"""The `pool` command: parses arguments, calls pool/, router/ and tooling/, prints. Nothing else.

Each command lives in its group's module; this one registers them all, in `pool --help`'s order."""

from __future__ import annotations

import sys

import typer

from cli import doors, fleet_commands, loadtest, operate, serving, versions
from cli.common import emit_json

app = typer.Typer(
    help="zeropool: a multiprocess embedding / similarity pool with zero-downtime rotation.",
    no_args_is_help=True,
    add_completion=False,
)

app.command()(serving.serve)
app.command()(serving.similarity)
app.command()(serving.embed)
app.command()(serving.ping)
app.command()(operate.status)
app.command()(operate.health)
app.command()(operate.stop)
app.command()(operate.keygen)
app.command()(loadtest.bench)
app.command()(loadtest.demo)
app.command()(operate.rotate)
app.command()(operate.rollback)
app.command()(operate.promote)
app.command()(operate.load)
app.command()(operate.unload)
app.command()(versions.calibrate)
app.command("http")(doors.http_door)
app.command()(doors.ui)
app.add_typer(fleet_commands.fleet_app, name="fleet")
app.add_typer(versions.versions_app, name="versions")


def main() -> None:
    if "--json" not in sys.argv[1:]:
        app()
        return
    # A script asked for JSON: a usage error (a missing argument, a value out of range) is
    # one too, not click's box on stderr.
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's own click's UsageError and kin
        emit_json({"ok": False, "error": {"code": "usage", "message": exc.format_message()}})
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
