"""What every page embeds: plotly.js as a gzip+base64 payload, the Jinja2 environment, and chart JSON made safe.

plotly.min.js is 4.8 MB, over the ~4 MB a page may weigh; gzipped and base64-encoded it is about 1.9 MB, and the
page decodes it with the browser's own ``DecompressionStream`` before drawing. A page stays one file that works
offline, from a CI artifact or an e-mail, which a ``plotly.min.js`` shipped beside it would not.
"""

from __future__ import annotations

import base64
import gzip
import json
from functools import lru_cache
from importlib.resources import files

from jinja2 import Environment, PackageLoader
from markupsafe import Markup

#: Characters that could end a ``<script>`` element or start markup, as JSON string escapes.
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@lru_cache(maxsize=1)
def plotly_payload() -> str:
    """plotly.min.js (the plotly package's copy), gzipped and base64-encoded."""
    source = (files("plotly") / "package_data" / "plotly.min.js").read_bytes()
    return base64.b64encode(gzip.compress(source, compresslevel=9, mtime=0)).decode("ascii")


def script_json(value: object) -> Markup:
    """``value`` as JSON that is safe inside a ``<script type="application/json">`` element."""
    text = json.dumps(value, allow_nan=False)
    for char, escape in _JSON_ESCAPES.items():
        text = text.replace(char, escape)
    return Markup(text)


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The pages' Jinja2 environment: the package's templates, every value HTML-escaped."""
    env = Environment(loader=PackageLoader("vitcompress.page", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["script_json"] = script_json
    env.globals["plotly_payload"] = plotly_payload
    return env
