"""`otcclip match` (not built yet)."""

import click


@click.command(name="match")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'otcclip match' is not built yet")
