"""`otcclip train` (not built yet)."""

import click


@click.command(name="train")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("'otcclip train' is not built yet")
