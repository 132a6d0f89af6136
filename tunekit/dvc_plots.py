"""`dvc plots show` offline: the same page, with Vega, Vega-Lite and Vega-Embed inlined instead of
loaded from a CDN.

DVC's default page pulls those three scripts from a CDN, so on a machine without internet its loss
curves stay blank (the PNG plots still show). DVC takes a custom page with `--html-template`; a page
without the `{scripts}` placeholder gets no CDN tags at all. This module writes such a page with the
bundle that the `vl-convert-python` package ships (no download: it is built into the wheel) and runs
`dvc plots show` with it:

    python -m tunekit.dvc_plots                 # = dvc plots show, offline -> dvc_plots/index.html
    python -m tunekit.dvc_plots -- diff HEAD~1  # any `dvc plots` subcommand and arguments after --

The template lives in .dvc/tmp/ (DVC's scratch directory, never committed); `make setup` writes it and
.dvc/config points `plots.html_template` at it, so plain `dvc plots show` renders offline too.
"""

from __future__ import annotations

import argparse
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


TEMPLATE = Path(".dvc") / "tmp" / "plots-offline.html"  # .dvc/config's plots.html_template names it (relative to .dvc/)


def template_path(root: Path = Path(".")) -> Path:
    """The offline template at `root`/.dvc/tmp/plots-offline.html, (re)written when it is missing or was
    made from another bundle. `make setup` writes it, so plain `dvc plots show` finds it through
    .dvc/config (`plots.html_template`)."""
    import vl_convert

    path = root / TEMPLATE
    versions = f"vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()}"
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            if handle.readline().startswith(f"<!-- {versions}, inlined"):
                return path
    return write_template(path)


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
