"""`otcclip demo` (not built yet)."""

import click


@click.command(name="demo")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'otcclip demo' is not built yet")
