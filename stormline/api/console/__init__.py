"""The operators' web console at ``/console/``: static pages, and their JSON under
``/console/api/`` behind the API's own keys and roles (``stormline.api.auth``).

The pages are plain HTML and JavaScript shipped in ``static/`` (no build step); charts are
drawn as SVG by ``static/js/charts.js``. The browser keeps the pasted API key in
``sessionStorage`` and sends it as ``Authorization: Bearer``, like any API client.
"""
