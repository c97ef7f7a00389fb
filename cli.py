"""The `asym3d` command line: thin click commands that validate input and call one library function each."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="asym3d")
def main() -> None:
    """asym3d: raw action videos to per-split accuracy tables with asymmetric 3D CNNs.

    Stages: extract-flow -> build-rgbf -> train -> evaluate. Each stage is resumable.
    """


if __name__ == "__main__":
    main()
