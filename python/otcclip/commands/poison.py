"""`otcclip poison` (not built yet)."""

import click


@click.command(name="poison")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'otcclip poison' is not built yet")
