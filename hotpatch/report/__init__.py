"""Reports: JSON views of images and functions, and self-contained HTML pages.

Owns turning what the stages produce (a diff, a build, a batch, a train) into
something people read: the JSON views the CLI prints (``views``) and the HTML
report (``html``, Jinja2 templates in ``templates/``). It sits on top of the
pipeline and may import every stage below it (image, functions, diff, verdict,
package) and ``hotpatch.batch``'s result documents; no stage imports it except
the CLI.
"""

from __future__ import annotations

from .views import function_rows, image_info

__all__ = ["function_rows", "image_info"]
