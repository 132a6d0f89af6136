"""`dvc plots show` offline: the same page, with Vega, Vega-Lite and Vega-Embed inlined instead of
loaded from a CDN.

DVC's default page pulls those three scripts from a CDN, so on a machine without internet its loss
curves stay blank (the PNG plots still show). DVC takes a custom page with `--html-template`; a page
without the `{scripts}` placeholder gets no CDN tags at all. This module writes such a page with the
bundle that the `vl-convert-python` package ships (no download: it is built into the wheel) and runs
`dvc plots show` with it:

    python -m tunekit.dvc_plots                 # = dvc plots show, offline -> dvc_plots/index.html
    python -m tunekit.dvc_plots -- diff HEAD~1  # any `dvc plots` subcommand and arguments after --

The page is cached in .dvc/tmp/ (DVC's scratch directory, never committed), keyed by the bundle's
Vega versions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

TEMPLATE_HEAD = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
    <script>
"""
TEMPLATE_TAIL = """
    </script>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def bundle() -> tuple[str, str]:
    """(JavaScript defining window.vega, vegaLite and vegaEmbed; a version string naming them)."""
    try:
        import vl_convert
    except ImportError as exc:
        raise SystemExit("the offline plots page needs the vl-convert-python package (pinned in requirements.lock: "
                         "make setup installs it)") from exc
    versions = f"vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()}"
    return vl_convert.javascript_bundle(), versions


def write_template(path: Path) -> Path:
    """Write the offline page template to `path` (atomically) and return it."""
    js, versions = bundle()
    # The bundle is inlined in a <script> element: a literal "</script" inside it would end the element.
    js = js.replace("</script", "<\\/script")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"<!-- {versions}, inlined from vl-convert-python -->\n" + TEMPLATE_HEAD + js + TEMPLATE_TAIL,
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def template_path(root: Path = Path(".")) -> Path:
    """The cached template in `root`/.dvc/tmp, written first when missing or from another bundle."""
    import vl_convert

    key = hashlib.sha256(f"{vl_convert.get_vega_version()} {vl_convert.get_vega_embed_version()} "
                         f"{TEMPLATE_HEAD}{TEMPLATE_TAIL}".encode()).hexdigest()[:12]
    path = root / ".dvc" / "tmp" / f"plots-offline-{key}.html"
    return path if path.is_file() else write_template(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template-only", action="store_true", help="write the template and print its path")
    parser.add_argument("dvc_args", nargs="*", help="`dvc plots` subcommand and arguments (default: show)")
    args = parser.parse_args(argv)
    try:
        template = template_path()
    except ModuleNotFoundError:
        bundle()  # raises the explanatory SystemExit
        raise
    if args.template_only:
        print(template)
        return
    command = ["dvc", "plots", *(args.dvc_args or ["show"]), "--html-template", str(template)]
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main(sys.argv[1:])
